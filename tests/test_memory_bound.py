"""Memory that does not grow with the queries, and scores that do not depend on the grouping.

Each sweep group's perturbed states are dropped once its scores and top-token changes are
computed (``bgotrace.bgo``), so a run's peak memory depends on ``--queries-per-sweep``, not
on the number of queries. The probe runs in a fresh process on a 2-block width-256 GPT-2
(one perturbed state = 1.7M float32 parameters ≈ 7 MB; 12 queries hold 24 of them ≈ 160 MB
if they were kept to the end) and reads the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the run, so importing torch does not set it); glibc is
told to map every allocation above 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so freed
tensors leave the resident set at once instead of staying in the heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bgotrace
from bgotrace.query import Query
from tests.corpora import QUERIES as SHARED_QUERIES
from tests.corpora import documents
from tests.models import tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DOCS = documents(7)
QUERIES = SHARED_QUERIES

PROBE = """
import gc, json, re, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import bgotrace
from bgotrace.runtime.progress import set_progress
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2
from tests.test_memory_bound import DOCS, QUERIES, probe_queries

def rss(key):
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\\s+(\\d+) kB$", status, re.M).group(1)) / 1024

set_progress(False)
tok = make_tiny_tokenizer()
model = tiny_gpt2(tok, width=256)
config = {
    "corpus": {"max_length": 16, "cache_dir": sys.argv[1]},
    "perturb": {"lr": 1e-3, "steps": 2},
    "scoring": {"normalize": "none", "queries_per_sweep": 2, "batch_size": 4},
    "output": {"top_tokens": 2},
}
run = lambda n: bgotrace.attribute(model, tok, DOCS, queries=probe_queries(n), config=config)
run(2)  # warm-up: token cache, allocator
peaks = {}
for n in (2, 12):
    gc.collect()
    before = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    run(n)
    peaks[n] = rss("VmHWM") - before
print(json.dumps(peaks))
"""


def probe_queries(n: int) -> list[Query]:
    """``n`` distinct queries (the test's five, then variants of them)."""
    return [
        Query(f"q{i}", QUERIES[i % 5].prompt, QUERIES[i % 5].completion + " " * (i // 5))
        for i in range(n)
    ]


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _can_reset_peak(),
    reason="needs Linux /proc/self/clear_refs to reset the peak RSS",
)
def test_peak_memory_does_not_grow_with_the_queries(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    peaks = json.loads(out.strip().splitlines()[-1])
    few, many = peaks["2"], peaks["12"]  # MiB above the RSS before the call
    state_mib = 1.7e6 * 4 / 2**20  # one perturbed state of the width-256 model
    assert many <= 1.15 * few + 2, peaks  # 12 queries kept to the end: +20 states ≈ +130 MiB
    assert few > 4 * state_mib, peaks  # the probe sees a group's states at all


# --------------------------------------------------------------------------- grouping


def run(model, tok, tmp_path, per_sweep: int):
    config = {
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(tmp_path / "c")},
        "perturb": {"lr": 3e-3, "steps": 2},
        "scoring": {"queries_per_sweep": per_sweep},
        "output": {"top_tokens": 3},
    }
    return bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=config)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_scores_and_top_tokens_do_not_depend_on_the_grouping(tok, tmp_path, build):
    """Queries per sweep 1, 3 and all (5): the same scores (float32 forward passes of other
    batch shapes differ by ~1e-7 relative; scores of ~50-nat losses: atol 1e-5) and the
    same top units with the same per-token changes."""
    model = build(tok)
    results = [run(model, tok, tmp_path, n) for n in (1, 3, len(QUERIES))]
    reference = results[0]
    ref_scores = reference.scores.sort_values(["query_id", "unit_index"])
    for other in results[1:]:
        scores = other.scores.sort_values(["query_id", "unit_index"])
        assert scores["unit_id"].tolist() == ref_scores["unit_id"].tolist()
        np.testing.assert_allclose(scores["score"], ref_scores["score"], atol=1e-5, rtol=0)
        assert len(other.top_tokens) == len(reference.top_tokens) == 3 * len(QUERIES)
        for mine, ref in zip(other.top_tokens, reference.top_tokens, strict=True):
            assert (mine["query_id"], mine["unit_id"], mine["rank"]) == (
                ref["query_id"], ref["unit_id"], ref["rank"]
            )  # fmt: skip
            np.testing.assert_allclose(mine["token_scores"], ref["token_scores"], atol=1e-5)
