"""The ``--candidates`` and ``--prefilter`` values, checked without the prefilter itself.

Pure parsing, importing nothing above :mod:`bgotrace.errors`, so the config can check a
run's options before any model or method is loaded (and without importing the prefilter,
which imports the baselines, which import the config).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bgotrace.errors import ConfigError

NOT_PREFILTERS = ("bgo", "untrac-inv")
"""Methods that cannot propose candidates: they are the full sweep that rerank avoids."""

CandidateSpec = int | float | str
"""A count (int >= 1 or its digits), a percentage (``"5%"``) or a fraction in (0, 1)."""


def _bad(spec: Any, why: str) -> ConfigError:
    return ConfigError(
        f"--candidates={spec!r} {why}: give a count of units (200), a percentage of the "
        "corpus (5%) or a fraction of it (0.05)."
    )


def parse_candidates(spec: CandidateSpec) -> tuple[str, float]:
    """``("count", n)`` or ``("fraction", f)`` for a ``--candidates`` value; checks its form."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise _bad(spec, "is not a number")
    text = str(spec).strip()
    if text.endswith("%"):
        value = _number(text[:-1], spec)
        if not 0 < value <= 100:
            raise _bad(spec, "is not a percentage in (0, 100]")
        return "fraction", value / 100
    if isinstance(spec, int) or text.isdigit():
        if int(text) < 1:
            raise _bad(spec, "selects no unit")
        return "count", float(int(text))
    value = _number(text, spec)
    if not 0 < value < 1:
        raise _bad(spec, "is neither a whole count >= 1 nor a fraction in (0, 1)")
    return "fraction", value


def _number(text: str, spec: Any) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(spec, "is not a number") from None
    if not math.isfinite(value):
        raise _bad(spec, "is not finite")
    return value


def check_prefilter(name: str, available: Sequence[str]) -> None:
    """Refuse a prefilter that is unknown or is a full BGO sweep itself."""
    if name in NOT_PREFILTERS:
        raise ConfigError(
            f"--prefilter={name!r} is a full corpus sweep, the cost rerank avoids: "
            "use a cheap method such as bm25, repsim, fisher-graddot or trackstar."
        )
    if name not in available:
        choices = ", ".join(m for m in available if m not in NOT_PREFILTERS)
        raise ConfigError(f"--prefilter={name!r} is unknown: use one of {choices}.")
