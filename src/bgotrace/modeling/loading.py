"""Load a Hugging Face causal LM (optionally with a PEFT adapter) safely.

Weights are read with safetensors only, and remote code runs only when the user
asks for it: a corpus audit should never execute code shipped with a checkpoint.

The attention kernel is chosen here, explicitly (``--attn-implementation``, see
:func:`attention_for`): ``auto`` is PyTorch's SDPA where the architecture has it (fused
kernels on a GPU, no (T × T) probabilities kept by inference) and eager attention where it
does not. Forward-mode AD (``bgo-linear`` and the linearity diagnostic) runs through either:
under SDPA it selects the math backend itself (:func:`bgotrace.score.linear.forward_ad_attention`);
``flash_attention_2`` has no forward-mode formulas, so there those are skipped or refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from bgotrace.devices import ATTENTION_KERNELS, resolve_device, resolve_dtype
from bgotrace.errors import ConfigError, ModelLoadError, first_line

log = logging.getLogger(__name__)


def _causal_lm_class(config: PretrainedConfig) -> type | None:
    """The transformers class AutoModelForCausalLM builds for ``config`` (None: remote code or
    an architecture that is not a causal LM; the loader reports the latter)."""
    try:
        found = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    return found if isinstance(found, type) else None


def attention_for(config: PretrainedConfig, requested: str, device: str, dtype: str) -> str | None:
    """The ``attn_implementation`` to load ``config``'s model with.

    ``auto``: ``sdpa`` where the architecture supports it, else ``eager`` (None for remote
    code: its own default). An explicit kernel the architecture, the installed packages, the
    device or the dtype cannot run is a :class:`ConfigError` naming the fix.
    """
    cls = _causal_lm_class(config)
    name = type(config).__name__.removesuffix("Config")
    if requested == "auto":
        if cls is None:
            return None
        return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    if requested not in ATTENTION_KERNELS:
        raise ConfigError(
            f"--attn-implementation {requested} is unknown: use one of "
            f"{', '.join(ATTENTION_KERNELS)}."
        )
    supported = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    if cls is not None and requested in supported and not getattr(cls, supported[requested], 0):
        raise ConfigError(
            f"{name} models have no {requested} attention in this transformers: pass "
            "--attn-implementation eager (or auto)."
        )
    if requested == "flash_attention_2":
        _check_flash_attention(device, dtype)
    return requested


def _check_flash_attention(device: str, dtype: str) -> None:
    if not is_flash_attn_2_available():
        raise ConfigError(
            "--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA "
            "GPU, and flash-attn is not importable here: pip install flash-attn, or pass "
            "--attn-implementation sdpa (or auto)."
        )
    if resolve_device(device).type != "cuda":
        raise ConfigError(
            f"--attn-implementation flash_attention_2 runs on CUDA GPUs only, not --device "
            f"{device}: pass --device cuda, or --attn-implementation sdpa (or auto)."
        )
    if dtype not in ("bfloat16", "float16"):
        raise ConfigError(
            f"--attn-implementation flash_attention_2 runs in bfloat16 or float16 only, not "
            f"{dtype}: pass --model-dtype bfloat16, or --attn-implementation sdpa (or auto)."
        )


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


def _load_causal_lm(
    path: Path, dtype: str, device: str, attention: str, trust_remote_code: bool
) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = first_line(err).split(". ")[0]
        raise ModelLoadError(
            f"{path}/config.json is unreadable ({reason}): re-save the model with "
            "save_pretrained, or upgrade transformers if the architecture is new."
        ) from None
    kernel = attention_for(config, attention, device, dtype)
    log.info("attention: %s (--attn-implementation %s)", kernel or "the model's own", attention)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=resolve_dtype(dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **({"attn_implementation": kernel} if kernel else {}),
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
    attn_implementation: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode on ``device``.

    ``adapter`` is a PEFT adapter directory; its LoRA weights are merged so the
    perturbation sees one plain model whose parameters it can select by name. With
    ``merge_adapter=False`` (``--params adapter``) the adapter stays unmerged: the model
    is the base with PEFT's layers injected, whose adapter weights (``lora_A``/``lora_B``)
    are parameters of their own beside the frozen base. ``attn_implementation``: the
    attention kernel (:func:`attention_for`; the loaded model's
    ``config._attn_implementation`` reports it).
    """
    path = Path(path)
    _check_model_dir(path)
    tokenizer = _load_tokenizer(path, trust_remote_code)
    model = _load_causal_lm(path, dtype, device, attn_implementation, trust_remote_code)
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
