"""TF32 for float32 matmuls: on for CUDA devices unless --no-tf32, never touched on the CPU."""

from __future__ import annotations

import pytest
import torch

from bgotrace.config import ExecutionConfig
from bgotrace.devices import set_tf32


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("enabled", [True, False])
def test_a_cuda_device_gets_the_requested_tf32(restore_tf32, enabled):
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    set_tf32(torch.device("cuda", 0), enabled)  # a flag: needs no GPU to be set
    assert torch.backends.cuda.matmul.allow_tf32 is enabled
    assert torch.backends.cudnn.allow_tf32 is enabled


def test_the_cpu_is_left_alone(restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = False
    set_tf32(torch.device("cpu"), True)
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_tf32_is_on_by_default_and_reaches_the_ray_workers():
    from bgotrace.dist.ray_executor import RayOptions

    assert ExecutionConfig().tf32 is True
    off = RayOptions.of(ExecutionConfig(tf32=False), 4, 0, torch.device("cpu"))
    assert off.tf32 is False
