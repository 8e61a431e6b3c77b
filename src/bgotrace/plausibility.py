"""Would the model produce this query? A check run on every query before it is attributed.

Attribution explains why the model assigns the query's completion the probability it does.
When the model would not write that completion (a user pasted someone else's text, or the
wrong model), the ranking explains a text the model does not produce, and the user should
know. For each query, under θ0:

- ``loss``: mean NLL of the loss tokens (nats/token);
- ``greedy_match``: fraction of loss tokens that are the model's top-1 prediction given the
  true prefix; greedy decoding reproduces the completion exactly when it is 1.0 (a greedy
  decoder that has matched so far sees the same prefix, so it continues identically);
- ``greedy_loss``: mean NLL of the model's own greedy continuation of the same length from
  the same prefix (what the model finds likely there);
- ``gap``: ``loss − greedy_loss``. When it exceeds ``GAP_WARN`` nats/token, the completion is
  far less likely than what the model writes itself, and a warning goes to the log and to
  ``summary.json``'s ``warnings`` (shown by the report).

Only queries with the loss on the completion are checked for a gap (``loss_on=all`` style
queries have no continuation to compare); their loss and greedy match are still recorded.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bgotrace.modeling.losses import IGNORE, forward_logits, token_losses
from bgotrace.query import EncodedQuery

log = logging.getLogger(__name__)

GAP_WARN = 1.0
"""Nats/token by which the completion may be less likely than greedy's before a warning
(per token e^-1 ≈ 0.37 times as likely; over 10 tokens ≈ 5e-5 times)."""


@dataclass(frozen=True)
class QueryCheck:
    """How likely the base model finds the query (``summary.json``: ``queries[i].model_check``)."""

    loss: float
    greedy_match: float
    greedy_reproduces: bool
    greedy_loss: float | None
    """None for ``loss_on=all``."""
    gap: float | None
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the key/value cache: ``cache`` (transformers 5) or
    ``past_key_values`` (4.x; deprecated in 5)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The key/value cache a forward returned, by the field its output class declares
    (``cache`` in transformers 5, ``past_key_values`` in 4.x): reading the old name on a new
    output works but logs a deprecation warning on the user's console; None without one."""
    fields = getattr(out, "__dataclass_fields__", {})
    name = next((n for n in ("cache", "past_key_values") if n in fields), None)
    return None if name is None else getattr(out, name)


@torch.no_grad()
def greedy_continuation_loss(model: torch.nn.Module, prefix: torch.Tensor, n: int) -> float:
    """Mean NLL of ``n`` greedily decoded tokens after ``prefix`` (1, T).

    Decoded with the model's key/value cache: each step reads one new token, so a query's
    check costs about one forward over prefix + n tokens, not n forwards over the prefix
    (a long completion's check would otherwise cost more than its perturbation).
    """
    ids = prefix
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    total = 0.0
    for step in range(n):
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (1, V)
        best = logp.argmax(dim=-1, keepdim=True)  # (1, 1)
        total -= float(logp.gather(1, best))
        if step + 1 == n:
            break
        ids = torch.cat([ids, best], dim=1)  # (1, T + step + 1)
        cache = _returned_cache(out)  # None: the model reads it all again
        out = model(
            input_ids=ids if cache is None else best, attention_mask=torch.ones_like(ids),
            use_cache=cache is not None, **{_cache_kwarg(model): cache},
        )  # fmt: skip
    return total / n


@torch.no_grad()
def check_query(model: torch.nn.Module, query: EncodedQuery) -> QueryCheck:
    """The check of the module docstring for one query under the model's current weights."""
    device = next(model.parameters()).device
    ids, labels = query.input_ids.to(device), query.labels.to(device)
    logits = forward_logits(model, ids)  # (1, T, V)
    keep = labels[:, 1:] != IGNORE  # (1, T-1)
    loss = float(token_losses(logits, labels)[keep].mean())
    top1 = logits[:, :-1].argmax(dim=-1)  # (1, T-1)
    match = float((top1 == labels[:, 1:])[keep].float().mean())
    if query.query.loss_on != "completion":
        return QueryCheck(loss, match, match == 1.0, None, None, None)
    first = int(keep[0].nonzero()[0])  # prediction of token first+1 reads tokens <= first
    greedy = greedy_continuation_loss(model, ids[:, : first + 1], int(keep.sum()))
    gap = loss - greedy
    warning = None
    if gap > GAP_WARN:
        warning = (
            f"query {query.query.query_id!r}: the model would not write this completion "
            f"({loss:.2f} nats/token vs {greedy:.2f} for its own greedy continuation; "
            f"{match:.0%} of tokens are its top choice), so the attribution explains a text "
            "the model does not produce."
        )
        log.warning(warning)
    return QueryCheck(loss, match, match == 1.0, greedy, gap, warning)
