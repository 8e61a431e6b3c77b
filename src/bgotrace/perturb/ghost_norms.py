"""Per-unit gradient norms for a whole batch without per-unit gradients ("ghost" norms).

One forward and one backward of the batch's summed loss give, at every hooked module, its
input x (B, T, ·) and the gradient of its output δ (B, T, ·); units never interact (right
padding, causal attention, masked loss), so δ[b] is unit b's own output gradient. A weight's
gradient for unit b is then a sum of outer products, g_b = Σ_t l_bt r_btᵀ:

- ``nn.Linear`` (W: out × in): l = δ, r = x;  GPT-2 ``Conv1D`` (W: in × out): l = x, r = δ;
- ``nn.Embedding`` (W: V × d): l = one-hot(id_t), r = δ (kept as the ids);
- a bias: l = δ, r = 1.

‖g_b‖² = Σ_{t,s} (l_t·l_s)(r_t·r_s) needs two (T × T) Gram matrices (DP-SGD's ghost
clipping), or g_b itself when T(m + n) > m·n makes that cheaper. A parameter used by two
modules (GPT-2's tied embedding and LM head) sums its contributions first, so the cross term
⟨g_emb, g_head⟩ is counted. Normalisation layers' weights (small) get their per-unit gradients
from ``torch.func.vmap`` over the layer alone.

Recorded inputs and output gradients stay in the model's dtype (views, no copies): a half
precision model's are upcast to float32 a chunk of units at a time inside the Gram / direct
products (:data:`UPCAST_ELEMENTS`), so everything is accumulated in float32 without a float32
copy of the whole batch's activations (at Llama-3-8B, 16 × 256 tokens, that copy was 31 GiB).

Parameters of any other module (e.g. fused MoE experts) are reported as uncovered: the caller
takes them from the per-unit loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

from bgotrace.modeling.losses import forward_logits, token_losses

_DIRECT_MAX = 1 << 22
"""Largest per-unit gradient (elements) ever materialised: 16 MiB of float32 per unit."""
UPCAST_ELEMENTS = 1 << 24
"""float32 elements (64 MiB) of the factors and products of one chunk of units; a chunk holds
at least one unit, whatever its size (see :func:`upcast_transient_bytes`)."""


@dataclass
class Factor:
    """One contribution g_b = Σ_t left_bt ⊗ right_bt to a parameter's per-unit gradient."""

    left: torch.Tensor
    """(B, T, m) in the model's dtype, or (B, T) int64 ids standing for one-hot rows of width V."""
    right: torch.Tensor
    """(B, T, n) in the model's dtype."""

    def units(self, chunk: slice) -> Factor:
        """The same factor for the units ``chunk``, upcast to float32 (ids stay int64)."""
        left, right = self.left[chunk], self.right[chunk]
        return Factor(left if left.dim() == 2 else left.float(), right.float())


@dataclass
class _Call:
    """One forward call of a hooked module: what its per-unit gradients are built from."""

    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor


@dataclass
class GhostPlan:
    """Which modules carry the selected parameters, and which parameters nothing covers."""

    modules: dict[nn.Module, dict[str, str]] = field(default_factory=dict)
    """Hooked module → {its own parameter name (weight, bias): full parameter name}."""
    uncovered: list[str] = field(default_factory=list)
    """Selected parameters no supported module owns: the per-unit loop computes these."""


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return "embedding"
    if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
        return "norm"  # per-position layers: vmap over the layer alone is exact
    return None


def plan_for(model: nn.Module, names: Sequence[str]) -> GhostPlan:
    """Map every selected parameter to the modules that use it (tied ones to each)."""
    wanted = set(names)
    by_id = {id(p): n for n, p in model.named_parameters() if n in wanted}
    plan, covered = GhostPlan(), set()
    for module in model.modules():
        mine = module.named_parameters(recurse=False)
        own = {local: by_id[id(p)] for local, p in mine if id(p) in by_id}
        if not own or _kind(module) is None:
            continue
        plan.modules[module] = own
        covered |= set(own.values())
    plan.uncovered = [n for n in names if n not in covered]
    return plan


@contextmanager
def _recording(plan: GhostPlan, batch: int) -> Iterator[list[_Call]]:
    """Record (module, input, output) of every call of a planned module while active."""
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] == 1 < batch:  # broadcast later (GPT-2's positions): per unit here
            output = output.expand(batch, *output.shape[1:])
        if output.requires_grad:  # no gradient reaches it otherwise: nothing to count
            calls.append(_Call(module, args[0].detach(), output))
        return output

    handles = [m.register_forward_hook(hook) for m in plan.modules]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _flat(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, T, ·) view of a module's input or output in its own dtype (ids: int64, (B, T))."""
    if t.dtype in (torch.int64, torch.int32):
        return t.expand(batch, *t.shape[1:]).reshape(batch, -1).long()  # (1, T) positions too
    return t.reshape(batch, -1, t.shape[-1])


def _factors(
    call: _Call, grad: torch.Tensor, names: dict[str, str], batch: int
) -> dict[str, Factor]:
    """The outer-product factors of each parameter of a linear-like call.

    ``batch``: units in the batch; a call on flattened tokens (B·T, ·), as MoE blocks make
    for their routers and shared experts, is viewed per unit again (B, T, ·).
    """
    x, delta = _flat(call.inputs, batch), _flat(grad, batch)
    module, kind = call.module, _kind(call.module)
    out: dict[str, Factor] = {}
    if kind == "embedding":
        if module.padding_idx is not None:  # its row never receives a gradient
            pad = int(module.padding_idx)  # type: ignore[arg-type]  # an int on nn.Embedding
            delta = delta * x.ne(pad).unsqueeze(-1)
        out["weight"] = Factor(x, delta)
    else:
        out["weight"] = Factor(delta, x) if kind == "linear" else Factor(x, delta)
    if "bias" in names:
        out["bias"] = Factor(delta, torch.ones_like(delta[..., :1]))
    return {names[k]: f for k, f in out.items() if k in names}


def _norm_layer_factors(call: _Call, grad: torch.Tensor, names: dict[str, str], batch: int) -> dict:
    """Per-unit gradients of a normalisation layer's own parameters by vmap over units."""
    module = call.module
    params = {k: p.detach() for k, p in module.named_parameters(recurse=False) if k in names}

    def one(x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(module, p, (x[None],))

        return vjp(f, params)[1](d[None])[0]

    inputs = call.inputs.reshape(batch, -1, *call.inputs.shape[1:])  # per unit, also flattened
    grads = grad.to(call.inputs.dtype).reshape(batch, -1, *grad.shape[1:])
    per_unit = vmap(one)(inputs, grads)  # name → (B, *shape)
    out = {}
    for k, g in per_unit.items():  # a (B, 1, P) left factor with a unit right factor
        flat = g.reshape(g.shape[0], 1, -1).float()
        out[names[k]] = Factor(flat, torch.ones_like(flat[..., :1]))
    return out


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, S) inner products a_t·b_s of two factor sides (ids are one-hot rows)."""
    if a.dim() == 2 and b.dim() == 2:
        return (a[:, :, None] == b[:, None, :]).float()
    if a.dim() == 2:  # one-hot(a_t)·b_s = b[s, a_t]
        return b.gather(2, a[:, None, :].expand(-1, b.shape[1], -1)).transpose(1, 2)
    if b.dim() == 2:
        return _gram(b, a).transpose(1, 2)
    return torch.bmm(a, b.transpose(1, 2))


def _direct(f: Factor, g: Factor) -> bool:
    """Whether ‖g_b‖² is cheaper from g_b itself than from two Gram matrices."""
    tokens, m, n = f.right.shape[1], f.left.shape[-1], f.right.shape[-1]
    dense = f is g and f.left.dim() == 3
    return dense and tokens * (m + n) > m * n and m * n <= _DIRECT_MAX


def _unit_elements(f: Factor, g: Factor) -> int:
    """float32 elements one unit of :func:`_inner_float` holds: upcast factors and products."""
    tokens, m = f.right.shape[1], f.left.shape[-1] if f.left.dim() == 3 else 0
    sides = tokens * (m + f.right.shape[-1])
    if f is not g:
        sides += tokens * ((g.left.shape[-1] if g.left.dim() == 3 else 0) + g.right.shape[-1])
    products = m * f.right.shape[-1] if _direct(f, g) else 2 * tokens * g.right.shape[1]
    return sides + products


def _inner_float(f: Factor, g: Factor, direct: bool) -> torch.Tensor:
    """:func:`_inner` of float32 factors (one chunk of units)."""
    if direct:
        return torch.einsum("btm,btn->bmn", f.left, f.right).pow(2).sum((1, 2))
    return (_gram(f.left, g.left) * _gram(f.right, g.right)).sum((1, 2))


def _inner(f: Factor, g: Factor) -> torch.Tensor:
    """⟨Σ_t f.l_t f.r_tᵀ, Σ_s g.l_s g.r_sᵀ⟩ per unit (B,) float32, in chunks of units whose
    float32 factors and products hold at most :data:`UPCAST_ELEMENTS` (one unit at least)."""
    direct, batch = _direct(f, g), f.right.shape[0]
    step = max(1, UPCAST_ELEMENTS // max(1, _unit_elements(f, g)))
    parts = []
    for start in range(0, batch, step):
        chunk = slice(start, start + step)
        fc = f.units(chunk)
        parts.append(_inner_float(fc, fc if f is g else g.units(chunk), direct))
    return torch.cat(parts)


def upcast_transient_bytes(batch: int, tokens: int, widest: int) -> int:
    """Bytes of float32 one chunk of :func:`_inner` holds at most: a unit of ``tokens``
    positions whose two factor sides are ``widest`` wide together (the LM head's output
    gradient and input: V + h) with its two Gram matrices, times the units of a chunk
    (:data:`UPCAST_ELEMENTS`, at least one, at most the ``batch``)."""
    unit = tokens * widest + 2 * tokens * tokens
    return 4 * unit * min(batch, max(1, UPCAST_ELEMENTS // unit))


def _squared_norm(factors: list[Factor]) -> torch.Tensor:
    """‖Σ_i g_i‖² per unit, cross terms included (a parameter used by several modules)."""
    total = _inner(factors[0], factors[0])
    for i, f in enumerate(factors):
        if i:
            total = total + _inner(f, f)
        for g in factors[:i]:
            total = total + 2 * _inner(f, g)
    return total


def batch_squared_norms(
    model: nn.Module,
    plan: GhostPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """‖∇ Σ_t NLL_t(z_b)‖² over the planned parameters for each unit of a batch (B,) float64.

    The model's parameters must track gradients exactly for the selected names (see
    :func:`bgotrace.perturb.grad_scope.grads_only_for`); nothing is written to ``.grad``.
    """
    with _recording(plan, input_ids.shape[0]) as calls:
        loss = token_losses(forward_logits(model, input_ids, attention_mask), labels).sum()
    if not calls:
        return torch.zeros(input_ids.shape[0], dtype=torch.float64)
    grads = torch.autograd.grad(loss, [c.output for c in calls], allow_unused=True)
    factors: dict[str, list[Factor]] = defaultdict(list)
    for call, grad in zip(calls, grads, strict=True):
        if grad is None:
            continue
        names = plan.modules[call.module]
        build = _norm_layer_factors if _kind(call.module) == "norm" else _factors
        for name, factor in build(call, grad, names, input_ids.shape[0]).items():
            factors[name].append(factor)
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for parts in factors.values():
        total += _squared_norm(parts).double()
    return total
