"""``ekfac``: influence functions with EK-FAC curvature, through kronfluence (not re-implemented).

A kronfluence :class:`Task` says what is attributed: the training loss of a unit is its
mean token NLL (as BGO's ``reduce=mean``), the measurement of a query its mean NLL over the
loss tokens (the completion by default). ``fit_all_factors`` fits EK-FAC factors on every
cache unit (true Fisher with labels sampled from the model, seeded, unless
``empirical_fisher``), then ``compute_pairwise_scores`` gives g_xᵀ (Ĝ + λI)⁻¹ g_z.

Sign: kronfluence's pairwise score is positive when the training example is helpful, i.e.
when leaving it out would raise the query loss (to first order by about score/N nats for
N units, up to damping and the EK-FAC approximation); **high = the unit supports the
query**. The test suite checks this on a planted duplicate of the query.

kronfluence tracks only ``nn.Linear`` and ``nn.Conv2d`` layers. GPT-2's ``Conv1D`` layers
are replaced by equivalent ``nn.Linear`` layers in a private copy of the model
(``convert_conv1d``); embeddings and norms are never tracked. A model whose selected
parameters contain no such layer is refused with a ConfigError. The output layer's
gradient covariance is V×V: for large vocabularies restrict ``params`` (e.g.
``regex:layers``).

Factors are written under ``factors_dir`` (default ``<token cache>/kronfluence``) in a
folder keyed by model weights, corpus, tracked layers and options, and reused when they
match; pairwise scores are written to a fresh folder per call and deleted once read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from bgotrace.baselines.base import Attributor, MethodContext, register
from bgotrace.cache import TokenCache
from bgotrace.cache.batching import unit_labels
from bgotrace.errors import ConfigError
from bgotrace.modeling.fingerprint import model_fingerprint
from bgotrace.modeling.losses import IGNORE, forward_logits, token_losses
from bgotrace.perturb.params import select_parameters
from bgotrace.query import EncodedQuery

log = logging.getLogger(__name__)

TRACKABLE = (nn.Linear, nn.Conv2d)
FACTORS_NAME = "ekfac"


@dataclass
class EKFACOptions:
    """Options of ``ekfac``."""

    damping: float | None = None
    """Damping λ; None = kronfluence's heuristic (0.1 × mean eigenvalue per layer)."""
    empirical_fisher: bool = False
    """Fit factors with the true labels instead of labels sampled from the model."""
    factors_dir: str | None = None
    """Folder for kronfluence's outputs (default: ``<token cache>/kronfluence``)."""
    convert_conv1d: bool = True
    """Replace GPT-2 ``Conv1D`` layers by equivalent ``nn.Linear`` (in a copy) so they count."""
    query_batch_size: int = 8
    """Queries per batch when computing their gradients."""

    def __post_init__(self) -> None:
        if self.damping is not None and self.damping < 0:
            raise ConfigError(f"ekfac damping must be >= 0 or None, got {self.damping}.")
        if self.query_batch_size < 1:
            raise ConfigError(f"ekfac query_batch_size must be >= 1, got {self.query_batch_size}.")


# --- what kronfluence sees: datasets, batches and the task ---------------------------------


class UnitDataset(Dataset):
    """Cache units as ``{"input_ids", "labels"}`` (L,) items; a unit's loss covers its tokens
    (an SFT conversation's: its loss mask's)."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(self.cache.unit_tokens(i).astype(np.int64))
        return {"input_ids": ids, "labels": torch.as_tensor(unit_labels(self.cache, i))}


class QueryDataset(Dataset):
    """Encoded queries as ``{"input_ids", "labels"}`` (T,) items (prompt labels are IGNORE)."""

    def __init__(self, queries: Sequence[EncodedQuery]) -> None:
        self.queries = list(queries)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        q = self.queries[i]
        return {"input_ids": q.input_ids[0], "labels": q.labels[0]}


def pad_batch(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items to (B, T) input_ids, attention_mask and labels (IGNORE on padding)."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_sequence_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL (B,) of each sequence over its non-IGNORE labels."""
    counts = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)  # (B,)
    return token_losses(logits, labels).sum(dim=1) / counts


def sampled_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels (B, T) drawn from the model's own predictions, IGNORE kept (true Fisher)."""
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)  # (B, T-1, V)
        draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:2])
    out = labels.clone()
    out[:, 1:] = torch.where(labels[:, 1:] == IGNORE, IGNORE, draws)
    return out


def _task_class() -> type:
    """The kronfluence Task, built lazily so that importing bgotrace stays light."""
    from kronfluence.task import Task

    class CausalLMTask(Task):
        """Mean token NLL per unit (train loss) and per query's loss tokens (measurement)."""

        def __init__(self, tracked: list[str]) -> None:
            self.tracked = tracked

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
            logits = forward_logits(model, batch["input_ids"], batch["attention_mask"])
            labels = sampled_labels(logits, batch["labels"]) if sample else batch["labels"]
            return per_sequence_mean(logits, labels).sum()

        def compute_measurement(self, batch: Any, model: nn.Module):
            logits = forward_logits(model, batch["input_ids"], batch["attention_mask"])
            return per_sequence_mean(logits, batch["labels"]).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return self.tracked

        def get_attention_mask(self, batch: Any):
            return batch["attention_mask"]

    return CausalLMTask


# --- the model kronfluence analyses ---------------------------------------------------------


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` (y = x W + b, W (in, out)) by the equal
    ``nn.Linear`` (weight Wᵀ); returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return len(found)


def tracked_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Linear/Conv2d modules whose weight is among the selected parameters.

    A tied weight (GPT-2's output layer) is known by its first name, e.g. the embedding's.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    wanted = set(names)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, TRACKABLE) and canonical.get(id(module.weight)) in wanted
    ]


def _refuse_untrackable(model: nn.Module, params: str) -> None:
    kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    raise ConfigError(
        f"ekfac: kronfluence tracks only nn.Linear and nn.Conv2d layers, and the parameters "
        f"selected by params={params!r} contain none (this model's layers: "
        f"{', '.join(kinds)}): use a model with nn.Linear layers (e.g. a Llama config) "
        "or select parameters of such layers."
    )


def analysis_key(
    ctx: MethodContext, model: nn.Module, tracked: list[str], opts: EKFACOptions
) -> str:
    """Folder name that changes with anything the factors depend on."""
    parts = {
        "cache": json.dumps(ctx.cache.manifest, sort_keys=True, default=str),
        "model": model_fingerprint(model),
        "tracked": tracked,
        "empirical_fisher": opts.empirical_fisher,
        "seed": ctx.seed,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return f"ekfac-{digest}"


@register("ekfac")
class EKFAC(Attributor):
    """EK-FAC influence g_xᵀ(Ĝ+λI)⁻¹g_z from kronfluence; positive = helpful unit."""

    Options = EKFACOptions

    def _prepare(self, ctx: MethodContext) -> None:
        model = copy.deepcopy(ctx.model)  # kronfluence wraps layers in place
        if self.opts.convert_conv1d and conv1d_to_linear(model):
            log.info("ekfac: GPT-2 Conv1D layers converted to nn.Linear for kronfluence")
        tracked = tracked_modules(model, select_parameters(model, ctx.params))
        if not tracked:
            _refuse_untrackable(model, ctx.params)
        self.analyzer = self._analyzer(ctx, model, tracked)
        self._fit(ctx)

    def _analyzer(self, ctx: MethodContext, model: nn.Module, tracked: list[str]) -> Any:
        """A kronfluence Analyzer on the prepared copy, writing under the keyed folder."""
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.utils.dataset import DataLoaderKwargs

        key = analysis_key(ctx, model, tracked, self.opts)
        root = Path(self.opts.factors_dir or ctx.cache.root / "kronfluence")
        log.info("ekfac: %d tracked layers, factors in %s", len(tracked), root / key)
        task = _task_class()(tracked)
        analyzer = Analyzer(
            analysis_name=key,
            model=prepare_model(model, task),
            task=task,
            cpu=ctx.torch_device.type == "cpu",
            disable_tqdm=True,
            output_dir=str(root),
            log_level=logging.WARNING,
        )
        analyzer.set_dataloader_kwargs(
            DataLoaderKwargs(collate_fn=partial(pad_batch, pad_id=ctx.pad_id))
        )
        return analyzer

    def _fit(self, ctx: MethodContext) -> None:
        """EK-FAC factors on every unit (skipped by kronfluence when already on disk)."""
        from kronfluence.arguments import FactorArguments

        factor_args = FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=self.opts.empirical_fisher,
            covariance_max_examples=None,
            lambda_max_examples=None,
        )
        with _seeded(ctx.seed, ctx.torch_device):  # labels sampled for the true Fisher
            self.analyzer.fit_all_factors(
                FACTORS_NAME,
                dataset=UnitDataset(ctx.cache),
                per_device_batch_size=ctx.batch_size,
                factor_args=factor_args,
            )

    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        from kronfluence.arguments import ScoreArguments

        ctx = self._prepared()
        name = f"scores-{uuid.uuid4().hex[:12]}"
        try:
            self.analyzer.compute_pairwise_scores(
                scores_name=name,
                factors_name=FACTORS_NAME,
                query_dataset=QueryDataset(queries),
                train_dataset=UnitDataset(ctx.cache),
                per_device_query_batch_size=min(len(queries), self.opts.query_batch_size),
                per_device_train_batch_size=ctx.batch_size,
                score_args=ScoreArguments(damping_factor=self.opts.damping),
                overwrite_output_dir=True,
            )
            scores = self.analyzer.load_pairwise_scores(name)  # compute_... returns None
        finally:
            shutil.rmtree(self.analyzer.scores_output_dir(name), ignore_errors=True)
        if scores is None:
            raise RuntimeError(f"kronfluence wrote no pairwise scores for {name}")
        return scores["all_modules"].double().cpu().numpy()  # (Q, N)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside the block; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
