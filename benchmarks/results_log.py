"""Print a benchmark's Markdown table and append it to benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(text)
