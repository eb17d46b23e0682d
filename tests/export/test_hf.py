"""The Hugging Face export loads in transformers as a native `nanochat` model and matches picochat:
same logits, same greedy generations, same token ids, same chat rendering."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from picochat.checkpoint import run_dir, save_model_only
from picochat.cli import main
from picochat.errors import UserError
from picochat.export.hf import check_exportable, export_hf
from picochat.model.gpt import GPTConfig, build_model
from picochat.tokenizer import Tokenizer
from tests.tokenizer.conftest import generated_documents

transformers = pytest.importorskip("transformers")

VARIED_TEXTS = [
    "Hello world! The cat sat on the mat.",
    "Numbers: 3.14159, 2025-10-13, 1000000 and 42nd street.",
    "  leading spaces,\ttabs\tand\n\nblank lines\r\n  indented\n",
    "Grüße aus München — Ça va très bien, merci!",
    "你好，世界！오늘 날씨가 정말 좋아요. Привет!",
    "Emoji 🎉🎉 and family 👨‍👩‍👧 plus zero\u200bwidth and non\u00a0breaking.",
    "def add(a, b):\n    return a + b  # it's done\n",
    "I'M SURE you'll see they've said we'd go; DON'T.",
    "",
    " ",
    "trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(generated_documents(60_000, seed=3), vocab_size=700)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny GQA model with random weights everywhere (trained-like: no zero projections)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       sequence_len=64, rope_theta=500.0, softcap=12.0)
    m = build_model(config, "cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def exported(model, tokenizer, tmp_path_factory) -> Path:
    return export_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


def test_loads_as_native_nanochat(exported, hf_model):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    assert hf_model.config.final_logit_softcapping == 12.0
    assert hf_model.config.rope_parameters["rope_theta"] == 500.0
    assert hf_model.dtype == torch.float32


def test_logits_match(model, hf_model, tokenizer):
    # 80 tokens: longer than sequence_len (64), so both sides extend their rotary tables.
    idx = torch.randint(0, tokenizer.vocab_size, (3, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf_model(idx).logits
    assert ours.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_every_embedding_row_trains(exported, tokenizer):
    """Fine-tuning the export in transformers updates every token's embedding, <|assistant_end|>'s too
    (a pad_token_id in config.json would make that row an nn.Embedding padding_idx, which gets no gradient)."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    eos = tokenizer.encode_special("assistant_end")
    ids = torch.tensor([tokenizer.encode("Hi there", prepend="<|bos|>", append=eos) + [tokenizer.bos_id]])
    hf_model(ids, labels=ids).loss.backward()
    assert hf_model.model.embed_tokens.weight.grad[eos].abs().max() > 0
    assert transformers.GenerationConfig.from_pretrained(exported).pad_token_id == eos  # batched generate pads

def test_greedy_generation_matches(model, hf_model, tokenizer):
    prompt = tokenizer.encode("The river ran", prepend="<|bos|>")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # our model without a cache: argmax of the last position
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                eos_token_id=None, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert out[0].tolist() == ids


def test_tokenizer_encodes_like_ours(tokenizer, hf_tokenizer):
    texts = VARIED_TEXTS + generated_documents(20_000, seed=11)
    rng = random.Random(0)
    pieces = ["ab", " ", "  ", "\n", "\n\n", "12", "345", "é", "世界", "🎉", "'s", "'LL", ".", "?!", "\t", "x"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf_tokenizer.decode(ids) == text
    assert len(hf_tokenizer) == tokenizer.vocab_size
    for name, token_id in tokenizer.special_tokens.items():
        assert hf_tokenizer.convert_tokens_to_ids(name) == token_id
    assert hf_tokenizer.bos_token_id == tokenizer.bos_id
    assert hf_tokenizer.eos_token_id == tokenizer.encode_special("assistant_end")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\nThanks."},
     {"role": "assistant", "content": "6, you're welcome."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system text is dropped."},
     {"role": "assistant", "content": "Right."}],
    [{"role": "user", "content": "Grüße! 你好 🎉"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": " so 84."}]}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_our_ids(tokenizer, hf_tokenizer, messages):
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=None)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    # Generation prompt: drop the last assistant turn and open a new one, as render_for_completion does.
    expected = tokenizer.render_for_completion({"messages": messages})
    got = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    assert got == expected


ADJACENT_TEXT_PARTS = [
    {"role": "user", "content": "Where?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "By the riv"}, {"type": "text", "text": "er: "},
        {"type": "python", "text": "1+"}, {"type": "python", "text": "2"},
        {"type": "python_output", "text": "3"}, {"type": "text", "text": "so "}, {"type": "text", "text": "3."}]},
    {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."},
]


def test_chat_template_joins_adjacent_text_parts_as_we_do(tokenizer, hf_tokenizer):
    """The template writes a turn out as one string, so adjacent text parts are encoded together;
    picochat joins them too, even where the seam falls inside a token (" river" here)."""
    assert tokenizer.encode("By the riv") + tokenizer.encode("er: ") != tokenizer.encode("By the river: ")
    messages = ADJACENT_TEXT_PARTS
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=None)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    got = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    assert got == tokenizer.render_for_completion({"messages": messages})


def test_chat_template_rejects_bad_role_order(hf_tokenizer):
    with pytest.raises(Exception, match="roles must alternate"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "first"}], tokenize=False)


def test_refuses_features_nanochat_lacks(model, tokenizer):
    state = model.state_dict()
    with_bias = {**state, "transformer.h.0.attn.c_q.bias": torch.zeros(64)}
    with pytest.raises(UserError, match="unexpected"):
        check_exportable(model.config, with_bias, tokenizer)
    Windowed = dataclasses.make_dataclass("Windowed", [("window_size", int, 32)], bases=(GPTConfig,))
    windowed = Windowed(**model.config.to_dict())
    with pytest.raises(UserError, match="window_size"):
        check_exportable(windowed, state, tokenizer)
    small = dataclasses.replace(model.config, vocab_size=tokenizer.vocab_size - 1)
    with pytest.raises(UserError, match="tokenizer has"):
        check_exportable(small, state, tokenizer)


def test_export_command(picochat_home, model, tokenizer, capsys):
    save_model_only(run_dir("sft", "t1"), model, tokenizer, {"step": 7, "stage": "sft"})
    out = picochat_home / "exported"
    assert main(["export", "--format", "hf", "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "sft" in capsys.readouterr().out
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == "nanochat" and config.bos_token_id == tokenizer.bos_id
    source = json.loads((out / "picochat_source.json").read_text())
    assert (source["stage"], source["tag"], source["step"]) == ("sft", "t1", 7)
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    # Without --out: under $PICOCHAT_HOME/export/hf/<stage>-<tag>-step<N>.
    assert main(["export", "--stage", "sft", "--tag", "t1"]) == 0
    assert (picochat_home / "export" / "hf" / "sft-t1-step7" / "tokenizer.json").exists()
    assert main(["export", "--stage", "rl"]) == 2  # no rl checkpoint: a clear error, not a traceback
    assert "no rl checkpoint" in capsys.readouterr().err
