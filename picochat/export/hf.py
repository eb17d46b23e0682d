"""Export a checkpoint as a Hugging Face transformers model.

A classic model (no architecture option on) becomes the native `nanochat` type: the directory
loads with `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`,
no remote code:

  config.json              NanoChatConfig fields (sizes, rope theta, softcap, special ids, dtype)
  generation_config.json   bos / eos (<|assistant_end|>) / pad ids for `generate`
  model.safetensors        our tensors under transformers' names
  tokenizer.json           a fast byte-level BPE tokenizer equivalent to ours
  tokenizer_config.json    special tokens and a chat template reproducing render_conversation

Any other model becomes transformers remote code (`from_pretrained(dir, trust_remote_code=True)`):
the same tokenizer files, our tensors under our own names, config.json with every GPTConfig field
and an auto_map to modeling_picochat.py / configuration_picochat.py, which are copied from
picochat/export/remote/ (standalone: torch and transformers only), and a README.md saying so.

The GPT matches the NanoChat architecture (see picochat/model/gpt.py) except for one sign:
transformers' NanoChat rotates q and k by -angle (its rotate_half is cat(x2, -x1)), ours by
+angle. Negating the second half of every head's q and k rows makes the two agree: the rotated
vectors then differ only in the sign of their second halves, which the q/k RMSNorm ignores and
which cancels in q.k. `check_exportable` refuses any checkpoint whose config or tensors carry
something the NanoChat type cannot express; `check_remote_exportable` does the same for the
remote-code model.

The tokenizer: tiktoken ranks become a BPE vocabulary in GPT-2's printable byte alphabet.
tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank;
a BPE merge list reproduces that when every split of a token into two vocabulary pieces
is listed, ordered by the rank of the token they form.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from picochat.errors import UserError
from picochat.model.gpt import ARCH_OPTIONS, GPT, GPTConfig
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from picochat.tokenizer.train_hf import bytes_to_unicode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_picochat.py", "modeling_picochat.py")

# GPTConfig fields the export can express: each maps into NanoChatConfig (the architecture
# options at their classic values only) and is a field of configuration_picochat.py. A field
# missing here is refused rather than silently dropped. The init scheme only decided the
# starting weights.
SUPPORTED_CONFIG_FIELDS = {"vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "sequence_len",
                           "softcap", "rope_theta", "norm_eps", "mlp_ratio", "init", *ARCH_OPTIONS}

# Our state-dict names -> transformers' names; {i} is the layer index.
LAYER_TENSORS = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj",
                 "attn.c_v": "self_attn.v_proj", "attn.c_proj": "self_attn.o_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# special_tokens_map.json, also part of tokenizer_config.json
SPECIAL_TOKENS_MAP = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                      "pad_token": "<|assistant_end|>"}

# Renders exactly what picochat.tokenizer.chat.render_conversation renders: <|bos|>, then per
# message its markers; a leading system message is folded into the first user message as
# system + "\n\n" + user; assistant content is a string or a list of text/python/python_output
# parts. `add_generation_prompt` opens the assistant turn the model is to write.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='', turns=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message is only allowed first') -}}{%- endif -%}"
    "{%- set ns.system = message['content'] -%}"
    "{%- else -%}"
    "{%- set expected = 'user' if ns.turns % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... after an optional system message') -}}"
    "{%- endif -%}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if ns.system -%}{{- ns.system + '\\n\\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- message['content'] -}}"
    "{{- '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


# ---- model ---------------------------------------------------------------------------------------
def check_exportable(config: GPTConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """Raise UserError if the checkpoint has anything the NanoChat model type cannot express."""
    if options := config.non_classic():
        raise UserError(f"the native NanoChat export takes the classic architecture only; this model uses "
                        f"{', '.join(options)} (export_hf writes it as remote code)")
    _check_layout(config, state_dict, tokenizer, set(rename_state_dict_keys(config)), "the NanoChat layout")


def check_remote_exportable(config: GPTConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """Raise UserError if the checkpoint has anything modeling_picochat.py cannot express: its
    tensors must be exactly those of a picochat GPT of this config."""
    with torch.device("meta"):
        expected = set(GPT(config).state_dict())
    _check_layout(config, state_dict, tokenizer, expected, "a picochat GPT's")


def _check_layout(config: GPTConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
                  expected: set[str], layout: str) -> None:
    if unknown := sorted(set(config.to_dict()) - SUPPORTED_CONFIG_FIELDS):
        raise UserError(f"model config fields {unknown} have no counterpart in the exported model; "
                        "this checkpoint cannot be exported with --format hf")
    extra = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    if extra or missing:
        raise UserError(f"model tensors differ from {layout} (unexpected {extra[:3]}, missing "
                        f"{missing[:3]}): biases, norm weights or other extra tensors cannot be exported")
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}; "
                        "the checkpoint's tokenizer/ does not belong to this model")


def needs_remote_code(config: GPTConfig) -> bool:
    """True when an architecture option is on: transformers' NanoChat type cannot hold the model."""
    return bool(config.non_classic())


def rename_state_dict_keys(config: GPTConfig) -> dict[str, str]:
    """Our tensor name -> transformers' tensor name, for every tensor of the model."""
    return {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
            **{f"transformer.h.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
               for i in range(config.n_layer) for ours, theirs in LAYER_TENSORS.items()}}


def negate_second_half_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(heads * head_dim, C) projection with rows head_dim/2.. of every head negated (rotation +angle -> -angle)."""
    out_dim, in_dim = weight.shape
    per_head = weight.reshape(out_dim // head_dim, 2, head_dim // 2, in_dim).clone()  # (H, half, D/2, C)
    per_head[:, 1].neg_()
    return per_head.reshape(out_dim, in_dim)


def hf_state_dict(config: GPTConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors under transformers' names, in `dtype`, q/k rows adapted to its rotary sign."""
    names = rename_state_dict_keys(config)
    out = {}
    for ours, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if ours.endswith(("attn.c_q.weight", "attn.c_k.weight")):
            tensor = negate_second_half_rows(tensor, config.head_dim)
        out[names[ours]] = tensor.to(dtype).contiguous()
    return out


def hf_config(config: GPTConfig, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json for NanoChatConfig (transformers >= 5 field names)."""
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_ratio * config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim, "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2", "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "final_logit_softcapping": config.softcap, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.encode_special("assistant_end"),
        # No pad id here: NanoChat makes it its embedding's padding_idx, whose row never trains, and
        # NanoChatConfig's default (1) would freeze a byte's row. generate() pads with generation_config's.
        "pad_token_id": None, "use_cache": True, "dtype": dtype,
    }


def remote_state_dict(config: GPTConfig, state_dict: dict[str, torch.Tensor],
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our tensors under our own names, in `dtype`; the per-layer scalars (1-D) stay fp32, as in
    picochat's own low-precision inference (`config`: for the same signature as hf_state_dict)."""
    return {name: t.detach().to("cpu", dtype if t.ndim > 1 else torch.float32).contiguous()
            for name, t in state_dict.items()}


def remote_config(config: GPTConfig, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json for configuration_picochat.PicochatConfig: every GPTConfig field under its own
    name, the per-layer layout derived from them, and the auto_map to the copied source files."""
    eos = tokenizer.encode_special("assistant_end")
    return {
        "architectures": ["PicochatForCausalLM"], "model_type": "picochat",
        "auto_map": {"AutoConfig": "configuration_picochat.PicochatConfig",
                     "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"},
        **config.to_dict(),
        "window_sizes": config.window_sizes(), "value_embed_layers": config.value_embed_layers(),
        "bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": eos,
        "tie_word_embeddings": False, "use_cache": False, "dtype": dtype,
    }


REMOTE_README = """# picochat model (transformers remote code)

Its architecture options ({options}) have no counterpart among transformers' built-in model
types, so the model's code travels in this directory: modeling_picochat.py and
configuration_picochat.py, written by picochat, importing only torch and transformers. Loading
it needs `trust_remote_code=True`:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("path/to/this/directory", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")

config.json holds every picochat GPTConfig field; model.safetensors keeps picochat's tensor names.
`generate()` recomputes the whole sequence at every step (no KV cache): exact, but slow for long
outputs.
"""


def generation_config(tokenizer: Tokenizer, use_cache: bool = True) -> dict[str, Any]:
    """Stop at <|assistant_end|> (end of a chat turn) or <|bos|> (start of a new document).
    `use_cache` False: the model keeps no KV cache, so generate() need not build one."""
    eos = tokenizer.encode_special("assistant_end")
    config = {"bos_token_id": tokenizer.bos_id, "eos_token_id": [eos, tokenizer.bos_id], "pad_token_id": eos}
    return config if use_cache else {**config, "use_cache": False}


# ---- tokenizer -----------------------------------------------------------------------------------
def bpe_vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[list[str]]]:
    """Our ranks as a byte-level BPE vocabulary (GPT-2 printable alphabet) and its merge list."""
    to_char = bytes_to_unicode()
    ranks = tokenizer.mergeable_ranks
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise UserError(f"the tokenizer lacks single-byte tokens for {len(missing)} bytes (e.g. {missing[0]}); "
                        "a byte-level BPE export needs all 256")

    def printable(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {printable(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], printable(left), printable(right)))
    merges.sort()
    return vocab, [[left, right] for *_, left, right in merges]


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json of a `tokenizers` fast tokenizer that encodes like ours."""
    # HF tokenizers loads only when a model is exported
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    vocab, merges = bpe_vocab_and_merges(tokenizer)
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], ignore_merges=True))
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for name in SPECIAL_TOKENS:
        if fast.token_to_id(name) != tokenizer.special_tokens[name]:
            raise UserError(f"special token {name} would get id {fast.token_to_id(name)} instead of "
                            f"{tokenizer.special_tokens[name]}; the tokenizer file is inconsistent")
    return fast.to_str(pretty=False)


def hf_tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS_MAP,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|assistant_end|>")],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len, "chat_template": CHAT_TEMPLATE,
    }


# ---- the directory -------------------------------------------------------------------------------
def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(model: torch.nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike,
              dtype: str = "float32", source: dict | None = None) -> Path:
    """Write the transformers directory for `model` + `tokenizer` into `out_dir`; returns it.
    Native NanoChat for a classic model, remote code otherwise (see the module docstring)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    config: GPTConfig = model.config
    state = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    remote = needs_remote_code(config)
    (check_remote_exportable if remote else check_exportable)(config, state, tokenizer)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    # Every file is written into a temporary directory inside `out` and moved in when all are complete:
    # a failure (a full disk) leaves a previous export there as it was.
    created = not out.is_dir()
    staging = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".export.tmp-*"):  # left by an export that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = out / f".export.tmp-{os.getpid()}"
        staging.mkdir()
        _write_files(staging, config, state, tokenizer, dtype, source, remote)
        _move_files(staging, out, remote)
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors (disk full, ...) as its own
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"--out {out}: cannot write there ({reason}); give a directory you can write") from e
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(out.iterdir()):
                out.rmdir()  # created here and left empty by a failure
    return out


def _write_files(out: Path, config: GPTConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer, dtype: str,
                 source: dict | None, remote: bool) -> None:
    tensors = (remote_state_dict if remote else hf_state_dict)(config, state, DTYPES[dtype])
    weights = out / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # safetensors creates it 0600; the other files get the usual mode
    _write_json(out / "config.json", (remote_config if remote else hf_config)(config, tokenizer, dtype))
    _write_json(out / "generation_config.json", generation_config(tokenizer, use_cache=not remote))
    (out / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", hf_tokenizer_config(tokenizer, config.sequence_len))
    _write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    if remote:
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, out / name)
        (out / "README.md").write_text(REMOTE_README.format(options=", ".join(config.non_classic())),
                                       encoding="utf-8")
    if source is not None:
        _write_json(out / "picochat_source.json", source)


def _move_files(staging: Path, out: Path, remote: bool) -> None:
    """Move the complete files from `staging` into `out`, the weights last."""
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "model.safetensors"):
        os.replace(path, out / path.name)
    if not remote:  # a remote-code export written here before: its code and its README would mislead
        for name in REMOTE_FILES:
            (out / name).unlink(missing_ok=True)
        readme = out / "README.md"
        if readme.is_file() and readme.read_text(encoding="utf-8").startswith(REMOTE_README.split("\n")[0]):
            readme.unlink()
