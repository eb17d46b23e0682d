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
    ("NVIDIA H200 NVL", 835e12),  # the PCIe card, not an SXM
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


def test_a_cpu_peak_measured_on_a_busy_machine_is_measured_again_until_quiet(tmp_path, monkeypatch):
    """Other work can only slow the peak's matmul (MFU would read high): such a figure is provisional,
    the next start measures again and keeps the best, and a quiet measurement is final."""
    import json

    from picochat import mfu

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    measured = iter([1e11, 3e11, 2e11, 9e11])
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda dtype: next(measured))
    monkeypatch.setattr(mfu.os, "getloadavg", lambda: (1.0 + 2 * torch.get_num_threads(), 0.0, 0.0))
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.bfloat16) == 1e11  # busy: provisional
    entry = next(iter(json.loads((tmp_path / "cpu_peak.json").read_text()).values()))
    assert entry["flops"] == 1e11 and entry["busy_load"] > 0
    assert peak_flops(cpu, torch.bfloat16) == 3e11  # measured again, still busy
    monkeypatch.setattr(mfu.os, "getloadavg", lambda: (1.0, 0.0, 0.0))  # only this process runs
    assert peak_flops(cpu, torch.bfloat16) == 3e11  # quiet now, 2e11 measured: the best figure stays
    assert peak_flops(cpu, torch.bfloat16) == 3e11  # final: not measured again (9e11 never drawn)
    assert next(iter(json.loads((tmp_path / "cpu_peak.json").read_text()).values())) == 3e11
