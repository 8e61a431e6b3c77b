"""The sweep on a real two-node Ray cluster: same scores as the local sweep, spread over
both nodes, and surviving a SIGKILLed worker and a SIGKILLed driver.

The cluster (:mod:`tests.ray_cluster`) is started once for the module and stopped at
the end. Tolerance: the workers run the same batches as the local sweep (same blocks,
same length buckets), so scores match to float32 noise; atol=1e-5 nats as in
test_invariance (a wrong or missing block changes scores by > 1e-3).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bgotrace
from bgotrace.cache import TokenCache
from bgotrace.cli.main import app
from bgotrace.config import ExecutionConfig, PerturbConfig, ScoreConfig
from bgotrace.corpus import Document
from bgotrace.errors import DistributedError
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.sensitivity import unit_gradient_norms
from bgotrace.query import Query
from tests.ray_cluster import ENV, free_port, start_cluster

pytestmark = pytest.mark.dist
ray = pytest.importorskip("ray")

ATOL = 1e-5
WORDS = "fox dog cat river sea sand Paris Rome capital water boils ice model token".split()
DOCS = [
    Document(f"d{i}", " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + i % 5)), "s")
    for i in range(60)
]
LONG_DOCS = [Document(f"{d.doc_id}.{r}", d.text, d.source) for r in range(10) for d in DOCS]
"""A sweep long enough (~1,100 blocks) that a node can be lost in its middle under any load
(two blocks in flight per worker finish the 60-document sweep in well under a second)."""
QUERIES = [Query("capital", "Paris is the capital of", " France.")]
MANY = [
    *QUERIES,
    Query("water", "Water boils at", " one hundred degrees."),
    Query("fox", "The quick brown", " fox jumps."),
]
CONFIG = {
    "corpus": {"max_length": 8, "stride": 2},
    "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 1},
    "scoring": {"block_units": 2},
    "output": {"top_tokens": 0},
}


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    c = start_cluster()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local(model, tok, tmp_path_factory):
    return attribute(model, tok, tmp_path_factory.mktemp("local"))


def attribute(
    model, tok, tmp_path: Path, out=None, queries=QUERIES, per_sweep=1, docs=DOCS, **scoring
):
    config = json.loads(json.dumps(CONFIG))
    config["corpus"]["cache_dir"] = str(tmp_path / "cache")
    config["scoring"].update(scoring, queries_per_sweep=per_sweep)
    config["execution"] = _execution_of(config["scoring"])
    return bgotrace.attribute(model, tok, docs, queries=queries, config=config, out=out)


def _execution_of(scoring: dict) -> dict:
    """The keys of ``scoring`` that belong to the ``execution`` section, moved there."""
    return {k: scoring.pop(k) for k in list(scoring) if k in ExecutionConfig.__dataclass_fields__}


def by_unit(result) -> dict[tuple[str, str], float]:
    return {(r.query_id, r.unit_id): r.score for r in result.scores.itertuples()}


def assert_same(a, b) -> None:
    x, y = by_unit(a), by_unit(b)
    assert x.keys() == y.keys()
    keys = sorted(x)
    np.testing.assert_allclose([x[k] for k in keys], [y[k] for k in keys], atol=ATOL, rtol=0)


class Records(logging.Handler):
    """Log records of bgotrace.dist, readable from another thread while a run goes on."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def values(self, key: str) -> list:
        return [getattr(r, key) for r in list(self.records) if hasattr(r, key)]


@pytest.fixture
def records():
    handler, logger = Records(), logging.getLogger("bgotrace.dist")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_worker_binds_a_group_once_for_all_its_blocks(cluster, tok, monkeypatch):
    """A worker fetches and binds a group's states on the group's first block, reuses them for
    the rest, and replaces them when the next group comes (the worker in this process)."""
    from bgotrace.dist import worker as worker_module
    from bgotrace.dist.worker import SweepWorker, WorkerSetup
    from tests.models import tiny_gpt2

    binds = []
    real = worker_module.bind_group
    monkeypatch.setattr(worker_module, "bind_group", lambda *a: binds.append(a) or real(*a))
    threads, model = torch.get_num_threads(), tiny_gpt2(tok)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        worker = SweepWorker(model, WorkerSetup(None, {}, False, 2, 0, "cpu"))
        moved = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
        first, second = ray.put([moved, None]), ray.put([None])
        bound = worker._group_states((0, [first]))
        assert worker._group_states((0, [first])) is bound  # the group's next block
        assert len(bound) == 2 and len(binds) == 1
        replaced = worker._group_states((1, [second]))
        assert len(replaced) == 1 and len(binds) == 2 and worker.group == (1, replaced)
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)  # the worker set this process's to its CPUs


def test_sweep_spreads_over_both_nodes_and_equals_local(cluster, model, tok, local, tmp_path,
                                                        records):  # fmt: skip
    spread = attribute(model, tok, tmp_path, workers=2, ray_address=cluster.address)
    assert_same(local, spread)
    (per_node,) = records.values("blocks_per_node")
    assert len(per_node) == 2 and min(per_node.values()) > 0  # both nodes computed blocks
    assert cluster.alive_nodes() == 2  # a joined cluster is left running
    assert not ray.is_initialized()  # ... and this process disconnected


def test_the_normaliser_spreads_over_the_workers_and_equals_local(cluster, model, tok, tmp_path,
                                                                 records):  # fmt: skip
    """--normalize sensitivity's blocks (block_units=2) run on the workers' sweep models, on
    both nodes, into the same norms as this process's (the same batches of the same units:
    rtol 1e-6, float32 noise of another thread count at most)."""
    attribute(model, tok, tmp_path, workers=2, ray_address=cluster.address)
    (per_node,) = records.values("normaliser_blocks_per_node")
    assert len(per_node) == 2 and min(per_node.values()) > 0
    cache = TokenCache(tmp_path / "cache")
    (path,) = (tmp_path / "cache" / "sensitivity").glob("*.npz")
    with np.load(path) as data:
        assert data["computed"].all()
        there = data["norms"]
    names = select_parameters(model, PerturbConfig().params)
    here = [
        unit_gradient_norms(
            model, cache, names, torch.device("cpu"), batch_size=ScoreConfig().batch_size,
            indices=np.arange(start, min(start + 2, len(cache))),
        )[0]
        for start in range(0, len(cache), 2)
    ]  # fmt: skip
    np.testing.assert_allclose(there, np.concatenate(here), rtol=1e-6)


def test_queries_are_perturbed_on_the_workers_into_the_same_states(cluster, model, tok,
                                                                  tmp_path, records):  # fmt: skip
    """θ± of 3 queries computed on both nodes: the same fingerprints as this process's."""
    here = attribute(model, tok, tmp_path, out=tmp_path / "here", queries=MANY, per_sweep=3)
    there = attribute(
        model, tok, tmp_path, out=tmp_path / "there", queries=MANY, per_sweep=3,
        workers=2, ray_address=cluster.address,
    )  # fmt: skip
    (per_node,) = records.values("perturbations_per_node")
    assert sum(per_node.values()) == 2 * len(MANY) and len(per_node) == 2
    state = [json.loads((tmp_path / d / "state.json").read_text()) for d in ("here", "there")]
    assert state[0]["group000"] == state[1]["group000"]  # bit-identical θ+ and θ−
    assert_same(here, there)


def test_shipped_blocks_give_the_same_scores(cluster, model, tok, local, tmp_path, records):
    """--ship-cache always: no worker opens the cache; blocks travel by the object store."""
    shipped = attribute(
        model, tok, tmp_path, workers=2, ray_address=cluster.address, ship_cache="always"
    )
    assert_same(local, shipped)
    assert all("shipped" in r.getMessage() for r in records.records if hasattr(r, "worker_pid"))


def _kill_a_worker_mid_sweep(records: Records, shards: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = records.values("worker_pid")
        if len(pids) == 2 and any(shards.rglob("*.npz")):
            os.kill(pids[0], signal.SIGKILL)  # the process, not an exception in a task
            killed.append(pids[0])
            return
        time.sleep(0.01)


def test_sigkilled_worker_is_replaced_and_scores_are_identical(cluster, model, tok, local,
                                                               tmp_path, records):  # fmt: skip
    out, killed = tmp_path / "run", []
    killer = threading.Thread(
        target=_kill_a_worker_mid_sweep, args=(records, out / "shards", killed)
    )
    killer.start()
    result = attribute(model, tok, tmp_path, out=out, workers=2, ray_address=cluster.address)
    killer.join()
    assert killed, "the sweep ended before a worker could be killed"
    assert records.values("blocks_deaths") == [1]  # the run saw the death and went on
    assert (out / "summary.json").exists()
    assert_same(local, result)


def test_workers_the_cluster_cannot_place_fail_with_what_is_missing(cluster, model, tok,
                                                                   tmp_path):  # fmt: skip
    with pytest.raises(DistributedError, match=r"started 0 of 1 workers.*GPU 1.*GPU 0"):
        attribute(
            model, tok, tmp_path, workers=1, ray_address=cluster.address,
            gpus_per_worker=1, ray_timeout=3,
        )  # fmt: skip
    assert not ray.is_initialized()
    assert cluster.alive_nodes() == 2


# --- --candidates and --autocast on the workers -------------------------------------------
def _norm_store(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(norms, computed) of the normaliser's store beside a token cache."""
    (path,) = (cache_dir / "sensitivity").glob("*.npz")
    with np.load(path) as data:
        return data["norms"], data["computed"]


@pytest.mark.parametrize("ship_cache", ["auto", "always"])
def test_candidates_rerank_on_the_run_workers_and_equal_local(cluster, model, tok, tmp_path,
                                                              records, monkeypatch,
                                                              ship_cache):  # fmt: skip
    """--candidates with workers: every rerank group's blocks and perturbations, and the
    candidates' normaliser blocks, run on the two workers the run started once (one executor
    for the run), into this process's scores (the same batches of the same units, rtol 1e-6;
    NaN on the same non-candidates) and norms of the same units. ``auto``: the workers read
    the candidates from the cache by path (corpus indices travel); ``always``: shipped."""
    from bgotrace.perturb import sensitivity

    monkeypatch.setattr(sensitivity, "REFERENCE_UNITS", 5)  # candidates ∪ sample < corpus
    kw = {"queries": MANY, "candidates": 6}
    here = attribute(model, tok, tmp_path / "here", **kw)
    there = attribute(model, tok, tmp_path / "there", workers=2, ray_address=cluster.address,
                      ship_cache=ship_cache, **kw)  # fmt: skip
    x, y = by_unit(here), by_unit(there)
    keys = sorted(x)
    assert x.keys() == y.keys()
    a, b = np.array([x[k] for k in keys]), np.array([y[k] for k in keys])
    assert 0 < np.isfinite(a).sum() < len(a)  # some units reranked, the rest unscored
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    groups = records.values("blocks_per_node")
    assert len(groups) == len(MANY)  # one rerank sweep per query group, each on the workers
    assert all(sum(g.values()) > 0 for g in groups)
    perturbed = records.values("perturbations_per_node")  # one log per group
    assert sum(sum(p.values()) for p in perturbed) == 2 * len(MANY)
    (norm_blocks,) = records.values("normaliser_blocks_per_node")
    assert sum(norm_blocks.values()) > 0
    assert len(records.values("worker_pid")) == 2  # the workers started once for the run
    (norms_here, done_here), (norms_there, done_there) = (
        _norm_store(tmp_path / d / "cache") for d in ("here", "there")
    )
    assert 0 < done_here.sum() < len(done_here)
    np.testing.assert_array_equal(done_here, done_there)  # the candidates' units, no others
    np.testing.assert_allclose(norms_there[done_there], norms_here[done_here], rtol=1e-6)


def test_autocast_reaches_the_workers(cluster, model, tok, local, tmp_path, records):
    """--autocast with workers: each worker sweeps its blocks under the driver's bfloat16
    autocast (rtol 1e-5: the same batches under the same autocast, another thread count),
    which moves the scores far from the float32 run's (so the flag arrived there)."""
    here = attribute(model, tok, tmp_path / "here", autocast=True)
    there = attribute(model, tok, tmp_path / "there", autocast=True, workers=2,
                      ray_address=cluster.address)  # fmt: skip
    assert sum(records.values("blocks_per_node")[0].values()) > 0
    x, y, f = by_unit(here), by_unit(there), by_unit(local)
    keys = sorted(x)
    a, b, c = (np.array([d[k] for k in keys]) for d in (x, y, f))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=0)
    assert not np.allclose(b, c, rtol=1e-3, atol=0)  # not the float32 sweep


# --- the driver killed mid-sweep, then --resume -------------------------------------------
def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("bgotrace")), *map(str, args)]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_killed_driver_resumes_with_identical_scores(cluster, model_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS))
    args = [
        "attribute", "--model", model_dir, "--corpus", corpus, "--quiet",
        "--cache-dir", tmp_path / "cache", "--max-length", 8, "--stride", 2,
        "--optimizer", "adam", "--lr", 3e-3, "--steps", 1, "--block-units", 2,
        "--top-tokens", 0, "--prompt", "Paris is the capital of", "--completion", " France.",
    ]  # fmt: skip
    env = {**os.environ, **ENV}
    assert invoke(*args, "--out", tmp_path / "local").exit_code == 0
    out = tmp_path / "ray"
    ray_args = [*args, "--out", out, "--workers", 2, "--ray-address", cluster.address]
    driver = subprocess.Popen(_cli(*ray_args), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any((out / "shards").rglob("*.npz")) and time.monotonic() < deadline:
        assert driver.poll() is None, driver.stderr.read().decode()
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.npz")}
    assert not (out / "summary.json").exists() and before
    resumed = invoke(*ray_args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert {p: p.stat().st_mtime_ns for p in before} == before  # written blocks not redone
    a = bgotrace.AttributionResult.load(tmp_path / "local")
    b = bgotrace.AttributionResult.load(out)
    assert_same(a, b)
    assert cluster.alive_nodes() == 2  # the killed driver's workers went, the cluster stayed


def test_local_workers_start_and_stop_a_private_ray(model, tok, local, tmp_path, records):
    """No --ray-address: a Ray instance of this run only, gone when the run ends."""
    spread = attribute(model, tok, tmp_path, workers=2)
    assert_same(local, spread)
    assert sum(records.values("blocks_per_node")[0].values()) > 0
    assert not ray.is_initialized()


def test_an_address_nobody_answers_is_one_error_line(model_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": DOCS[0].text}) + "\n")
    result = invoke(
        "attribute", "--model", model_dir, "--corpus", corpus, "--quiet", "--max-length", 8,
        "--cache-dir", tmp_path / "cache", "--prompt", "Paris is", "--completion", " France.",
        "--workers", 1, "--ray-address", f"127.0.0.1:{free_port()}", "--out", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error: Nothing answers at --ray-address=127.0.0.1:" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "summary.json").exists()


# --- last: it takes node2 away for good ---------------------------------------------------
def test_losing_a_node_mid_sweep_leaves_the_run_to_the_other(cluster, model, tok, tmp_path,
                                                             records):  # fmt: skip
    """Node2 (raylet and its worker) SIGKILLed: the head's worker finishes the sweep (the
    lost worker cannot restart: its node is gone and the head has no free CPU). No
    normaliser: its 1,110 blocks of LONG_DOCS would cost a minute and are not what is lost
    here (test_the_normaliser_spreads_over_the_workers_and_equals_local covers them)."""
    out, ended = tmp_path / "run", threading.Event()

    def lose_node2() -> None:
        while not any((out / "shards").rglob("*.npz")):
            if ended.wait(0.01):
                return
        os.killpg(cluster.nodes[1].pid, signal.SIGKILL)

    killer = threading.Thread(target=lose_node2)
    killer.start()
    try:
        result = attribute(
            model, tok, tmp_path, out=out, workers=2, ray_address=cluster.address,
            ray_timeout=60, docs=LONG_DOCS, normalize="none",
        )  # fmt: skip
    finally:
        ended.set()
    killer.join()
    assert records.values("blocks_deaths")[-1] >= 1  # the lost worker's block was redone
    assert (out / "summary.json").exists()
    assert_same(attribute(model, tok, tmp_path / "local", docs=LONG_DOCS, normalize="none"), result)


# --- the trunk cache read by the workers ---------------------------------------------------
# One worker: it runs after the node-loss test above, so only the head may be left.
# bfloat16 rows move most scores here by 2e-5..4e-5 nats (tests/test_trunk_cache.py bounds
# that by 1e-2), while a worker reading the same rows in the same batches as this process
# matches it to float32 noise: compared at TRUNK_ATOL, equal scores show which trunk the
# worker used.
TRUNK_ATOL = 1e-6


def assert_close(a, b, atol: float = TRUNK_ATOL) -> None:
    x, y = by_unit(a), by_unit(b)
    assert x.keys() == y.keys()
    keys = sorted(x)
    np.testing.assert_allclose([x[k] for k in keys], [y[k] for k in keys], atol=atol, rtol=0)


def _last1(model, tok, tmp_path: Path, **scoring):
    config = json.loads(json.dumps(CONFIG))
    config["corpus"]["cache_dir"] = str(tmp_path / "cache")
    config["perturb"]["params"] = "last:1"
    config["scoring"].update(scoring, trunk_cache_dtype="bfloat16")
    config["execution"] = _execution_of(config["scoring"])
    return bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=config)


def test_workers_read_the_warm_trunk_cache_by_path(cluster, model, tok, tmp_path, records):
    plain = _last1(model, tok, tmp_path)
    local = _last1(model, tok, tmp_path, trunk_cache=True)  # builds it, then sweeps with it
    a, b = by_unit(plain), by_unit(local)
    assert np.median([abs(a[k] - b[k]) for k in a]) > 10 * TRUNK_ATOL  # bfloat16 rounding shows
    spread = _last1(model, tok, tmp_path, trunk_cache=True, workers=1, ray_address=cluster.address)
    assert_close(local, spread)
    assert records.values("worker_trunk") == ["by path"]
    assert not records.values("trunk_blind_workers")


def test_a_worker_that_cannot_read_the_trunk_cache_computes_the_trunk(cluster, model, tok,
                                                                       tmp_path, records,
                                                                       monkeypatch):  # fmt: skip
    from bgotrace.dist.trunk import TrunkSource

    plain = _last1(model, tok, tmp_path)
    elsewhere = classmethod(lambda cls, c: cls(str(tmp_path / "not-on-this-node"), c.manifest))
    monkeypatch.setattr(TrunkSource, "of", elsewhere)  # as if the path were not mounted there
    spread = _last1(model, tok, tmp_path, trunk_cache=True, workers=1, ray_address=cluster.address)
    assert_close(plain, spread)  # the computed trunk, not the bfloat16 rows
    assert records.values("worker_trunk") == ["computed"]
    assert records.values("trunk_blind_workers") == [[0]]  # one warning for the run


def test_a_worker_refuses_another_or_a_truncated_trunk_cache_at_the_path(model, tok, tmp_path):
    """What a worker checks on its node before it reads rows (no Ray needed)."""
    from bgotrace.cache.trunk_cache import ROWS
    from bgotrace.dist.trunk import TrunkSource, open_trunk_at

    _last1(model, tok, tmp_path, trunk_cache=True)
    (root,) = (tmp_path / "cache" / "trunk").glob("[!.]*")
    source = TrunkSource(str(root), json.loads((root / "manifest.json").read_text()))
    assert open_trunk_at(source)[0] is not None
    other = TrunkSource(source.root, {**source.manifest, "model_fingerprint": "another model"})
    assert open_trunk_at(other) == (None, f"{root} on this node is another trunk cache "
                                          "(model_fingerprint differ)")  # fmt: skip
    with open(root / ROWS, "r+b") as rows:
        rows.truncate(rows.seek(0, 2) - 2)  # a copy that stopped short
    assert "is incomplete" in open_trunk_at(source)[1]
    assert "not readable" in open_trunk_at(TrunkSource(str(tmp_path / "x"), {}))[1]


def test_shipped_slices_find_their_trunk_rows(model, tok, tmp_path):
    """A block shipped to a worker (of the cache, or of a subset view) is read with the rows
    of its own corpus units: the sums of the same units swept here (no Ray needed)."""
    import torch

    from bgotrace.cache import TokenCache
    from bgotrace.cache.trunk_cache import TrunkCache
    from bgotrace.dist.units import UnitSlice
    from bgotrace.prefilter.rerank import SubsetUnits
    from bgotrace.score.executor import Block, compute_block

    _last1(model, tok, tmp_path, trunk_cache=True)
    cache = TokenCache(tmp_path / "cache")
    (root,) = (tmp_path / "cache" / "trunk").glob("[!.]*")
    trunk = TrunkCache(root)
    params = dict(model.named_parameters())
    top = {n: p.detach() + 0.05 * torch.ones_like(p) for n, p in params.items() if ".h.1." in n}
    states, block = [None, top], Block(3, 1, 4)
    kw = {"batch_size": 2, "pad_id": 0, "device": torch.device("cpu")}
    for units in (cache, SubsetUnits(cache, np.array([7, 2, 40, 11, 3]))):
        _, want, _ = compute_block(model, units, block, states, trunk_rows=trunk.for_units(units),
                                   **kw)  # fmt: skip
        part = UnitSlice.of_block(units, block)
        rows = trunk.for_units(part)  # what the worker does
        _, got, _ = compute_block(model, part, part.local_block(block), states, trunk_rows=rows,
                                  **kw)  # fmt: skip
        np.testing.assert_allclose(got, want, atol=TRUNK_ATOL, rtol=0)
