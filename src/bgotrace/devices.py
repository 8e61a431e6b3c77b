"""The one place that maps user strings to torch devices and dtypes."""

from __future__ import annotations

import logging

import torch

from bgotrace.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``float32|bfloat16|float16`` to a torch dtype."""
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a device; ``auto`` prefers CUDA when present."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device auto -> %s", device)
        return device
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Device {name!r} was asked for but CUDA is not available: "
                "use --device cpu or auto."
            )
        return torch.device(name)
    raise ConfigError(f"Unknown device {name!r}: use one of {', '.join(DEVICES)}.")
