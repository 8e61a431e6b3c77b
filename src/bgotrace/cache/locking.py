"""Inter-process locks for cache directories that several runs may build at once.

Two runs that share a cache directory must neither both build it (wasted hours on a large
corpus) nor interleave their writes (a corrupt cache). Whoever checks-and-builds a cache holds
an exclusive lock on a sibling file ``.NAME.lock`` for the whole check-and-build; another run
waits for it, then finds the cache complete and reuses it. The directory itself is still
built elsewhere and renamed into place, so readers that do not lock never see half a cache.

The lock is an OS file lock (``filelock``: ``flock`` on POSIX), so a process that dies, even
by SIGKILL, releases it: a crash never leaves a stale lock to delete by hand. Lock files are
left in place, since deleting one races with a process that is about to lock it.

Usage::

    with exclusive(cache_root, what="token cache"):
        if not complete(cache_root):
            build_into_temp_and_rename(cache_root)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from bgotrace.errors import CacheMismatchError, InputError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
"""How often a waiting process retries the lock."""


class CacheLockedError(CacheMismatchError):
    """Another process held a cache's lock for longer than the caller would wait."""


class CacheLocationError(InputError):
    """The folder of a cache cannot be created (a parent is a file, a read-only mount)."""


def lock_path(target: str | Path) -> Path:
    """The lock file guarding ``target``: a hidden sibling, so ``target`` can be replaced."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def exclusive(
    target: str | Path, *, what: str = "cache", timeout: float | None = None
) -> Iterator[None]:
    """Hold the lock of ``target`` (a directory that may not exist yet) inside the block.

    Waits as long as another process holds it (``timeout=None``), saying once that it waits;
    with a ``timeout`` in seconds, raises :class:`CacheLockedError` when it runs out.
    """
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheLocationError(
            f"Cannot create {path.parent} for the {what} {target} ({err.strerror}): "
            "choose another cache directory."
        ) from None
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("Waiting for another process that is using the %s %s.", what, target)
        _wait(lock, target, what, timeout)
    try:
        yield
    finally:
        lock.release()


def _wait(lock: FileLock, target: str | Path, what: str, timeout: float | None) -> None:
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=POLL_SECONDS)
    except Timeout:
        raise CacheLockedError(
            f"The {what} {target} stayed locked by another process for {timeout:g} s: "
            "wait for that run to finish, or choose another cache directory."
        ) from None
