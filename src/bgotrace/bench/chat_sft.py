"""The chat benchmark's models: a chat tokenizer, and supervised fine-tuning, full or LoRA.

The tokenizer is the pretraining tokenizer (byte-level BPE trained on the pretraining texts)
with four special tokens and a chat template built in code::

    <|endoftext|><|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n...

BOS (``<|endoftext|>``) comes once, from the template; the tokenizer adds nothing itself.

Fine-tuning puts the loss on the assistant tokens only (each answer and its ``<|end|>``
turn marker), with the masks of :func:`bgotrace.chat.render_chat` (``loss_on="assistant"``),
exactly as SFT trainers do. ``fine_tune`` trains either every weight of the pretrained model
(saved as a full model) or a LoRA adapter on the frozen model (saved as a PEFT adapter
directory, unmerged). Both write the AdamW moments of what they trained to
``optimizer_state.safetensors`` under the parameter names the evaluation sees (for
TrackStar), and a ``sft_config.json`` that says how they were trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bgotrace.chat import RenderedChat, parse_messages, render_chat
from bgotrace.errors import ConfigError, NonFiniteLossError
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.train import TrainConfig
from bgotrace.train.tokenizer import save_tokenizer
from bgotrace.train.trainer import data_order, make_optimizer, save_optimizer_state

log = logging.getLogger(__name__)

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Role headers, one end-of-turn marker, BOS once at the start (from the template)."""
SFT_RECORD = "sft_config.json"
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
)


def add_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a pretraining tokenizer the role tokens and the chat template (in place)."""
    tokenizer.add_tokens(list(CHAT_TOKENS), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class SFTConfig:
    """How the pretrained model is fine-tuned on the conversations (full or LoRA)."""

    epochs: int = 30
    """Passes over the SFT conversations."""
    lr: float = 2e-3
    """Peak AdamW learning rate of the full fine-tune (linear warmup and decay)."""
    lora_lr: float = 1e-2
    """Peak AdamW learning rate of the LoRA fine-tune."""
    lora_rank: int = 16
    """LoRA rank r (alpha = 2r) on every attention and MLP projection and on the input
    embedding (the invented names and role tokens need it: without it the adapter learned
    no fact)."""
    batch_size: int = 8
    """Conversations per optimiser step."""
    warmup_steps: int = 10
    """Steps of linear warmup."""
    seed: int = 0
    """Seeds the data order and the LoRA initialisation."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SFTConfig.{name} must be at least 1.")
        if not (self.lr > 0 and self.lora_lr > 0) or self.warmup_steps < 0:
            raise ConfigError("SFTConfig: lr and lora_lr must be > 0, warmup_steps >= 0.")

    def train_config(self, lora: bool) -> TrainConfig:
        """The optimiser settings in the trainer's form (for its AdamW and schedule)."""
        lr = self.lora_lr if lora else self.lr
        return TrainConfig(lr=lr, warmup_steps=self.warmup_steps, batch_size=self.batch_size,
                           epochs=self.epochs, seed=self.seed)  # fmt: skip


def render_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict]
) -> list[RenderedChat]:
    """Each SFT record's tokens and assistant-only loss mask, as fine-tuning sees them."""
    out = []
    for record in records:
        where = f"SFT record {record['id']!r}"
        out.append(render_chat(tokenizer, parse_messages(record["messages"], where), "assistant",
                               where))  # fmt: skip
    return out


def sft_batch(chats: Sequence[RenderedChat], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, T); labels are -100
    everywhere but on assistant tokens."""
    width = max(len(c.input_ids) for c in chats)
    input_ids = torch.full((len(chats), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chats), width), dtype=torch.long)
    labels = torch.full((len(chats), width), -100, dtype=torch.long)
    for row, chat in enumerate(chats):
        ids = torch.tensor(chat.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = ids.masked_fill(~torch.tensor(chat.loss_mask), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _fit(
    model: torch.nn.Module, chats: Sequence[RenderedChat], config: SFTConfig, lora: bool, pad: int
) -> tuple[torch.optim.AdamW, list[float], int]:
    """The masked SFT loop; returns the optimiser, the mean loss per epoch and the steps."""
    train = config.train_config(lora)
    orders = data_order(
        len(chats), config.epochs, config.seed, torch.ones(len(chats)).bool().numpy()
    )
    total = -(-len(chats) // config.batch_size) * config.epochs
    optimizer, scheduler = make_optimizer(model, train, total)  # type: ignore[arg-type]
    model.train()
    losses, step = [], 0
    for order in orders:
        epoch = []
        for start in range(0, len(order), config.batch_size):
            batch = sft_batch([chats[i] for i in order[start : start + config.batch_size]], pad)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"SFT loss became {loss.item()}: lower the lr.")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch.append(float(loss.item()))
            step += 1
        losses.append(sum(epoch) / len(epoch))
        log.info("SFT (%s) epoch %d: assistant-token loss %.4f", "lora" if lora else "full",
                 len(losses) - 1, losses[-1])  # fmt: skip
    model.eval()
    return optimizer, losses, step


def stop_at_end_of_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Greedy replies end at ``<|end|>`` (or EOS), as the chat model was taught."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert isinstance(end, int) and tokenizer.eos_token_id is not None  # add_chat_template
    model.generation_config.eos_token_id = [end, int(tokenizer.eos_token_id)]


def fine_tune(
    base_dir: Path,
    records: Sequence[dict],
    config: SFTConfig,
    out: Path,
    *,
    lora: bool,
    repeats: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fine-tune the pretrained model in ``base_dir`` on ``records``; write it to ``out``.

    ``repeats[i]``: times record i is seen per epoch (default once each). Full: a model
    directory (weights, tokenizer, generation config). LoRA: a PEFT adapter directory
    (``adapter_config.json``, ``adapter_model.safetensors``) over ``base_dir``. Returns the
    record written to ``sft_config.json``.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(base_dir)
    rendered = render_records(tokenizer, records)
    counts = [1] * len(rendered) if repeats is None else list(repeats)
    chats = [chat for chat, n in zip(rendered, counts, strict=True) for _ in range(n)]
    trained: torch.nn.Module = model
    peft_model = None
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                 lora_dropout=0.0, target_modules=list(LORA_TARGETS))  # fmt: skip
        peft_model = get_peft_model(model, peft_config)
        trained = cast(torch.nn.Module, peft_model.base_model.model)  # names as eval sees them
    optimizer, losses, steps = _fit(trained, chats, config, lora, int(tokenizer.pad_token_id))
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    if peft_model is not None:
        peft_model.save_pretrained(str(part), save_embedding_layers=False)  # adapter only
    else:
        stop_at_end_of_turn(model, tokenizer)
        model.save_pretrained(part, safe_serialization=True)
        save_tokenizer(tokenizer, part)
    save_optimizer_state(optimizer, trained, steps, part / "optimizer_state.safetensors")  # type: ignore[arg-type]
    record = {"base": str(base_dir), "lora": lora, "config": dataclasses.asdict(config),
              "n_conversations": len(rendered), "n_seen_per_epoch": len(chats), "steps": steps,
              "epoch_losses": losses,
              "wall_time_s": round(time.perf_counter() - started, 2)}  # fmt: skip
    (part / SFT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    return record
