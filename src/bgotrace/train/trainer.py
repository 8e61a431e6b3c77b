"""Train a small causal LM from scratch on a known corpus.

Attribution is only checkable when the training data is known exactly, so bgotrace
trains its own reference models. The trainer sees the very units the scorer ranks
(``bgotrace.corpus.tokenize_and_chunk`` with the same chunking), in an order fixed by
the seed; ``keep`` drops units while leaving the order of the rest unchanged, which is
what leave-k-out and subset retraining need to isolate the effect of the dropped data.

CPU example (seconds)::

    bgotrace train --corpus corpus.jsonl --out runs/model --preset test --epochs 2
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bgotrace.chat import conversation_renderer
from bgotrace.corpus import ChunkingConfig, Document, Unit, corpus_fingerprint, tokenize_and_chunk
from bgotrace.devices import resolve_device
from bgotrace.errors import ConfigError, InputError, NonFiniteLossError, RunDirectoryError
from bgotrace.runtime.progress import progress_task
from bgotrace.train.presets import ARCHS, PRESETS, ModelPreset, build_model, get_preset
from bgotrace.train.tokenizer import save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

KeepSpec = Sequence[bool] | Sequence[int] | Sequence[str] | Set[int] | Set[str] | np.ndarray
"""Which units to train on: a boolean mask over all units, or unit indices, or unit ids."""
BatchHook = Callable[[int, int, list[str]], None]
"""Called as ``hook(epoch, step, unit_ids)`` before each optimiser step."""


@dataclass
class TrainConfig:
    """How to train a known-data model; saved to ``train_config.json`` to replay the run."""

    preset: str = "tiny"
    """Model shape from ``bgotrace.train.PRESETS`` (``test``, ``tiny``, ``demo``, ``small``)."""
    arch: str | None = None
    """Override the preset's architecture: ``gpt2`` or ``llama``."""
    epochs: int = 10
    """Passes over the training units."""
    lr: float = 3e-3
    """Peak AdamW learning rate, reached after warmup and decayed linearly to zero."""
    batch_size: int = 16
    """Units per optimiser step."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices and embeddings (not on biases or norms)."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warmup from zero."""
    seed: int = 0
    """Seeds initialisation and data order; the same seed gives bit-identical weights."""
    max_length: int | None = None
    """Tokens per unit; defaults to the preset's context length and may not exceed it."""
    stride: int = 0
    """Tokens of overlap between consecutive units of a long document."""
    log_every: int = 10
    """Log the running loss every this many steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    device: str = "cpu"
    """``cpu``, ``cuda[:N]`` or ``auto``; results are reproducible per device."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"Unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}.")
        if self.arch is not None and self.arch not in ARCHS:
            raise ConfigError(f"Unknown arch {self.arch!r}: use one of {', '.join(ARCHS)}.")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be at least 1.")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be positive, got {self.lr}.")
        for name in ("weight_decay", "warmup_steps", "stride", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} may not be negative.")
        context = self.model_preset().context_length
        if self.max_length is not None and not 2 <= self.max_length <= context:
            raise ConfigError(
                f"max_length {self.max_length} must be between 2 and the {self.preset!r} "
                f"preset's context length {context}: lower it or pick a larger preset."
            )
        self.chunking()  # refuses a stride that is not below max_length

    def model_preset(self) -> ModelPreset:
        """The preset with the architecture override applied."""
        return get_preset(self.preset, self.arch)

    def unit_length(self) -> int:
        """``max_length``, or the preset's context length when not set."""
        return self.max_length or self.model_preset().context_length

    def chunking(self) -> ChunkingConfig:
        """The chunking a scorer must use to rank exactly the units this model saw."""
        return ChunkingConfig(max_length=self.unit_length(), stride=self.stride, append_eos=True)


def train_model(
    documents: Sequence[Document],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    keep: KeepSpec | None = None,
    progress: bool = True,
    overwrite: bool = False,
    on_batch: BatchHook | None = None,
) -> Path:
    """Train a model on ``documents`` and save it to ``out_dir``; returns ``out_dir``.

    ``keep`` (a boolean mask, or unit indices or unit ids) restricts training to some
    units; the shuffled order is drawn over all units and then filtered, so the kept
    units are seen in the same order as in the full run. The result is written to
    ``<out_dir>.part`` and renamed when complete.
    """
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    started = time.perf_counter()
    _seed_everything(config.seed)
    tokenizer = _tokenizer_for(documents, config, tokenizer)
    chunking = config.chunking()  # SFT conversations: their assistant tokens are the loss
    units = tokenize_and_chunk(
        documents, tokenizer, chunking, conversation_renderer(tokenizer, chunking.unit_loss)
    )
    mask = keep_mask(units, keep)
    model = build_model(config.model_preset(), tokenizer)
    model.to(resolve_device(config.device))  # type: ignore[arg-type]  # @wraps hides self
    losses, step, optimizer = _fit(model, units, mask, config, tokenizer, progress, on_batch)
    summary = {
        "config": asdict(config),
        "preset": asdict(config.model_preset()),
        "seed": config.seed,
        "chunking": asdict(config.chunking()),
        "corpus_fingerprint": corpus_fingerprint(documents),
        "n_documents": len(documents),
        "n_units": len(units),
        "n_units_trained": int(mask.sum()),
        "excluded_units": [u.unit_id for u, k in zip(units, mask, strict=True) if not k],
        "n_tokens_trained": int(
            sum(len(u.token_ids) for u, k in zip(units, mask, strict=True) if k)
        ),
        "steps": step,
        "epoch_losses": losses,
        "final_loss": losses[-1],
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    _save(out, model, tokenizer, optimizer, step, summary, overwrite)
    log.info("trained %s in %.1fs, final loss %.4f", out, summary["wall_time_s"], losses[-1])
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RunDirectoryError(f"Output directory {out} exists: use --overwrite or another --out.")


def _seed_everything(seed: int) -> None:
    """Seed every generator a model init or a library call might draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer_for(
    documents: Sequence[Document], config: TrainConfig, tokenizer: PreTrainedTokenizerBase | None
) -> PreTrainedTokenizerBase:
    if not documents:
        raise InputError("Cannot train on an empty corpus: give at least one document.")
    if tokenizer is None:
        preset = config.model_preset()
        tokenizer = train_tokenizer((d.text for d in documents), preset.vocab_size)
        tokenizer.model_max_length = preset.context_length
    if tokenizer.eos_token_id is None:
        raise ConfigError("The tokenizer has no EOS token: units end with EOS, so give it one.")
    return tokenizer


def _fit(
    model: PreTrainedModel,
    units: Sequence[Unit],
    mask: np.ndarray,
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool,
    on_batch: BatchHook | None,
) -> tuple[list[float], int, torch.optim.AdamW]:
    """The training loop; returns the mean loss of each epoch, the step count, the optimiser."""
    orders = data_order(len(units), config.epochs, config.seed, mask)
    steps_per_epoch = -(-len(orders[0]) // config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer, scheduler = make_optimizer(model, config, total)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    device = next(model.parameters()).device
    model.train()
    epoch_losses: list[float] = []
    step = 0
    with progress_task("Training", total, enabled=progress) as advance:
        for epoch, order in enumerate(orders):
            running, n_batches = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                batch = [units[i] for i in order[start : start + config.batch_size]]
                if on_batch is not None:
                    on_batch(epoch, step, [u.unit_id for u in batch])
                loss = _train_step(model, batch, pad_id, device, optimizer, config.grad_clip)
                scheduler.step()
                step += 1
                running, n_batches = running + loss, n_batches + 1
                advance(1, f"epoch {epoch} loss {running / n_batches:.4f}")
                if step % config.log_every == 0:
                    log.info("epoch %d step %d/%d loss %.4f", epoch, step, total, loss)
            epoch_losses.append(running / steps_per_epoch)
    return epoch_losses, step, optimizer


def _train_step(
    model: PreTrainedModel,
    batch: list[Unit],
    pad_id: int,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
) -> float:
    """One AdamW step on a padded batch; the loss is the mean over its real tokens."""
    tensors = {k: v.to(device) for k, v in batch_tensors(batch, pad_id).items()}
    loss = model(**tensors).loss
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"Training loss became {loss.item()}: lower --lr and retrain.")
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


def _save(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.AdamW,
    step: int,
    summary: dict[str, Any],
    overwrite: bool,
) -> None:
    """Write everything to ``<out>.part``, then rename: a half-written run never looks done."""
    part = out.with_name(out.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    model.save_pretrained(part, safe_serialization=True)
    save_tokenizer(tokenizer, part)
    save_optimizer_state(optimizer, model, step, part / "optimizer_state.safetensors")
    (part / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    _check_out_dir(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    part.rename(out)


# --- data: which units, in which order, as which tensors -------------------------------


def keep_mask(units: Sequence[Unit], keep: KeepSpec | None) -> np.ndarray:
    """A boolean mask over ``units`` from a mask, unit indices or unit ids (None: all)."""
    n = len(units)
    if keep is None:
        mask = np.ones(n, dtype=bool)
    else:
        items = list(keep.tolist() if isinstance(keep, np.ndarray) else keep)
        mask = _mask_from_items(items, units)
    if not mask.any():
        raise InputError("keep selects no unit to train on: keep at least one unit.")
    return mask


def _mask_from_items(items: list[Any], units: Sequence[Unit]) -> np.ndarray:
    n = len(units)
    if items and all(isinstance(x, (bool, np.bool_)) for x in items):
        if len(items) != n:
            raise InputError(
                f"keep mask has {len(items)} entries for {n} units: give one per unit."
            )
        return np.asarray(items, dtype=bool)
    if all(isinstance(x, str) for x in items):
        index = {u.unit_id: i for i, u in enumerate(units)}
        unknown = [x for x in items if x not in index]
        if unknown:
            raise InputError(f"keep names unknown unit ids {unknown[:3]}: use ids like 'doc#0'.")
        items = [index[x] for x in items]
    mask = np.zeros(n, dtype=bool)
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise InputError(f"keep entry {i!r} is not a unit index in [0, {n}): fix keep.")
        mask[i] = True
    return mask


def data_order(n_units: int, epochs: int, seed: int, mask: np.ndarray) -> list[np.ndarray]:
    """Unit indices in training order, one array per epoch.

    Each epoch's permutation is drawn over all ``n_units`` from a generator seeded with
    ``seed`` and only then filtered by ``mask``, so a retrain without some units sees the
    remaining ones in exactly the order of the full run.
    """
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for _ in range(epochs):
        perm = torch.randperm(n_units, generator=generator).numpy()
        orders.append(perm[mask[perm]])
    return orders


def batch_tensors(batch: Sequence[Unit], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding and, in
    a unit of an SFT conversation, outside its loss mask: the assistant tokens), (B, T)."""
    width = max(len(u.token_ids) for u in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, unit in enumerate(batch):
        input_ids[row, : len(unit.token_ids)] = torch.tensor(unit.token_ids, dtype=torch.long)
        attention_mask[row, : len(unit.token_ids)] = 1
    # EOS doubles as padding, so labels come from the mask, never from the token id.
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, unit in enumerate(batch):
        if unit.loss_mask is not None:
            outside = ~torch.tensor(unit.loss_mask, dtype=torch.bool)
            labels[row, : len(unit.token_ids)].masked_fill_(outside, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- optimiser, its saved state, and the progress bar ----------------------------------

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def make_optimizer(
    model: PreTrainedModel, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warmup to ``config.lr`` and linear decay towards zero."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_optimizer_state(
    optimizer: torch.optim.AdamW, model: PreTrainedModel, step: int, path: Path
) -> None:
    """Save AdamW's moments as ``exp_avg_sq.<param>``/``exp_avg.<param>`` tensors.

    Optimiser-aware baselines (TrackStar, tail-patch) precondition gradients with the
    final second moments; the step count in the metadata lets them undo Adam's bias
    correction.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key in ("exp_avg_sq", "exp_avg"):
                if key in state:
                    tensors[f"{key}.{names[id(param)]}"] = state[key].detach().cpu().contiguous()
    metadata = {
        "step": str(step),
        "betas": json.dumps(ADAM_BETAS),
        "eps": str(ADAM_EPS),
        "lr": str(optimizer.param_groups[0]["initial_lr"]),
    }
    save_file(tensors, str(path), metadata=metadata)
