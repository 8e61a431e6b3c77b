"""Score variants, declared once: how the losses under θ0, θ+ and θ− become one number per unit.

Each variant is one :class:`ScoreVariant` entry: its ``--score`` name, the model states
whose losses it reads (the engine perturbs and sweeps only those), how it combines them,
the formula and unit the views print, and whether its scores add up. ``--score`` is
checked against this registry when the config is built, so a variant is known to the
config, the engine, the ranking and every view the moment it is registered. Adding one
is one :func:`register_variant` call (the built-ins below are the examples).

All built-in scores are in nats and signed so that high = the unit supports the query:

- ``bidirectional`` (default): L(z; θ−) − L(z; θ+)
- ``ascent`` (UnTrac-Inv):     L(z; θ−) − L(z; θ0)
- ``descent``:                 L(z; θ0) − L(z; θ+)
- ``abs`` (reference scripts): |L(z; θ−) − L(z; θ+)|, which ranks strong opponents
  as high as proponents and is not additive; kept for comparison only.
- ``agree``: min(L(z; θ−) − L(z; θ0), L(z; θ0) − L(z; θ+)): high only when both
  directions support the unit (a unit that only one direction moves ranks low).

This module is on the ground floor (numpy and the error types only): ``config`` below the
stages validates ``--score`` with it, and the stages above read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from bgotrace.errors import ConfigError

ASCENT = "ascent"
"""θ−: K steps of gradient ascent on the query loss."""
DESCENT = "descent"
"""θ+: K steps of gradient descent on the query loss."""
BASE = "base"
"""θ0: the model as loaded."""
STATES = (ASCENT, DESCENT, BASE)
"""Every model state a variant may read."""

Losses = Mapping[str, np.ndarray]
"""Per-unit (or per-token) losses keyed by state name; every array has the same shape."""

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class ScoreVariant:
    """One way of turning per-state losses into scores (high = supports the query)."""

    name: str
    """The ``--score`` value (lower case: letters, digits, ``-``, ``_``)."""
    states: tuple[str, ...]
    """States whose losses ``combine`` reads (a subset of :data:`STATES`); only these are
    perturbed and swept."""
    combine: Callable[[Losses], np.ndarray]
    """Losses by state → scores, elementwise (applied per unit and per token alike)."""
    formula: str
    """The formula as the views print it, e.g. ``L(z; θ−) − L(z; θ+)``."""
    unit: str = "nats"
    """Unit of one score before ``--reduce mean`` (per token) or ``--normalize``."""
    additive: bool = True
    """Signed scores whose sums over units mean something (document and source sums, LDS);
    False for ``abs`` and ``agree``, whose sums LDS refuses."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"Score variant name {self.name!r} is not a CLI word: use lower-case letters, "
                "digits, '-' or '_', starting with a letter."
            )
        unknown = [s for s in self.states if s not in STATES]
        if not self.states or unknown:
            raise ConfigError(
                f"Score variant {self.name!r} reads states {list(self.states)}: name at least "
                f"one, each one of {', '.join(STATES)}."
            )


_VARIANTS: dict[str, ScoreVariant] = {}


def register_variant(variant: ScoreVariant, *, replace: bool = False) -> ScoreVariant:
    """Make ``variant`` a ``--score`` choice; refuse a second variant of the same name."""
    if variant.name in _VARIANTS and not replace:
        raise ConfigError(
            f"Score variant {variant.name!r} is already registered: choose another name, "
            "or pass replace=True to redefine it."
        )
    _VARIANTS[variant.name] = variant
    return variant


def variant_names() -> tuple[str, ...]:
    """The registered ``--score`` values, in registration order."""
    return tuple(_VARIANTS)


def get_variant(name: str) -> ScoreVariant:
    """The variant called ``name``, or a :class:`ConfigError` listing the known ones."""
    if name not in _VARIANTS:
        raise ConfigError(f"--score={name!r} is unknown: use one of {', '.join(_VARIANTS)}.")
    return _VARIANTS[name]


def variants_help() -> str:
    """One line for ``--help``: every registered variant with its formula."""
    return "; ".join(f"{v.name}: {v.formula}" for v in _VARIANTS.values())


def score_losses(name: str, losses: Losses) -> np.ndarray:
    """Combine per-unit (or per-token) losses keyed by state into the scores of ``name``."""
    return get_variant(name).combine(losses)


def _agree(losses: Losses) -> np.ndarray:
    # Both one-sided changes must be large for the minimum to be: a unit that only the
    # ascent (or only the descent) moves gets the smaller, often negative, change.
    return np.minimum(losses[ASCENT] - losses[BASE], losses[BASE] - losses[DESCENT])


for _variant in (
    ScoreVariant(
        "bidirectional",
        (ASCENT, DESCENT),
        lambda losses: losses[ASCENT] - losses[DESCENT],
        "L(z; θ−) − L(z; θ+)",
    ),
    ScoreVariant(
        "ascent",
        (ASCENT, BASE),
        lambda losses: losses[ASCENT] - losses[BASE],
        "L(z; θ−) − L(z; θ0)",
    ),
    ScoreVariant(
        "descent",
        (BASE, DESCENT),
        lambda losses: losses[BASE] - losses[DESCENT],
        "L(z; θ0) − L(z; θ+)",
    ),
    ScoreVariant(
        "abs",
        (ASCENT, DESCENT),
        lambda losses: np.abs(losses[ASCENT] - losses[DESCENT]),
        "|L(z; θ−) − L(z; θ+)|",
        additive=False,
    ),
    ScoreVariant(
        "agree",
        (ASCENT, DESCENT, BASE),
        _agree,
        "min(L(z; θ−) − L(z; θ0), L(z; θ0) − L(z; θ+))",
        additive=False,
    ),
):
    register_variant(_variant)
