"""Per-stage memory and time estimates of an attribution run, before anything heavy runs.

Formulas (bytes; N all parameters, P the selected ones, b_m the model dtype's bytes, b_s the
sweep dtype's, b_w = b_m the perturbation's working dtype, Q queries per sweep, S states per
query (2 for bidirectional/abs, else 1), B batch size, T unit length, h hidden width, I MLP
width, a heads, V vocabulary, L blocks):

- load:          N·b_m                                   (host too: weights pass through it)
- normaliser:    N·b_m + sweep copy + activations(B, T) in b_s (the norms are taken of the
                 sweep model) through the L' blocks a backward crosses + the output gradients
                 the ghost norms record, O = L'·B·T·(3h + 1.5·I) + B·T·V elements in b_s (kept
                 in b_s with the inputs; below float32 a chunk of units is upcast at a time:
                 ``ghost_norms.upcast_transient_bytes(B, T, V + h)``), + U·b_s for the U
                 selected parameters they do not cover (one unit at a time)
- perturbation:  N·b_m + sweep copy + (Q−1)·S·P·b_w (the group's earlier states)
                 + P·b_w (working copy) + moments + gradients + θ+ (on the device on CPU,
                 in host memory on a GPU) + activations(1, T) through L' blocks + update chunk
                 moments: adam 2·P·(4 for float32, 2 for half: bfloat16 moments), fisher
                 2·P·4 (diagonal + denominators), sgd 0; gradients: 2·P·b_w in float32 (θ0's,
                 shared by both directions, and the current one), P·b_w in half precision
                 (see :mod:`bgotrace.perturb.steps` and :mod:`bgotrace.perturb.lowp`)
- sweep:         N·b_m + sweep copy + Q·S·P·b_s + L-independent inference activations
                 B·T·(4h + 2I + a·T)·b_s (one block at a time) + LM-head chunk 256·V·(b_s + 8);
                 with ``--autocast`` activations and chunk in 2 bytes, plus the bfloat16 cast
                 of the largest weight matrix, 2·h·max(V, I) (one op's, never all of them)
                 + the sweep window's earlier batches, W·(h·b_s + 4·T + 24) for W =
                 ``score.sweep.WINDOW_TOKENS`` (or the corpus's tokens, if fewer) when B·T is
                 below it (their trunk outputs, h·b_s only with a split, masks, ids, labels and
                 positions; else one batch per window)
- top tokens:    N·b_m + sweep copy + S·P·b_s + activations of one unit

with sweep copy = N·b_s when the sweep dtype differs from the model's (else 0), L' the blocks
from the first one holding a selected parameter to the last (L when the selection reaches
below them), and training activations(B, T) through L' blocks =
L'·B·T·((8h + 3I) + 2·a·T)·b_w + B·T·V·(b_w + 4) (saved for backward, eager attention's
probabilities included; the query's length is taken as T, an upper bound).
Host memory adds :data:`RUNTIME_BYTES` (Python, torch, transformers) and, when the corpus's
cache manifest is known, its token memmap pages (4 bytes per token).

Time is ESTIMATED from FLOPs: 2·N per token and state for a forward, ×3 with the backward,
at the sustained throughputs of :data:`THROUGHPUT` (assumed, never measured here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bgotrace.perturb.ghost_norms import upcast_transient_bytes
from bgotrace.perturb.lowp import update_transient_bytes
from bgotrace.plan.shape import ModelShape
from bgotrace.score.sweep import WINDOW_TOKENS

RUNTIME_BYTES = 500 * 2**20
"""Resident memory of Python + torch + transformers + bgotrace once imported (measured on
CPU: ~500 MiB)."""

THROUGHPUT = {("cuda", 4): 100e12, ("cuda", 2): 400e12, ("cpu", 4): 0.2e12, ("cpu", 2): 0.1e12}
"""ASSUMED sustained FLOP/s by (device type, bytes per weight): an H100-class GPU at ~40% of
its dense bf16 peak (TF32 at ~20%), a many-core CPU; used only for the ESTIMATED times."""

HEAD_CHUNK = 256
"""Tokens per LM-head chunk of the sweep (``bgotrace.modeling.losses.HEAD_CHUNK_ROWS``)."""


@dataclass(frozen=True)
class RunShape:
    """The run options the plan depends on."""

    model_bytes: int
    """Bytes per weight of the model dtype (4 float32, 2 bfloat16/float16)."""
    sweep_bytes: int
    """Bytes per weight of the sweep dtype."""
    optimizer: str
    """adam | sgd | fisher."""
    queries_per_sweep: int
    """Q: queries whose states share one sweep."""
    states_per_query: int
    """S: perturbed states per query (2 for bidirectional/abs, 1 for ascent/descent)."""
    batch_size: int
    """B: units per sweep batch."""
    unit_length: int
    """T: tokens per unit (and the query's length bound)."""
    normalize: bool
    """Whether the per-unit gradient-norm normaliser runs."""
    device_type: str
    """cpu | cuda: on CPU the device's memory is the host's."""
    corpus_tokens: int | None = None
    """Tokens of the corpus's token cache, when known (for host pages and time)."""
    autocast: bool = False
    """``--autocast``: the sweep's activations in bfloat16, its weights and states as loaded."""

    def __post_init__(self) -> None:
        if min(self.queries_per_sweep, self.states_per_query, self.batch_size) < 1:
            raise ValueError("queries_per_sweep, states_per_query and batch_size must be >= 1")


@dataclass
class Stage:
    """One stage's estimated peak memory, by part."""

    name: str
    device_parts: dict[str, int]
    """Bytes held on the device at the stage's peak, by what holds them."""
    host_parts: dict[str, int] = field(default_factory=dict)
    """Bytes held in host memory beyond the runtime (on a GPU; on CPU device = host)."""
    hours_per_1e9_tokens: float | None = None
    """ESTIMATED hours per 1e9 corpus tokens (per sweep group for the sweep)."""

    @property
    def device_bytes(self) -> int:
        return sum(self.device_parts.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host_parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes}  # fmt: skip


def train_activations(m: ModelShape, run: RunShape, batch: int, layers: int | None = None) -> int:
    """Bytes autograd saves for one forward of ``batch`` units of length T through ``layers``
    blocks (default all; see the module docstring)."""
    t, b = run.unit_length, run.model_bytes
    per_layer = batch * t * ((8 * m.hidden + 3 * m.intermediate) + 2 * m.heads * t) * b
    return (m.layers if layers is None else layers) * per_layer + batch * t * m.vocab * (b + 4)


def _weights(m: ModelShape, run: RunShape) -> dict[str, int]:
    parts = {"weights": m.n_params * run.model_bytes}
    if run.sweep_bytes != run.model_bytes:
        parts["sweep copy"] = m.n_params * run.sweep_bytes
    return parts


def _perturbation(m: ModelShape, run: RunShape) -> Stage:
    p, bw = m.n_selected, run.model_bytes
    half = bw < 4
    moments = {"adam": 2 * p * (2 if half else 4), "fisher": 2 * p * 4, "sgd": 0}[run.optimizer]
    pair = run.states_per_query == 2
    device = {
        **_weights(m, run),
        "group states": (run.queries_per_sweep - 1) * run.states_per_query * p * bw,
        "working copy": p * bw,
        "optimizer moments": moments,
        "gradients": (1 if half else 2) * p * bw,
        "activations": train_activations(m, run, 1, m.backward_layers),
        "update chunk": update_transient_bytes(m.largest_selected) if half else 0,
    }
    host = {}
    if pair and run.device_type == "cpu":
        device["θ+ while θ− is made"] = p * bw
    elif pair:
        host["θ+ while θ− is made"] = p * bw
    return Stage("perturbation", device, host)


def _sweep_flops(m: ModelShape, run: RunShape) -> float:
    """FLOPs per corpus token of one sweep group: a shared trunk, then each state's top."""
    top = m.n_selected if m.n_selected < m.n_params else m.n_params
    states = run.queries_per_sweep * run.states_per_query
    return 2.0 * (m.n_params - top) + 2.0 * top * states


def _hours(flops_per_token: float, run: RunShape, bytes_: int) -> float:
    return flops_per_token * 1e9 / THROUGHPUT[(run.device_type, min(bytes_, 4))] / 3600


def _sweep(m: ModelShape, run: RunShape) -> Stage:
    bs, t = run.sweep_bytes, run.unit_length
    ba = 2 if run.autocast else bs  # activations' bytes
    activations = run.batch_size * t * (4 * m.hidden + 2 * m.intermediate + m.heads * t) * ba
    device = {
        **_weights(m, run),
        "states": run.queries_per_sweep * run.states_per_query * m.n_selected * bs,
        "activations": activations,
        "LM-head chunk": HEAD_CHUNK * m.vocab * (ba + 8),
        "sweep window": _window_bytes(m, run, ba),
    }
    if run.autocast:  # each matmul casts its weight: the largest (the LM head) at most
        device["autocast cast"] = 2 * m.hidden * max(m.vocab, m.intermediate)
    hours = _hours(_sweep_flops(m, run), run, bs)
    return Stage("sweep", device, hours_per_1e9_tokens=hours)


def _window_bytes(m: ModelShape, run: RunShape, activation_bytes: int) -> int:
    """The batches a sweep window holds besides the current one (``score.sweep``): each
    state runs over a window of batches before the next, so their inputs, trunk outputs and
    (eager attention) masks stay alive; a batch as large as the window is a window alone."""
    if run.batch_size * run.unit_length >= WINDOW_TOKENS:
        return 0
    tokens = min(WINDOW_TOKENS, run.corpus_tokens or WINDOW_TOKENS)
    # trunk outputs only when the sweep can split (some parameters stay at θ0)
    hidden = m.hidden * activation_bytes if m.n_selected < m.n_params else 0
    return tokens * (hidden + 4 * run.unit_length + 24)


def _load(m: ModelShape, run: RunShape) -> Stage:
    weights = m.n_params * run.model_bytes
    host = {"weights read": weights} if run.device_type != "cpu" else {}
    return Stage("load", {"weights": weights}, host)


def _normaliser(m: ModelShape, run: RunShape) -> Stage:
    b, bt = run.sweep_bytes, run.batch_size * run.unit_length  # norms of the sweep model
    in_sweep_dtype = dataclasses.replace(run, model_bytes=b)
    layers = m.backward_layers
    outputs = layers * bt * (3 * m.hidden + 3 * m.intermediate // 2) + bt * m.vocab
    upcast = upcast_transient_bytes(run.batch_size, run.unit_length, m.vocab + m.hidden)
    device = {
        **_weights(m, run),
        "activations (batch)": train_activations(m, in_sweep_dtype, run.batch_size, layers),
        "output gradients": outputs * b,
        "float32 chunk": 0 if b == 4 else upcast,  # the ghost norms' upcast units
        "gradient (per-unit loop)": m.uncovered_selected * b,
    }
    hours = _hours(6.0 * m.n_params, run, b)
    return Stage("normaliser", device, hours_per_1e9_tokens=hours)


def _top_tokens(m: ModelShape, run: RunShape) -> Stage:
    in_sweep_dtype = dataclasses.replace(run, model_bytes=run.sweep_bytes)
    device = {
        **_weights(m, run),
        "states": run.states_per_query * m.n_selected * run.sweep_bytes,
        "activations": train_activations(m, in_sweep_dtype, 1),
    }
    return Stage("top tokens", device)


def stages(m: ModelShape, run: RunShape) -> list[Stage]:
    """The stages of one run, in order, each at its own peak."""
    out = [_load(m, run)]
    if run.normalize:
        out.append(_normaliser(m, run))
    return [*out, _perturbation(m, run), _sweep(m, run), _top_tokens(m, run)]
