"""Load a Hugging Face causal LM (optionally with a PEFT adapter) safely.

Weights are read with safetensors only, and remote code runs only when the user
asks for it: a corpus audit should never execute code shipped with a checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from bgotrace.devices import resolve_device, resolve_dtype
from bgotrace.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(
            f"Model directory {path} does not exist: pass a folder saved with save_pretrained."
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a Hugging Face model directory: "
            "pass the folder that save_pretrained wrote."
        )
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(
            f"{path}/config.json is not valid JSON ({first_line(err)}): re-save the "
            "model with save_pretrained."
        ) from None
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{path} has no *.safetensors weights; bgotrace loads weights with safetensors only: "
            "re-save the model with save_pretrained(safe_serialization=True)."
        )


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer as :func:`load_model_and_tokenizer` loads it (same fingerprint), without
    the weights: for stages that only tokenize (``bgotrace cache build``)."""
    return _load_tokenizer(Path(path), trust_remote_code)


def _load_tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizer backends raise many types for a damaged file
        raise ModelLoadError(
            f"Could not load a tokenizer from {path} ({type(err).__name__}: "
            f"{first_line(err)}): "
            "save the tokenizer next to the model with tokenizer.save_pretrained."
        ) from None
    # Without tokenizer files transformers may build an empty tokenizer that encodes any text
    # to no tokens at all; that would surface much later as an empty query or corpus.
    if not tokenizer("The", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"{path} has no tokenizer files (tokenizer.json or a vocabulary): save the "
            "tokenizer next to the model with tokenizer.save_pretrained."
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Padding positions are masked out of every loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_causal_lm(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = first_line(err).split(". ")[0]
        raise ModelLoadError(
            f"{path}/config.json is unreadable ({reason}): re-save the model with "
            "save_pretrained, or upgrade transformers if the architecture is new."
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as err:
        raise ModelLoadError(
            f"{path} holds a {type(config).__name__}, which is not a causal LM: "
            "bgotrace needs a model that AutoModelForCausalLM can load."
        ) from err
    except (SafetensorError, OSError, RuntimeError) as err:  # damaged or truncated weights
        raise ModelLoadError(
            f"The weights in {path} are unreadable ({first_line(err)}): check that the "
            "download is complete, or re-save the model with save_pretrained."
        ) from None
    return model


def load_model_and_tokenizer(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode on ``device``.

    ``adapter`` is a PEFT adapter directory; its LoRA weights are merged so the
    perturbation sees one plain model whose parameters it can select by name. With
    ``merge_adapter=False`` (``--params adapter``) the adapter stays unmerged: the model
    is the base with PEFT's layers injected, whose adapter weights (``lora_A``/``lora_B``)
    are parameters of their own beside the frozen base.
    """
    path = Path(path)
    _check_model_dir(path)
    tokenizer = _load_tokenizer(path, trust_remote_code)
    model = _load_causal_lm(path, resolve_dtype(dtype), trust_remote_code)
    if adapter is not None:
        model = _merge_adapter(model, Path(adapter), merge_adapter)
    model.to(resolve_device(device))  # type: ignore[arg-type]  # transformers types .to oddly
    model.eval()  # dropout off: scores must not depend on dropout masks
    return model, tokenizer


def _merge_adapter(model: PreTrainedModel, adapter: Path, merge: bool) -> PreTrainedModel:
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{adapter} has no adapter_config.json: pass a folder saved by a PEFT model."
        )
    from peft import PeftModel

    try:
        base_name = json.loads((adapter / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    except (ValueError, AttributeError) as err:
        raise ModelLoadError(
            f"{adapter}/adapter_config.json is not a JSON object ({err}): re-save the adapter "
            "with save_pretrained."
        ) from None
    log.info("loading PEFT adapter %s (trained on %s), merge=%s", adapter, base_name, merge)
    peft_model = PeftModel.from_pretrained(model, adapter)
    if merge:
        return peft_model.merge_and_unload()
    if peft_model.peft_config[peft_model.active_adapter].is_prompt_learning:
        raise ModelLoadError(
            f"{adapter} is a prompt-learning adapter, which has no weights inside the model to "
            "perturb: use --params all (the adapter is then merged) or a LoRA adapter."
        )
    # PEFT injected its layers into ``model`` in place; the transformers model itself runs
    # them and keeps its module paths (so the split forward still finds the blocks).
    injected: PreTrainedModel = peft_model.base_model.model  # type: ignore[assignment]
    return injected


def inject_adapter_layers(module: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """``module`` with the PEFT layers of ``adapter`` injected in place (weights not read):
    the shapes and names ``--params adapter`` perturbs, e.g. on a meta-device model."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{adapter} has no adapter_config.json: pass a folder saved by a PEFT model."
        )
    from peft import PeftConfig, inject_adapter_in_model

    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except (ValueError, TypeError, OSError) as err:
        raise ModelLoadError(
            f"{adapter}/adapter_config.json is unreadable ({first_line(err)}): re-save the "
            "adapter with save_pretrained."
        ) from None
    return inject_adapter_in_model(config, module)


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model accepts, when its config says so."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def embedding_rows(model: PreTrainedModel) -> int | None:
    """Rows of the input embedding: token ids at or above it have no embedding."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[0]) if weight is not None else None
