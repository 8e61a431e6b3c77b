"""Output writers: every file of a run directory is written by one registered :class:`Writer`.

A writer is a name, a file name and a function ``write(result, path)``. The default
writers (always on) write the tables as Parquet, the per-token changes as JSONL, the
snippets and ``summary.json``; the HTML report registers its own in ``bgotrace.report``.
Optional writers (``default=False``, e.g. ``top_units``) run when named in
``output.formats`` (``--formats top_units``). A user adds an output with one
:func:`register_writer` call before the run.

:func:`save_result` writes each file to ``<name>.part`` and renames it into place, and
always writes ``summary.json`` last: its presence marks a complete run.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bgotrace.errors import ConfigError
from bgotrace.ranking.result import TABLES, AttributionResult
from bgotrace.score.store import CONFIG, STATE, SUMMARY, RunStore

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Writer:
    """One output file of a run directory."""

    name: str
    """Name in ``output.formats`` (``--formats``)."""
    filename: str
    """File written in the run directory (to ``<filename>.part`` first, then renamed)."""
    write: Callable[[AttributionResult, Path], object]
    """Writes the result to the path it is given."""
    default: bool = True
    """Written by every run; False: only when named in ``output.formats``."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"Output writer name {self.name!r} cannot be listed in --formats: use lower-case "
                "letters, digits, '-' or '_', starting with a letter."
            )
        if Path(self.filename).name != self.filename or self.filename in (CONFIG, STATE, ""):
            raise ConfigError(
                f"Output writer {self.name!r} would write {self.filename!r}: give a plain file "
                f"name inside the run directory other than {CONFIG} and {STATE}."
            )


_WRITERS: dict[str, Writer] = {}


def register_writer(writer: Writer, *, replace: bool = False) -> Writer:
    """Add ``writer`` to the outputs; refuse a second writer of the same name or file."""
    clash = [w.name for w in _WRITERS.values() if writer.filename == w.filename]
    if (writer.name in _WRITERS or clash) and not replace:
        raise ConfigError(
            f"Output writer {writer.name!r} ({writer.filename}) clashes with a registered "
            "writer of that name or file: choose another, or pass replace=True."
        )
    _WRITERS[writer.name] = writer
    return writer


def writer_names(*, default: bool) -> tuple[str, ...]:
    """Names of the default (always written) or the optional writers."""
    return tuple(name for name, w in _WRITERS.items() if w.default == default)


def parse_formats(formats: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]`` (``output.formats`` is a comma-separated list)."""
    return [name.strip() for name in formats.split(",") if name.strip()]


def selected_writers(formats: str = "") -> list[Writer]:
    """The default writers, then the optional ones named in ``formats``; summary.json last."""
    names = parse_formats(formats)
    unknown = [n for n in names if n not in _WRITERS]
    if unknown:
        optional = ", ".join(writer_names(default=False)) or "none registered"
        raise ConfigError(
            f"--formats names unknown output(s) {', '.join(unknown)}: use {optional} "
            "(the defaults are always written)."
        )
    chosen = [w for w in _WRITERS.values() if w.default or w.name in names]
    return sorted(chosen, key=lambda w: w.filename == SUMMARY)  # stable: order kept otherwise


def save_result(result: AttributionResult, store: RunStore, writers: Sequence[Writer]) -> None:
    """Write ``result`` through each writer, atomically, in order."""
    for writer in writers:
        store.write_atomic(writer.filename, functools.partial(writer.write, result))


def _table_writer(table: str) -> Writer:
    def write(result: AttributionResult, path: Path) -> None:
        getattr(result, table).to_parquet(path)

    return Writer(table, f"{table}.parquet", write)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_top_tokens(result: AttributionResult, path: Path) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in result.top_tokens))


def _write_snippets(result: AttributionResult, path: Path) -> None:
    _write_text(path, json.dumps(result.snippets, indent=1))


def _write_summary(result: AttributionResult, path: Path) -> None:
    _write_text(path, json.dumps(result.summary, indent=2, default=str))


TOP_UNITS_COLUMNS = ["query_id", "rank", "unit_id", "doc_id", "source", "score"]


def top_units_table(result: AttributionResult, k: int) -> pd.DataFrame:
    """Each query's (and span's) top-k units, best first: :data:`TOP_UNITS_COLUMNS`."""
    ids = dict.fromkeys(result.scores["query_id"])
    return pd.concat([result.top(k, query_id=q)[TOP_UNITS_COLUMNS] for q in ids], ignore_index=True)


def _write_top_units(result: AttributionResult, path: Path) -> None:
    output = (result.summary.get("config") or {}).get("output") or {}
    top_units_table(result, int(output.get("top_k", 10))).to_csv(path, index=False)


for _writer in (
    *(_table_writer(t) for t in TABLES.values()),
    Writer("top_tokens", "top_tokens.jsonl", _write_top_tokens),
    Writer("snippets", "snippets.json", _write_snippets),
    Writer("summary", SUMMARY, _write_summary),
    Writer("top_units", "top_units.csv", _write_top_units, default=False),
):
    register_writer(_writer)
