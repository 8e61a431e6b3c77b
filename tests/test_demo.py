"""`bgotrace demo` end to end through the installed console script, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bgotrace.demo import DEMO_PROMPT_DOCS, DEMO_PROMPTS


def test_demo_attributes_its_generation_to_the_right_entry(tmp_path):
    # The script installed beside this interpreter (the venv), whatever PATH says.
    beside = Path(sys.executable).with_name("bgotrace")
    exe = str(beside) if beside.is_file() else shutil.which("bgotrace")
    if exe is None:
        pytest.skip("the bgotrace console script is not installed")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [exe, "demo", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Top 10 units" in proc.stdout
    scores = pd.read_parquet(out / "scores.parquet")
    top = scores.sort_values("rank").iloc[0]
    assert top["doc_id"] == DEMO_PROMPT_DOCS[DEMO_PROMPTS[0]]
    assert top["score"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["queries"][0]["prompt"] == DEMO_PROMPTS[0]
    again = subprocess.run(
        [exe, "demo", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 2 and again.stderr.startswith("error: Run directory")
