"""The one place that maps user strings to torch devices and dtypes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from bgotrace.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_KERNELS = ("auto", "sdpa", "eager", "flash_attention_2")
"""Values of ``--attn-implementation`` (chosen at load: :mod:`bgotrace.modeling.loading`)."""


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``float32|bfloat16|float16`` to a torch dtype."""
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for float32 matmuls (and convolutions) on a CUDA device, or not (``--no-tf32``).

    Float32 models (and the perturbation's float32 arithmetic) multiply at a 10-bit mantissa
    (relative rounding ~5e-4 per product) and sum in float32, for several times float32's
    throughput on Ampere and later; its effect on rankings is not measured here (no GPU).
    The CPU has no TF32: nothing changes there.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    log.info("float32 matmuls on %s in %s", device, "TF32" if enabled else "full float32")


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


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    **{u + "B": 1000**k for k, u in enumerate("KMGT", start=1)},
    **{u + "IB": 1024**k for k, u in enumerate("KMGT", start=1)},
}


def parse_size(text: str, option: str = "--device-memory") -> int:
    """Bytes of a size such as ``80GiB`` (binary), ``24GB`` (decimal) or ``1000000`` (bytes)."""
    match = _SIZE_RE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{option} {text!r} is not a memory size: write a positive number and a unit, "
            "e.g. 80GiB, 24GB or 512MiB."
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def host_memory_bytes() -> int:
    """Memory this machine can give a new process: psutil's available, else /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional; Linux always has /proc/meminfo
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise ConfigError(
            "Cannot tell how much memory this machine has: pass --device-memory, e.g. 16GiB."
        ) from None


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` (a CUDA card's, or the host's available memory on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_memory_bytes()
