"""A model with architecture options exports as transformers remote code: it loads with
trust_remote_code=True and matches picochat (logits in fp32 and bf16, greedy generations, the loss),
its code imports only torch and transformers, and a classic model still exports natively."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from picochat.checkpoint import run_dir, save_model_only
from picochat.cli import main
from picochat.errors import UserError
from picochat.export.hf import REMOTE_FILES, SUPPORTED_CONFIG_FIELDS, check_remote_exportable, export_hf
from picochat.infer.engine import Engine
from picochat.model.gpt import ARCH_2026, ARCH_OPTIONS, GPTConfig, build_model
from tests.infer.tiny import tiny_tokenizer
from tests.model.options import LONG, OPTIONS, options_config, randomize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def option_model(fields: dict, vocab_size: int) -> torch.nn.Module:
    """A 3-layer GQA model with `fields`, every option parameter and output projection non-trivial,
    and logits of a few units (lm_head starts near zero)."""
    torch.manual_seed(0)
    model = randomize(build_model(options_config(fields, vocab_size=vocab_size), "cpu"))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return option_model(ARCH_2026, tokenizer.vocab_size)


@pytest.fixture(scope="module")
def exported(model, tokenizer, tmp_path_factory) -> Path:
    return export_hf(model, tokenizer, tmp_path_factory.mktemp("remote") / "out")


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()


def random_ids(vocab_size: int, rows: int = 2) -> torch.Tensor:
    # LONG tokens: past the short window (128) and past sequence_len of the unwindowed configs (32).
    return torch.randint(0, vocab_size, (rows, LONG), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_exports_and_its_logits_match(option, tokenizer, tmp_path):
    model = option_model(OPTIONS[option], tokenizer.vocab_size)
    out = export_hf(model, tokenizer, tmp_path / option)
    config = json.loads((out / "config.json").read_text())
    remote = bool(model.config.non_classic())  # init alone keeps the architecture classic
    assert config["model_type"] == ("picochat" if remote else "nanochat")
    assert (out / "modeling_picochat.py").exists() == remote
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    idx = random_ids(tokenizer.vocab_size)
    with torch.no_grad():
        ours, theirs = model(idx), hf_model.eval()(idx).logits
    assert ours.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_config_carries_every_option_and_the_auto_map(model, exported, hf_model):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_picochat.PicochatConfig",
                                  "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"}
    assert {k: config[k] for k in model.config.to_dict()} == model.config.to_dict()
    assert config["window_sizes"] == [128, 128, None] and config["value_embed_layers"] == [0, 2]
    assert type(hf_model).__name__ == "PicochatForCausalLM" and hf_model.config.qk_scale == 1.2
    assert "trust_remote_code=True" in (exported / "README.md").read_text()
    # picochat's tensor names, unchanged
    from safetensors.torch import load_file

    assert set(load_file(str(exported / "model.safetensors"))) == set(model.state_dict())


def test_remote_config_defaults_are_the_classic_model():
    from picochat.export.remote.configuration_picochat import PicochatConfig

    remote = PicochatConfig()
    assert {name: getattr(remote, name) for name in SUPPORTED_CONFIG_FIELDS} == GPTConfig().to_dict()


def test_model_code_imports_only_torch_and_transformers(exported):
    for name in REMOTE_FILES:
        tree = ast.parse((exported / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= {"__future__", "contextlib", "typing", "torch", "transformers"}, (name, imported)


def test_tokenizer_files_are_the_native_exports(tokenizer, exported, tmp_path):
    classic = option_model({"sequence_len": 256}, tokenizer.vocab_size)  # the same context length
    native = export_hf(classic, tokenizer, tmp_path / "native")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (exported / name).read_bytes() == (native / name).read_bytes(), name
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation == {**json.loads((native / "generation_config.json").read_text()), "use_cache": False}


def test_bf16_export_matches_picochat_in_bf16(model, tokenizer, tmp_path):
    out = export_hf(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf_model.dtype == torch.bfloat16 and hf_model.resid_lambdas.dtype == torch.float32
    idx = random_ids(tokenizer.vocab_size)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model.with_weights_in(torch.bfloat16)(idx)
        theirs = hf_model(idx).logits
        full = model(idx)
    assert (ours - full).abs().max() > 1e-2  # bf16 is visibly not fp32 here, so the match below means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_greedy_generation_matches_the_engine(model, hf_model, tokenizer):
    prompt = tokenizer.encode("The quick brown", prepend="<|bos|>")
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)  # KV cache and decode step
    ours = engine.generate_batch(prompt, max_tokens=12, temperature=0.0, use_tools=False, keep_stop=True)[0][0]
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert len(ours) == 12 and out[0, len(prompt):].tolist() == ours


def test_left_padded_batch_generates_what_each_prompt_does_alone(hf_model, tokenizer):
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("The quick brown fox", "Hi")]
    width, pad = max(map(len, prompts)), tokenizer.encode_special("assistant_end")
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    together = hf_model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        alone = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert together[row, width:].tolist() == alone[0, len(prompt):].tolist()


def test_loss_matches(model, hf_model, tokenizer):
    idx = random_ids(tokenizer.vocab_size)
    with torch.no_grad():
        ours = model(idx[:, :-1], targets=idx[:, 1:])
        theirs = hf_model(idx, labels=idx).loss  # transformers' convention: shifted inside
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_refuses_what_the_remote_model_cannot_express(model, tokenizer):
    state = model.state_dict()
    with pytest.raises(UserError, match="unexpected") as refused:
        check_remote_exportable(model.config, {**state, "lm_head.bias": torch.zeros(1)}, tokenizer)
    assert "\n" not in str(refused.value)
    Odd = dataclasses.make_dataclass("Odd", [("parallel_blocks", bool, True)], bases=(GPTConfig,))
    with pytest.raises(UserError, match="parallel_blocks"):
        check_remote_exportable(Odd(**model.config.to_dict()), state, tokenizer)


def test_export_command_says_remote_code(picochat_home, model, tokenizer, capsys):
    save_model_only(run_dir("base", "arch"), model, tokenizer, {"step": 3, "stage": "base"})
    out = picochat_home / "exported"
    assert main(["export", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "remote code" in printed and "trust_remote_code=True" in printed
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.model_type == "picochat" and config.smear and config.window_pattern == "SSSL"


def test_a_classic_export_over_a_remote_one_leaves_no_remote_code(model, tokenizer, tmp_path):
    out = export_hf(model, tokenizer, tmp_path / "hf")
    assert all((out / name).exists() for name in REMOTE_FILES) and (out / "README.md").exists()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    classic = build_model(dataclasses.replace(model.config, **{name: defaults[name] for name in ARCH_OPTIONS}),
                          "cpu").eval()
    assert not classic.config.non_classic()
    export_hf(classic, tokenizer, out)
    assert not any((out / name).exists() for name in REMOTE_FILES) and not (out / "README.md").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text()) and (out / "notes.txt").exists()
