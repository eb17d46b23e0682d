"""RL's start-up memory check: the plan's estimate (the policy-gradient forward/backward and the
Engine's sampling) must fit the device before the starting checkpoint's weights load."""

from __future__ import annotations

import json

import pytest

from picochat import checkpoint as ckpt
from picochat import plan
from picochat.cli import main
from picochat.model.gpt import GPTConfig
from picochat.plan import SAMPLING, Shape, memory_terms
from picochat.train import rl
from tests.infer.tiny import save_tiny_checkpoint

# cpu-tiny's rl section: 2 problems x 2 samples per step, so a rank has 4 rows and device batch 2.
RL_TINY = ["rl", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-problems", "0", "--num-steps", "1"]


def tiny_need(batch: int) -> int:
    """The estimate (no headroom) for cpu-tiny's rl on the tiny checkpoint at device batch `batch`."""
    config = GPTConfig.from_dict(json.loads((ckpt.run_dir("sft", "tiny") / "step_1" / "config.json").read_text()))
    shape = Shape.from_config(config, batch, on_gpu=False, bf16=False, total_batch_tokens=4 * config.sequence_len,
                              sample_group=2)
    return sum(memory_terms(shape).values())


@pytest.fixture
def small_device(picochat_home, monkeypatch):
    """A tiny sft checkpoint and a device between the estimates of device batch 2 and 3 (no headroom);
    returns the list of checkpoint directories rl loaded weights from."""
    save_tiny_checkpoint("sft", "tiny", sequence_len=160)
    capacity = (tiny_need(2) + tiny_need(3)) // 2
    calls = []
    monkeypatch.setattr(plan, "headroom", lambda capacity, on_gpu: 0)
    monkeypatch.setattr(plan, "local_capacity", lambda device: (calls.append(device) or capacity, "the test device"))
    loaded = []
    load = rl.load_checkpoint_dir
    monkeypatch.setattr(rl, "load_checkpoint_dir", lambda path, device: loaded.append(path) or load(path, device))
    return calls, loaded


def test_rl_refuses_an_absurd_device_batch_before_the_weights_load(small_device, capsys):
    calls, loaded = small_device
    assert main([*RL_TINY, "--device-batch-size", "100000", "--tag", "big"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--device-batch-size 100000 needs" in err and "use --device-batch-size 2" in err
    assert "--no-plan-check" in err
    assert calls and not loaded
    assert not ckpt.run_dir("rl", "big").exists()


def test_no_plan_check_skips_rls_check(small_device):
    calls, loaded = small_device
    assert main([*RL_TINY, "--device-batch-size", "100000", "--tag", "forced", "--no-plan-check"]) == 0
    assert not calls and loaded
    assert ckpt.list_steps(ckpt.run_dir("rl", "forced")) == [1]


def test_a_normal_cpu_tiny_rl_run_passes_the_check(small_device):
    calls, loaded = small_device
    assert main([*RL_TINY, "--tag", "ok"]) == 0  # cpu-tiny's device batch 2
    assert calls and loaded
    assert ckpt.list_steps(ckpt.run_dir("rl", "ok")) == [1]


def test_sampling_is_a_moment_of_its_own():
    """The Engine's weights copy and KV cache for the rows it samples at once: min(device batch,
    samples per problem), or the eval's pass@k rows; a third moment, the peak when it is the largest."""
    config = GPTConfig(vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=4096)
    train = Shape.from_config(config, 2, on_gpu=False, total_batch_tokens=4 * 4096)
    assert SAMPLING not in memory_terms(train)
    rl_shape = Shape(**{**train.__dict__, "sample_group": 2, "eval_rows": 64})
    assert rl_shape.sampling_rows == 64 and Shape(**{**rl_shape.__dict__, "eval_rows": 0}).sampling_rows == 2
    terms = memory_terms(rl_shape)
    assert terms[SAMPLING] == plan.sampling_memory(rl_shape) > 0  # 64 rows of a 4096-token KV cache
    assert terms["activations"] == 0 and sum(terms.values()) > sum(memory_terms(train).values())
