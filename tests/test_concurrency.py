"""Two processes that open one token cache directory at the same moment.

Each child imports everything first, says it is ready, and waits for a shared "go" file, so
both reach ``get_token_cache`` together; the build is slowed down so that, without the lock,
both would find the directory absent and both would build it (the test then sees two builds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bgotrace.cache import TokenCache
from bgotrace.cache.locking import exclusive, lock_path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, logging, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import bgotrace.cache.token_cache as token_cache
from bgotrace.corpus import ChunkingConfig, Document
from tests.conftest import make_tiny_tokenizer

cache_dir, ready, go = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
built = []
write_contents = token_cache._write_contents

def slow_write_contents(*args, **kwargs):
    built.append(True)
    time.sleep(1.0)  # widen the window in which a second builder could slip in
    return write_contents(*args, **kwargs)

token_cache._write_contents = slow_write_contents
tokenizer = make_tiny_tokenizer()
docs = [Document(f"d{i}", f"The quick brown fox number {i} jumps.", "s") for i in range(20)]
ready.touch()
while not go.exists():
    time.sleep(0.01)
cache = token_cache.get_token_cache(
    docs, tokenizer, ChunkingConfig(max_length=8), cache_dir, progress=False
)
print(json.dumps({"built": bool(built), "created_at": cache.manifest["created_at"],
                  "n_units": len(cache)}))
"""


TRUNK_CHILD = r"""
import json, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import torch
import bgotrace.cache.trunk_cache as trunk_cache
from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig, Document
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

cache_dir, ready, go = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
built = []
write_rows = trunk_cache._write_rows

def slow_write_rows(*args, **kwargs):
    built.append(True)
    time.sleep(1.0)  # without the lock, the other process would start its own build here
    return write_rows(*args, **kwargs)

trunk_cache._write_rows = slow_write_rows
tokenizer = make_tiny_tokenizer()
model = tiny_gpt2(tokenizer)
docs = [Document(f"d{i}", f"The quick brown fox number {i} jumps.", "s") for i in range(12)]
cache = get_token_cache(docs, tokenizer, ChunkingConfig(max_length=8), cache_dir, progress=False)
ready.touch()
while not go.exists():
    time.sleep(0.01)
trunk = trunk_cache.get_trunk_cache(
    model, cache, 1, dtype="float32", batch_size=4, pad_id=0, device=torch.device("cpu")
)
print(json.dumps({"built": bool(built), "root": str(trunk.root)}))
"""


def _start(
    tmp_path: Path, name: str, cache_dir: Path, go: Path, child: str = CHILD
) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(REPO), str(cache_dir), str(ready), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    return proc, ready


def _race(tmp_path: Path, cache_dir: Path, child: str) -> list[dict]:
    """Start two children, release them together, and return their reports."""
    go = tmp_path / "go"
    children = [_start(tmp_path, name, cache_dir, go, child) for name in ("a", "b")]
    deadline = time.time() + 120
    while not all(ready.exists() for _, ready in children):
        assert time.time() < deadline and all(p.poll() is None for p, _ in children), [
            p.communicate() for p, _ in children if p.poll() is not None
        ]
        time.sleep(0.05)
    go.touch()
    reports = []
    for proc, _ in children:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_two_processes_build_one_cache_once(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    reports = _race(tmp_path, cache_dir, CHILD)
    assert sorted(r["built"] for r in reports) == [False, True]  # one built, one reused
    assert reports[0]["created_at"] == reports[1]["created_at"]  # the very same build
    cache = TokenCache(cache_dir)  # complete and consistent (checked when opened)
    assert len(cache) == reports[0]["n_units"] > 0
    leftovers = sorted(p.name for p in tmp_path.iterdir() if ".building-" in p.name)
    assert leftovers == []


def test_two_processes_build_one_trunk_cache_once(tmp_path: Path) -> None:
    """Without the lock the second build's rename onto the first one's directory fails."""
    reports = _race(tmp_path, tmp_path / "cache", TRUNK_CHILD)
    assert sorted(r["built"] for r in reports) == [False, True]
    assert reports[0]["root"] == reports[1]["root"]
    assert not list(Path(reports[0]["root"]).parent.glob(".*.tmp-*"))  # no build left behind


def test_lock_excludes_and_is_released_on_exit(tmp_path: Path) -> None:
    target = tmp_path / "trunk"
    with exclusive(target, what="trunk cache"):
        assert lock_path(target).exists()
        # A second holder in another process must wait: it gives up after a short timeout.
        probe = (
            "import sys; sys.path.insert(0, sys.argv[1])\n"
            "from bgotrace.cache.locking import exclusive, CacheLockedError\n"
            "try:\n"
            "    with exclusive(sys.argv[2], timeout=0.3): print('got it')\n"
            "except CacheLockedError as err: print('locked:', err)\n"
        )
        held = subprocess.run(
            [sys.executable, "-c", probe, str(REPO), str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert held.stdout.startswith("locked:") and "another process" in held.stdout
    free = subprocess.run(
        [sys.executable, "-c", probe, str(REPO), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert free.stdout.strip() == "got it", free.stderr
