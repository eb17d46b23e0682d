"""The architecture options (GPTConfig fields, classic by default): each changes the output and
trains, windows hide what they should, a KV cache carries them, checkpoints keep them, the native
export refuses them (remote code takes them), flags set them, FLOPs and the plan count them, and a classic model is what it was."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json

import pytest
import torch

from picochat.checkpoint import load_checkpoint_dir, load_weights_into, save_model_only
from picochat.config import ARCHITECTURE_FIELDS, architecture_options
from picochat.errors import ConfigError, DataError, UserError
from picochat.export.hf import check_exportable
from picochat.model.gpt import ARCH_2026, ARCH_OPTIONS, GPTConfig, attention_mask, attention_span, build_model
from picochat.model.kv_cache import KVCache
from picochat.optim import build_optimizers
from picochat.plan import Shape, memory_terms
from picochat.train import base_train
from tests.infer.tiny import tiny_tokenizer
from tests.model.options import LONG, OPTIONS, is_option_param, options_config, randomize


def windowed(option: str) -> bool:
    return "S" in OPTIONS[option].get("window_pattern", "L")


def test_classic_is_the_default_and_options_draw_after_the_classic_weights() -> None:
    assert GPTConfig().non_classic() == [] and options_config({}).non_classic() == []
    torch.manual_seed(0)
    classic = build_model(options_config({}), "cpu").state_dict()
    torch.manual_seed(0)
    every_option = build_model(options_config({k: v for k, v in ARCH_2026.items() if k != "init"}), "cpu")
    state = every_option.state_dict()
    for name, value in classic.items():  # a classic model's numbers are drawn first, unchanged
        assert torch.equal(state[name], value), name
    assert set(state) - set(classic) == {n for n, _ in every_option.named_parameters() if is_option_param(n)}


@pytest.mark.parametrize("option", OPTIONS)
@torch.no_grad()
def test_each_option_changes_the_output(option: str) -> None:
    torch.manual_seed(0)
    classic = randomize(build_model(options_config({}, sequence_len=256), "cpu"))
    torch.manual_seed(0)
    model = randomize(build_model(options_config(OPTIONS[option], sequence_len=256), "cpu"))
    idx = torch.randint(0, 97, (2, LONG))  # past the short window
    assert (model(idx) - classic(idx)).abs().max() > 1e-3


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_trains_and_its_parameters_get_gradients(option: str) -> None:
    torch.manual_seed(0)
    model = build_model(options_config(OPTIONS[option]), "cpu")  # as initialised: smear, c_proj start at 0
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    data = torch.randint(0, 97, (4, (LONG if windowed(option) else 32) + 1))
    losses = []
    for step in range(6):
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        losses.append(loss.item())
        if step == 2:  # after two updates every option's parameter is on a path to the loss
            for name, p in model.named_parameters():
                if is_option_param(name):
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_config_validation_and_old_configs() -> None:
    c = options_config(ARCH_2026)
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert set(ARCH_2026) <= set(c.to_dict())
    old = {k: v for k, v in options_config({}).to_dict().items() if k not in (*ARCH_OPTIONS, "init")}
    assert GPTConfig.from_dict(old) == options_config({})  # written before the options existed
    for bad, match in (({"window_pattern": "SXL"}, "window_pattern"), ({"window_pattern": ""}, "window_pattern"),
                       ({"qk_scale": 0.0}, "qk_scale"), ({"init": "2025"}, "init"),
                       ({"smear": True, "n_embd": 16, "n_head": 2}, "smear needs n_embd >= 24")):
        with pytest.raises(ConfigError, match=match):
            options_config(bad)


def test_window_sizes_tile_the_pattern_and_keep_the_last_layer_whole() -> None:
    def sizes(pattern, n_layer=5, seq=2048):
        return GPTConfig(n_layer=n_layer, sequence_len=seq, window_pattern=pattern).window_sizes()
    assert sizes("SSL") == [512, 512, None, 512, None]
    assert sizes("S", n_layer=2, seq=256) == [128, None]
    assert sizes("S", n_layer=2, seq=1000) == [256, None]  # a quarter (250) rounded up to 128s
    assert sizes("L") == [None] * 5


def test_attention_span_is_causal_within_the_window() -> None:
    assert attention_span(0, 10, None, "cpu") == (0, None)  # plain causal attention
    assert attention_span(0, 10, 9, "cpu") == (0, None)  # the window holds every query's past
    assert attention_span(20, 1, 5, "cpu") == (15, None)  # one query: a slice of the keys
    first, mask = attention_span(20, 4, 5, "cpu")  # queries 20..23 over keys 15..23
    expected = torch.tensor([[q - 5 <= k <= q for k in range(15, 24)] for q in range(20, 24)])
    assert first == 15 and torch.equal(mask, expected)
    assert torch.equal(attention_mask(torch.tensor([2]), torch.arange(4), None), torch.tensor([[1, 1, 1, 0]]).bool())


@torch.no_grad()
def test_a_windowed_layer_sees_exactly_the_window() -> None:
    torch.manual_seed(0)
    model = randomize(build_model(options_config({"window_pattern": "SL"}), "cpu"))
    assert [b.attn.window for b in model.transformer.h] == [128, None, None]
    attn = model.transformer.h[0].attn
    x = torch.randn(1, LONG, 64)
    cos, sin = model.rotary(0, LONG)
    last = attn(x, cos, sin, None)[0, -1]
    oldest_seen = LONG - 1 - 128
    far, near = x.clone(), x.clone()
    far[:, :oldest_seen] += 1.0
    near[:, oldest_seen] += 1.0
    torch.testing.assert_close(attn(far, cos, sin, None)[0, -1], last, rtol=0, atol=1e-6)
    assert (attn(near, cos, sin, None)[0, -1] - last).abs().max() > 1e-3


@torch.no_grad()
def test_a_cache_carries_smear_and_windows_through_chunks_and_expand() -> None:
    torch.manual_seed(0)
    model = randomize(build_model(options_config(ARCH_2026), "cpu")).eval()
    c = model.config
    idx = torch.randint(0, 97, (2, LONG))
    full = model(idx)
    cache = KVCache(2, c.n_layer, c.n_kv_head, c.head_dim, LONG)
    cuts = [0, 50, 140, 141, 142, LONG]  # prefill, a prefill that continues the cache, decode steps
    parts = [model(idx[:, a:b], kv_cache=cache) for a, b in itertools.pairwise(cuts)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)

    solo = KVCache(1, c.n_layer, c.n_kv_head, c.head_dim, LONG)
    model(idx[:1, :-1], kv_cache=solo)
    wide = solo.expand(2)
    nxt = torch.tensor([[5], [17]])
    out = model(nxt, kv_cache=wide)[:, -1]
    for row in range(2):
        expected = model(torch.cat([idx[:1, :-1], nxt[row:row + 1]], dim=1))[:, -1]
        torch.testing.assert_close(out[row:row + 1], expected, rtol=0, atol=1e-5)


def test_a_checkpoint_keeps_the_options_and_refuses_another_architecture(picochat_home) -> None:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = randomize(build_model(options_config(ARCH_2026, vocab_size=tok.vocab_size), "cpu"))
    path = save_model_only(picochat_home / "modern", model, tok, {"step": 1})
    loaded, _, meta = load_checkpoint_dir(path)
    assert loaded.config == model.config and json.loads((path / "config.json").read_text())["smear"] is True
    idx = torch.randint(0, tok.vocab_size, (1, 40))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    classic = build_model(options_config({}, vocab_size=tok.vocab_size, sequence_len=256), "cpu")
    with pytest.raises(DataError, match="value_embeds True there, False here"):
        load_weights_into(classic, path, meta)

    # a checkpoint written before the options existed: its config has none of the fields
    old = save_model_only(picochat_home / "old", classic, tok, {"step": 1})
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ARCHITECTURE_FIELDS}))
    meta = json.loads((old / "meta.json").read_text())  # such a checkpoint recorded its own config's sum
    meta["checksums"]["config.json"] = hashlib.sha256((old / "config.json").read_bytes()).hexdigest()
    (old / "meta.json").write_text(json.dumps(meta))
    old_model, _, old_meta = load_checkpoint_dir(old)
    assert old_model.config.non_classic() == []
    load_weights_into(classic, old, old_meta)
    smeared = build_model(options_config({"smear": True}, vocab_size=tok.vocab_size, sequence_len=256), "cpu")
    with pytest.raises(DataError, match="smear False there, True here"):
        load_weights_into(smeared, old, old_meta)


def test_native_export_refuses_every_option_and_takes_any_init() -> None:
    tok = tiny_tokenizer()
    for option, fields in OPTIONS.items():
        model = build_model(options_config(fields, vocab_size=tok.vocab_size), "meta")
        if option == "init_2026":
            check_exportable(model.config, model.state_dict(), tok)
            continue
        with pytest.raises(UserError, match="classic architecture only") as refused:
            check_exportable(model.config, model.state_dict(), tok)
        message = str(refused.value)
        assert "\n" not in message and all(name in message for name in fields if name in ARCH_OPTIONS)


def test_base_train_flags_set_the_options() -> None:
    parser = argparse.ArgumentParser()
    base_train.add_arguments(parser)
    args = parser.parse_args(["--value-embeds", "--smear", "--backout", "--window-pattern", "SSSL",
                              "--rope-theta", "100000"])
    options = architecture_options(args)
    assert options == {"value_embeds": True, "smear": True, "backout": True, "window_pattern": "SSSL",
                       "rope_theta": 100000.0}
    config = GPTConfig.from_depth(4, 512, head_dim=64, max_seq_len=256, **options)
    assert config.non_classic() == ["value_embeds=True", "smear=True", "backout=True", "window_pattern='SSSL'"]
    args = parser.parse_args(["--layer-lambdas", "--qk-scale", "1.2", "--init", "2026", "--no-smear"])
    assert architecture_options(args) == {"layer_lambdas": True, "qk_scale": 1.2, "init": "2026", "smear": False}
    assert architecture_options(parser.parse_args([])) == {}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert set(ARCH_2026) <= set(ARCHITECTURE_FIELDS) <= fields  # the recipe is a group of flags
    with pytest.raises(ConfigError, match="window_pattern"):
        GPTConfig.from_depth(4, 512, **architecture_options(parser.parse_args(["--window-pattern", "SXL"])))


def test_flops_and_the_plan_count_windows_and_value_embeddings_as_lookups() -> None:
    config = options_config(ARCH_2026)  # sequence_len 256, windows [128, 128, whole]
    model = build_model(config, "meta")
    classic = build_model(options_config({}, sequence_len=256), "meta")
    assert model.num_scaling_params() == classic.num_scaling_params()
    assert model.flops_per_token() == 6 * classic.num_scaling_params() + 12 * 64 * (128 + 128 + 256)
    shape = Shape.from_config(config, 2)
    scalars_and_gates = sum(p.numel() for n, p in model.named_parameters()
                            if is_option_param(n) and not n.startswith("value_embeds"))
    assert shape.params == model.num_params() - scalars_and_gates
    assert shape.flops_per_token() == model.flops_per_token()
    classic_shape = Shape.from_config(classic.config, 2)
    assert classic_shape.params == classic.num_params() and classic_shape.flops_per_token() == classic.flops_per_token()
    value_embeds = sum(t.weight.numel() for t in model.value_embeds.values())
    assert (memory_terms(shape)["optimiser state"] - memory_terms(classic_shape)["optimiser state"]
            == 8 * value_embeds)


def test_serving_casts_keep_the_scalars_in_fp32() -> None:
    torch.manual_seed(0)
    model = build_model(options_config(ARCH_2026), "cpu")
    copy = model.with_weights_in(torch.bfloat16)
    model.cast_weights_(torch.bfloat16)
    for m in (model, copy):
        assert m.lm_head.weight.dtype == m.value_embeds["0"].weight.dtype == torch.bfloat16
        assert m.resid_lambdas.dtype == m.backout_lambda.dtype == torch.float32
    assert copy.resid_lambdas.data_ptr() != model.resid_lambdas.data_ptr()
