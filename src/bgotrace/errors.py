"""Error types shown to users.

Every error a user can cause is a :class:`BgotraceError` whose message states the
rule that was broken and how to fix it, on one line. The CLI prints the message
and exits with code 2; library callers can catch the specific subclasses.
"""

from __future__ import annotations


class BgotraceError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 2


class InputError(BgotraceError):
    """Bad input data or arguments: a corpus, query, option value or file."""


class ConfigError(InputError):
    """An invalid configuration value."""


class CacheMismatchError(BgotraceError):
    """A cache or run directory was made with other settings than the ones asked for."""


class ModelLoadError(BgotraceError):
    """The model directory is missing, unreadable, or not a causal LM."""


class NonFiniteLossError(BgotraceError):
    """The query loss became NaN or infinite while perturbing the model."""


class RunDirectoryError(BgotraceError):
    """The run directory exists, is incomplete, or belongs to another run."""


class DistributedError(BgotraceError):
    """A Ray cluster cannot run the sweep: unreachable, too small, or workers keep dying."""


def first_line(err: BaseException) -> str:
    """First line of a third-party exception's message (its type without one), for our messages."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
