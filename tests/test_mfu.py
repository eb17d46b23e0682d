"""Peak table, MFU arithmetic and the CUDA allocator setting."""

from __future__ import annotations

import math
import os

import pytest
import torch

from picochat.mfu import gpu_peak_bf16, mfu_percent, peak_flops, use_expandable_segments


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
])
def test_known_gpus_have_their_own_peak(name, peak):
    assert gpu_peak_bf16(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA L40", "NVIDIA GeForce RTX 5090", "Tesla K80"])
def test_unknown_gpus_have_no_peak(name):
    assert math.isnan(gpu_peak_bf16(name))


def test_mfu_divides_by_world_size_times_device_peak():
    # 2 ranks together at 1000 tok/s, 1e9 FLOPs per token, 1e12 FLOP/s per device: 50%.
    assert mfu_percent(1e9, 1000, 1e12, world_size=2) == pytest.approx(50.0)
    assert mfu_percent(1e9, 1000, 1e12, world_size=1) == pytest.approx(100.0)
    assert math.isnan(mfu_percent(1e9, 1000, float("nan"), world_size=8))


def test_other_devices_have_no_peak():
    assert math.isnan(peak_flops(torch.device("meta"), torch.bfloat16))


def test_expandable_segments_added_without_dropping_user_settings(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128,expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    use_expandable_segments()  # the user's explicit choice wins
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
