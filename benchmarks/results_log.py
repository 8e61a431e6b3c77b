"""Print a benchmark's Markdown table and append it to benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(lines: list[str], record: bool = True) -> None:
    """Print the lines; append them to RESULTS.md too unless ``record`` is False (smoke runs)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if record:
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(text)
