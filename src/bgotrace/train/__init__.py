"""Train stage: small causal LMs trained from scratch on a known corpus.

Attribution methods are judged against models whose training data is known exactly;
``train_model`` trains one on the very units the scorer ranks and saves it in standard
Hugging Face format, with its tokenizer, run record and final AdamW moments.
"""

from __future__ import annotations

from bgotrace.train.presets import ARCHS, PRESETS, ModelPreset, build_model, get_preset
from bgotrace.train.tokenizer import SPECIAL_TOKEN, save_tokenizer, train_tokenizer
from bgotrace.train.trainer import (
    TrainConfig,
    batch_tensors,
    data_order,
    keep_mask,
    save_optimizer_state,
    train_model,
)

__all__ = [
    "ARCHS",
    "PRESETS",
    "SPECIAL_TOKEN",
    "ModelPreset",
    "TrainConfig",
    "batch_tensors",
    "build_model",
    "data_order",
    "get_preset",
    "keep_mask",
    "save_optimizer_state",
    "save_tokenizer",
    "train_model",
    "train_tokenizer",
]
