"""One interface for every attribution method: prepare once, then score queries.

An :class:`Attributor` is built by name (``get_attributor("trackstar", proj_dim=512)``),
prepared once per model and corpus (a BM25 index, per-unit gradients, EK-FAC factors…)
and then scores any number of queries::

    ctx = MethodContext(model, tokenizer, cache)
    method = get_attributor("gradcos")
    method.prepare(ctx)
    scores = method.score(encoded_queries)     # (n_queries, n_units) float64

Sign convention shared by all methods: **high = the unit supports the query** (training on
it made the query's completion more likely). Each method's docstring states its units.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bgotrace.cache import TokenCache
from bgotrace.config import build_section
from bgotrace.errors import ConfigError
from bgotrace.query import EncodedQuery

log = logging.getLogger(__name__)

A = TypeVar("A", bound="type[Attributor]")


@dataclass
class MethodContext:
    """The model and corpus an attributor is prepared for."""

    model: torch.nn.Module
    """The causal LM whose training data is attributed (in eval mode, float32 recommended)."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer (pad id for batching)."""
    cache: TokenCache
    """Token cache of the training units; scores come in its unit order."""
    device: torch.device | None = None
    """Device to compute on; defaults to the model's device."""
    seed: int = 0
    """Seed of every random choice (random scores, projections, Fisher sample, sampled labels)."""
    params: str = "all"
    """Parameters whose gradients count: ``all | last:N | regex:PATTERN`` (as ``--params``)."""
    batch_size: int = 16
    """Units per forward pass where a method batches units."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method options by method name, e.g. ``{"trackstar": {"proj_dim": 512}}``.

    Options given to :func:`get_attributor` take precedence over these."""

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = next(self.model.parameters()).device
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        unknown = sorted(set(self.options) - set(_REGISTRY))
        if unknown:
            raise ConfigError(
                f"MethodContext.options names unknown method(s) {unknown}: "
                f"use one of {', '.join(available_methods())}."
            )

    @property
    def n_units(self) -> int:
        return len(self.cache)

    @property
    def pad_id(self) -> int:
        """Padding id; padded positions are masked out of every loss and pooling."""
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def torch_device(self) -> torch.device:
        assert self.device is not None  # set in __post_init__
        return self.device


@dataclass
class NoOptions:
    """A method without options."""


class Attributor(ABC):
    """A training data attribution method: ``prepare`` once, ``score`` many times.

    Subclasses set ``name`` (through :func:`register`), ``Options`` (a dataclass whose
    fields are the method's options) and implement ``_prepare`` and ``_score``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        self._given = dict(options)
        self.opts: Any = self._build_options(options)  # fail fast on unknown options
        self.ctx: MethodContext | None = None

    def _build_options(self, values: Mapping[str, Any]) -> Any:
        return build_section(self.Options, dict(values), f"method {self.name}")

    def context_defaults(self, ctx: MethodContext) -> dict[str, Any]:
        """Option values taken from the context unless given (e.g. BGO's ``params``)."""
        return {}

    def prepare(self, ctx: MethodContext) -> None:
        """Fit or cache what this method needs for ``ctx``'s model and corpus."""
        given = {**self.context_defaults(ctx), **ctx.options.get(self.name, {}), **self._given}
        self.opts = self._build_options(given)
        ctx.model.eval()  # scores must not depend on dropout masks
        self.ctx = None  # a failed prepare leaves the method unprepared
        self._prepare(ctx)
        self.ctx = ctx

    def score(self, queries: Sequence[EncodedQuery]) -> np.ndarray:
        """Scores (n_queries, n_units) float64; high = the unit supports the query."""
        ctx = self._prepared()
        if not queries:
            return np.zeros((0, ctx.n_units), dtype=np.float64)
        scores = np.asarray(self._score(list(queries)), dtype=np.float64)
        if scores.shape != (len(queries), ctx.n_units):
            raise RuntimeError(
                f"{self.name} returned scores of shape {scores.shape}, "
                f"expected {(len(queries), ctx.n_units)}"
            )
        return scores

    def _prepared(self) -> MethodContext:
        if self.ctx is None:
            raise ConfigError(
                f"Method {self.name!r} was asked to score before prepare(ctx): "
                "call prepare with the model and token cache first."
            )
        return self.ctx

    @abstractmethod
    def _prepare(self, ctx: MethodContext) -> None: ...

    @abstractmethod
    def _score(self, queries: list[EncodedQuery]) -> np.ndarray: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.opts})"


# --- registry ---------------------------------------------------------------------------

_REGISTRY: dict[str, type[Attributor]] = {}


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an :class:`Attributor` available as ``name``."""

    def decorate(cls: A) -> A:
        if name in _REGISTRY:
            raise ValueError(f"attribution method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_attributor(name: str, **options: Any) -> Attributor:
    """A fresh, unprepared attributor; unknown names and options raise ConfigError."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"Unknown attribution method {name!r}: use one of {', '.join(available_methods())}."
        )
    return _REGISTRY[name](**options)


def option_names(cls: type) -> list[str]:
    """Field names of an options dataclass (for error messages and docs)."""
    return [f.name for f in dataclasses.fields(cls)]
