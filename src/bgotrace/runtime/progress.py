"""Progress bars (rich), silenced for library use or with ``--quiet``."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_enabled = True


def set_progress(enabled: bool) -> None:
    """Turn every progress bar on or off (the CLI's ``--quiet`` turns them off)."""
    global _enabled
    _enabled = enabled


def _columns() -> tuple:
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` under a rich progress bar on stderr (when enabled)."""
    if not _enabled:
        yield from items
        return
    with Progress(*_columns(), console=Console(file=sys.stderr)) as progress:
        yield from progress.track(items, total=total, description=description)


class Advance(Protocol):
    def __call__(self, n: int, status: str = "") -> None: ...


@contextmanager
def progress_task(description: str, total: int, *, enabled: bool = True) -> Iterator[Advance]:
    """A bar advanced by hand: ``with progress_task(...) as advance: advance(n, "status")``."""
    if not (_enabled and enabled):
        yield lambda n, status="": None
        return
    columns = (*_columns(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(file=sys.stderr)) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int, status: str = "") -> None:
            progress.update(task, advance=n, status=status)

        yield advance
