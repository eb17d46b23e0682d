"""The GPT: a decoder-only transformer sized by one dial, `depth`.

Architecture (kept identical to Hugging Face transformers' `NanoChat` model type, so
export is a renaming of tensors plus one fixed sign flip: transformers rotates by the
opposite angle, so picochat.export.hf negates the second half of each q/k head's rows):
- token embedding, then a parameter-free RMSNorm; no learned positions;
- pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x));
- attention: separate q/k/v/out projections, rotary embeddings in the rotate_half
  convention (frequencies concatenated, not interleaved), then RMSNorm of q and k
  (after rotary), scale head_dim**-0.5, causal, optional grouped-query attention;
- MLP: 4x expansion with ReLU^2;
- final RMSNorm, untied lm_head, logits softcapped: softcap * tanh(logits / softcap).
No biases and no norm weights anywhere; every RMSNorm uses eps 1e-6.

That is the classic architecture, GPTConfig's defaults. Options (GPTConfig fields, all off by
default; ARCH_2026 turns them on together; export writes a model that uses any as transformers remote code):
- value_embeds: on every other layer, ending with the last, a second embedding table per layer
  whose row for the token is added to v, scaled per kv head by 3 * sigmoid(W x[:12]);
- layer_lambdas: x = resid_lambda[i] * x + x0_lambda[i] * x0 before block i, x0 the embedding;
- smear: each token's embedding gets smear_lambda * sigmoid(W x[:24]) times the previous
  token's added (a KV cache keeps every row's embeddings for the next call's first token);
- backout: backout_lambda times the residual after block n_layer // 2 is subtracted before
  the final norm (with fewer than 3 layers that block is the last, and the norm undoes it);
- window_pattern: per-layer sliding-window attention (GPTConfig.window_sizes);
- qk_scale: the normed q and k are each multiplied by it (sharper attention).
The small gates are computed as elementwise products summed per row (gate_logits), so a row's
value never depends on the batch around it.

The model is declared on the meta device (no memory, no init work) and then
materialised and initialised explicitly by `build_model`; master weights are fp32.
Mixed precision comes from the caller's `torch.autocast`; logits and losses are fp32.

The training loss never materialises the (B*T, vocab) logits: `_LinearSoftcapCrossEntropy`
runs lm_head, softcap and cross-entropy chunk by chunk and computes their gradient on
the way, which on a CPU saves several full passes over a tensor of B*T*vocab floats
(1 GiB at B=32, T=256, vocab 32768) and skips the rows whose target is ignored.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from picochat.errors import ConfigError
from picochat.model import fused_ce
from picochat.model.kv_cache import KVCache
from picochat.runtime import warn

IGNORE_INDEX = -1
INIT_SCHEMES = ("classic", "2026")
SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of a token's embedding
VALUE_GATE_CHANNELS = 12  # the value-embedding gate reads this many leading channels of the block input
# The architecture options: fields whose defaults are the classic model (export needs them so).
ARCH_OPTIONS = ("value_embeds", "layer_lambdas", "smear", "backout", "window_pattern", "qk_scale")
# Every option on, with the rotary base and init scheme they were tuned with: one group of fields.
ARCH_2026: dict[str, Any] = {"value_embeds": True, "layer_lambdas": True, "smear": True, "backout": True,
                             "window_pattern": "SSSL", "qk_scale": 1.2, "rope_theta": 100000.0, "init": "2026"}
# What each GPTConfig field's annotation allows (a config.json value of another type is refused).
_FIELD_TYPES: dict[str, tuple[type, str]] = {"int": (numbers.Integral, "an integer"), "float": (numbers.Real, "a number"),
                                             "bool": (bool, "true or false"), "str": (str, "a string")}


@dataclass
class GPTConfig:
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    sequence_len: int = 2048
    softcap: float = 15.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    mlp_ratio: int = 4
    value_embeds: bool = False  # a gated value embedding on every other layer
    layer_lambdas: bool = False  # learned residual and x0 scalars before every block
    smear: bool = False  # mix the previous token's embedding into each token's
    backout: bool = False  # subtract a learned share of the middle layer's residual at the end
    window_pattern: str = "L"  # per-layer attention windows, tiled: L the whole context, S short
    qk_scale: float = 1.0  # factor on the normed queries and keys
    init: str = "classic"  # weight init scheme: classic or 2026 (see GPT.init_weights)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(GPTConfig):  # these fields' types (a subclass checks its own)
            value, (kind, what) = getattr(self, field.name), _FIELD_TYPES[field.type]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ConfigError(f"model config: {field.name}={value!r} must be {what}")
            if kind is numbers.Real and not math.isfinite(value):
                raise ConfigError(f"model config: {field.name}={value!r} must be a finite number")
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "sequence_len", "mlp_ratio"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model config: {name}={getattr(self, name)} must be a positive integer")
        rules = [  # (broken, what is wrong), checked in this order
            (self.n_embd % self.n_head, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}"),
            (self.n_head % self.n_kv_head,
             f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"),
            (self.head_dim % 2, f"head_dim={self.head_dim} must be even for rotary embeddings"),
            (self.softcap <= 0, f"softcap={self.softcap} must be > 0"),
            (self.rope_theta <= 0,
             f"rope_theta={self.rope_theta} must be > 0 (the rotary base, default 10000)"),
            (not self.window_pattern or set(self.window_pattern) - set("SL"),
             (f"window_pattern={self.window_pattern!r} must be letters S (short window) and L "
              "(whole context), tiled over the layers, e.g. SSSL")),
            (self.norm_eps <= 0, f"norm_eps={self.norm_eps} must be > 0 (RMSNorm's epsilon, default 1e-6)"),
            (self.qk_scale <= 0, f"qk_scale={self.qk_scale} must be > 0"),
            (self.init not in INIT_SCHEMES,
             f"init={self.init!r} is unknown; choose one of {', '.join(INIT_SCHEMES)}"),
        ]
        for broken, problem in rules:
            if broken:
                raise ConfigError(f"model config: {problem}")
        for option, channels in (("smear", SMEAR_CHANNELS), ("value_embeds", VALUE_GATE_CHANNELS)):
            if getattr(self, option) and self.n_embd < channels:
                raise ConfigError(f"model config: {option} needs n_embd >= {channels} (its gate reads that many "
                                  f"channels), got {self.n_embd}; use a wider model or turn {option} off")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, aspect_ratio: int = 64, head_dim: int = 128,
                   max_seq_len: int = 2048, n_kv_head: int | None = None, **options: Any) -> GPTConfig:
        """The one-dial config: width = depth * aspect_ratio rounded UP to a multiple of head_dim.

        `options`: other fields as they are (the architecture options, rope_theta, init)."""
        if depth < 1 or aspect_ratio < 1 or head_dim < 1:
            raise ConfigError(f"--depth {depth}, --aspect-ratio {aspect_ratio}, --head-dim {head_dim}: "
                              "all must be positive")
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, sequence_len=max_seq_len,
                   n_head=n_head, n_kv_head=n_head if n_kv_head is None else n_kv_head, **options)

    def window_sizes(self) -> list[int | None]:
        """Per layer, how many earlier tokens a query attends to besides itself (None: all of them).

        window_pattern is tiled over the layers; L is the whole context, S a quarter of sequence_len
        rounded up to a multiple of 128 (512 at 2048); the last layer always sees the whole context.
        """
        short = -(-self.sequence_len // 512) * 128  # ceil(ceil(len / 4) / 128) * 128
        pattern = self.window_pattern
        return [None if i == self.n_layer - 1 or pattern[i % len(pattern)] == "L" else short
                for i in range(self.n_layer)]

    def value_embed_layers(self) -> list[int]:
        """The layers with a value embedding: every other one, ending with the last (none when off)."""
        return [i for i in range(self.n_layer) if self.value_embeds and i % 2 == (self.n_layer - 1) % 2]

    def non_classic(self) -> list[str]:
        """'field=value' for every architecture option that is not at its classic value."""
        classic = {f.name: f.default for f in dataclasses.fields(self)}
        return [f"{name}={getattr(self, name)!r}" for name in ARCH_OPTIONS if getattr(self, name) != classic[name]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a JSON object of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ConfigError(f"model config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): logits bounded to (-cap, cap), near-identity around 0."""
    return cap * torch.tanh(logits / cap)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (accumulates in fp32 for bf16 inputs too)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, written on the two halves. x (B, H, T, D); cos, sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x[..., :k] @ weight.T for a small (n, k) gate weight -> (..., n), as elementwise products
    summed in x's dtype: autocast leaves it alone, and each row is summed on its own, so a row's
    gate does not depend on how many rows come with it (as a GEMM's rounding can)."""
    return (x[..., None, :weight.size(1)] * weight).sum(-1)


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (..., queries, keys): the key at position j is visible to the query at position p
    when p - window <= j <= p (window None: j <= p). query_pos (..., queries), key_pos (keys,)."""
    behind = query_pos.unsqueeze(-1) - key_pos
    return behind >= 0 if window is None else (behind >= 0) & (behind <= window)


def attention_span(past: int, T: int, window: int | None, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """What T queries at positions past .. past+T-1 attend to among keys 0 .. past+T-1:
    (the first key any of them sees, a mask over the keys from there on, or None when a single
    query sees them all or plain causal attention over fresh keys is exact)."""
    first = 0 if window is None else max(0, past - window)
    if T == 1 or (past == 0 and (window is None or window >= T - 1)):
        return first, None
    return first, attention_mask(torch.arange(past, past + T, device=device),
                                 torch.arange(first, past + T, device=device), window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps, self.qk_scale = config.norm_eps, config.qk_scale
        self.window = config.window_sizes()[layer_idx]
        kv_dim = config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        has_value_embed = layer_idx in config.value_embed_layers()
        self.ve_gate = nn.Parameter(torch.empty(config.n_kv_head, VALUE_GATE_CHANNELS)) if has_value_embed else None

    def rotate_norm(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    norm: Callable[[torch.Tensor, float], torch.Tensor] = rms_norm) -> torch.Tensor:
        """Rotary embedding, then RMSNorm, then qk_scale: queries and keys (..., T, D) alike.
        (`norm`: rms_norm or an implementation equal to it, as the CPU decode step passes.)"""
        t = norm(apply_rotary(t, cos, sin), self.eps)
        return t if self.qk_scale == 1.0 else t * self.qk_scale

    def value_residual(self, v: torch.Tensor, x: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
        """v (..., H_kv, D) plus the token's value embedding ve (..., H_kv * D), scaled per kv head by
        3 * sigmoid(gate(x)) in (0, 3), x (..., C) the block's normed input; in v's dtype."""
        return (v + self.value_gate(x).unsqueeze(-1) * ve.view(v.shape)).to(v.dtype)

    def value_gate(self, x: torch.Tensor) -> torch.Tensor:
        """value_residual's scale per kv head (..., H_kv), 3 * sigmoid(gate(x)), for x (..., C)."""
        return 3.0 * torch.sigmoid(gate_logits(x, self.ve_gate))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            v = self.value_residual(v, x, ve)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, D)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = self.rotate_norm(q, cos, sin), self.rotate_norm(k, cos, sin)
        past = 0 if kv_cache is None else kv_cache.pos
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, H_kv, past + T, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        first, mask = attention_span(past, T, self.window, x.device)
        y = F.scaled_dot_product_attention(q, k[:, :, first:], v[:, :, first:], attn_mask=mask,
                                           is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None, ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.eps), cos, sin, kv_cache, ve)
        return x + self.mlp(rms_norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        """Declares modules only (works on the meta device); `init_weights` fills them.

        An option that is off adds nothing: its parameters are None, so a classic model's state
        dict is exactly the classic one."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer))})
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.n_kv_head * config.head_dim)
                                           for i in config.value_embed_layers()})
        L, lambdas = config.n_layer, config.layer_lambdas
        self.resid_lambdas = nn.Parameter(torch.empty(L)) if lambdas else None
        self.x0_lambdas = nn.Parameter(torch.empty(L)) if lambdas else None
        self.smear_gate = nn.Parameter(torch.empty(1, SMEAR_CHANNELS)) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.empty(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.empty(1)) if config.backout else None
        self.backout_layer = L // 2 if config.backout else None
        # Rotary tables (T, D/2); derived from the config, so not saved in the state dict.
        half = config.head_dim // 2
        self.register_buffer("rotary_cos", torch.empty(config.sequence_len, half), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(config.sequence_len, half), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer, in a fixed order, from torch's global RNG.

        init "classic":
        - wte ~ N(0, 1): its output is RMS-normed at once, so the scale only sets how far
          one AdamW step (absolute units) moves an embedding; 1 matches those steps.
        - q, k, v, c_fc ~ U(-a, a), std 1/sqrt(n_embd): their inputs are RMS-normed (unit
          rms per coordinate), so every output coordinate starts with unit variance.
          Uniform has no tails, so no unit starts saturated.
        - both c_proj = 0: each block starts as the identity, the residual stream starts as
          the normed embedding, and depth adds signal only as fast as training asks.
        - lm_head ~ N(0, 0.001): logits start near 0 (loss near ln(vocab)), but not exactly
          0, so gradients reach the blocks from the first step.
        init "2026": wte ~ N(0, 0.8) and c_fc with a 0.4x narrower bound; the rest as classic.
        The options' parameters come after all of those (a classic model draws what it always
        drew): value embeddings like c_v; gates ~ U(0, 0.02); smear_lambda 0; backout_lambda 0.2;
        resid/x0 lambdas 1/0 (the blocks as without them), or with init 2026 from 1.15/0.20 at
        the first layer down to 1.05/0.05 at the last.
        """
        c = self.config
        modern = c.init == "2026"
        bound = math.sqrt(3.0) / math.sqrt(c.n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if modern else 1.0)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            fc_bound = 0.4 * bound if modern else bound
            nn.init.uniform_(block.mlp.c_fc.weight, -fc_bound, fc_bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        for gate in [b.attn.ve_gate for b in self.transformer.h] + [self.smear_gate]:
            if gate is not None:
                nn.init.uniform_(gate, 0.0, 0.02)
        if self.smear_lambda is not None:
            nn.init.zeros_(self.smear_lambda)
        if self.backout_lambda is not None:
            nn.init.constant_(self.backout_lambda, 0.2)
        if self.resid_lambdas is not None:
            depth = torch.arange(c.n_layer, dtype=torch.float32) / max(c.n_layer - 1, 1)  # 0 .. 1
            self.resid_lambdas.copy_(1.15 - 0.10 * depth if modern else torch.ones(c.n_layer))
            self.x0_lambdas.copy_(0.20 - 0.15 * depth if modern else torch.zeros(c.n_layer))
        self._set_rotary(c.sequence_len, self.lm_head.weight.device)

    def _set_rotary(self, length: int, device: torch.device) -> None:
        """cos/sin tables of angle t * theta**(-2i/D), t < length, i < D/2 (fp32)."""
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64,
                                                                 device=device).float() / dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        self.rotary_cos, self.rotary_sin = angles.cos(), angles.sin()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab) fp32 softcapped, or the loss if targets are given.

        Loss: cross-entropy ignoring targets == -1. "mean": over the valid targets (0.0 if
        there are none), "sum": their sum, "none": (B, T) with 0 where ignored.
        """
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction={loss_reduction!r}; use 'mean', 'sum' or 'none'")
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return softcap_logits(self.lm_head(x).float(), self.config.softcap)  # (B, T, vocab)
        return self._loss(x, targets, loss_reduction)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final RMS-normed hidden states (B, T, C) that lm_head reads.

        The inference engine unembeds only the positions it samples from (see
        picochat.infer.unembed); everything else goes through forward(). The steps around the
        blocks (embed, layer_input, value_embedding, final_norm) are methods that
        picochat.infer.decode.DecodeStep calls too.
        """
        T = idx.size(1)
        cos, sin = self.rotary(kv_cache.pos if kv_cache is not None else 0, T)  # (T, D/2)
        x = x0 = self.embed(idx, kv_cache)  # (B, T, C)
        mid = None
        for i, block in enumerate(self.transformer.h):
            x = block(self.layer_input(i, x, x0), cos, sin, kv_cache, self.value_embedding(i, idx))
            if i == self.backout_layer:
                mid = x
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.final_norm(x, mid)

    def embed(self, idx: torch.Tensor, kv_cache: KVCache | None = None, positions: torch.Tensor | None = None,
              norm: Callable[[torch.Tensor, float], torch.Tensor] = rms_norm) -> torch.Tensor:
        """idx (B, T) -> the normed token embeddings (B, T, C), fp32, smeared when that option is on.

        The residual stream is fp32 also when the weights are held in bf16 for inference
        (with_weights_in), as it is under autocast with fp32 master weights in training. With a
        cache, smear reads the embedding before each row's first token from it and stores these
        (KVCache.swap_embeddings; `positions` as in DecodeStep)."""
        x = norm(self.transformer.wte(idx).float(), self.config.norm_eps)
        if self.smear_gate is None:
            return x
        before = x.new_zeros(x.size(0), x.size(2)) if kv_cache is None else kv_cache.swap_embeddings(x, positions)
        previous = torch.cat([before.unsqueeze(1), x[:, :-1]], dim=1)  # (B, T, C); zeros: no token before
        return x + self.smear_lambda * torch.sigmoid(gate_logits(x, self.smear_gate)) * previous

    def layer_input(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """What block i reads: x, or resid_lambda[i] * x + x0_lambda[i] * x0 (x0: the embedding)."""
        return x if self.resid_lambdas is None else self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0

    def value_embedding(self, i: int, idx: torch.Tensor) -> torch.Tensor | None:
        """Layer i's value embedding of the tokens idx (..., H_kv * D), or None where it has none."""
        return self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None

    def final_norm(self, x: torch.Tensor, mid: torch.Tensor | None,
                   norm: Callable[[torch.Tensor, float], torch.Tensor] = rms_norm) -> torch.Tensor:
        """RMSNorm of the last residual, after subtracting backout_lambda * mid (the middle layer's).
        (`norm` in both: rms_norm or an implementation equal to it, as in rotate_norm.)"""
        if mid is not None:
            x = x - self.backout_lambda * mid
        return norm(x, self.config.norm_eps)

    def rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, D/2) for positions start .. start+length-1; the tables grow on demand."""
        if start + length > self.rotary_cos.size(0):
            self._set_rotary(max(2 * self.rotary_cos.size(0), start + length), self.rotary_cos.device)
        return self.rotary_cos[start:start + length], self.rotary_sin[start:start + length]

    def _loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        B, T, C = x.shape
        x, targets = x.reshape(B * T, C), targets.reshape(B * T)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
        if torch.compiler.is_compiling() or (needs_grad and reduction == "none"):
            # The compiler fuses softcap + cross-entropy on its own; and a per-token loss that
            # is back-propagated needs the per-token graph anyway.
            logits = softcap_logits(self.lm_head(x).float(), self.config.softcap)
            losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        elif needs_grad:
            return _LinearSoftcapCrossEntropy.apply(x, self.lm_head.weight, targets, self.config.softcap,
                                                    reduction == "mean")
        else:
            losses, _, _ = _softcap_cross_entropy_chunks(x, self.lm_head.weight, targets, self.config.softcap,
                                                         grad_scale=None)
        if reduction == "none":
            return losses.view(B, T)
        total = losses.sum()
        return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weights_dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.no_grad()
    def cast_weights_(self, dtype: torch.dtype) -> GPT:
        """Hold every weight in `dtype`, in place (the rotary tables and the per-layer scalars stay
        fp32: they scale the fp32 residual stream): for serving, where the model never trains, so
        matmuls read compute-dtype weights without a cast per call. Run it under
        torch.autocast(dtype) (the residual stream stays fp32)."""
        for param in self.parameters():
            if param.ndim > 1:
                param.data = param.data.to(dtype)
        return self

    @torch.no_grad()
    def with_weights_in(self, dtype: torch.dtype) -> GPT:
        """This model with its weights in `dtype`: itself if they already are, else a copy
        (one pass over the weights) that shares the rotary tables; for a generation from a model
        that keeps training (RL), whose fp32 master weights must stay as they are."""
        if self.weights_dtype() == dtype:
            return self
        with torch.device("meta"):
            clone = GPT(self.config)
        clone.load_state_dict({k: v.to(dtype) if v.ndim > 1 else v.clone() for k, v in self.state_dict().items()},
                              assign=True)
        clone.rotary_cos, clone.rotary_sin = self.rotary_cos, self.rotary_sin
        return clone.train(self.training).requires_grad_(False)

    def num_scaling_params(self) -> int:
        """Block matrices + lm_head: the parameters that cost FLOPs. The token and value embeddings
        are lookups; the options' gates and scalars are elementwise (and a few hundred numbers)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul parameter (fwd + bwd) + attention scores/values
        over the keys a query sees at full length (min(window, T) per layer)."""
        c, T = self.config, self.config.sequence_len
        attended = sum(T if w is None else min(w, T) for w in c.window_sizes())
        return 6 * self.num_scaling_params() + 12 * c.n_embd * attended


def build_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """Declare on meta, materialise on `device` (uninitialised), then initialise explicitly."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


# ----------------------------------------------------------------------------------------------
def compiled_for_training(model: GPT, **compile_kwargs: Any) -> Callable[..., torch.Tensor]:
    """`model` as a training loop calls it, model(idx, targets, loss_reduction=...), through torch.compile.

    On a CPU only the trunk (hidden_states: embedding, blocks, final norm) is compiled and the loss
    stays eager, chunked through its fused C kernel, which the compiler cannot trace: compiled whole,
    the graph takes the plain loss and materialises the (N, vocab) logits and their gradient. Measured
    on a 2-core AMX Xeon (d4, vocab 32K, B=32, T=256, bf16): the whole model compiled ran 3,522 tok/s,
    eager 6,560, the trunk compiled beside the eager loss 0.91 s per forward+backward against eager's
    1.13 s. On other devices the whole model is compiled (the compiler fuses softcap and
    cross-entropy there itself). Where the compiler cannot build its CPU kernels (no working C++
    toolchain), the first call says so in one warning and training goes on eagerly."""
    if model.lm_head.weight.device.type != "cpu":
        return torch.compile(model, **compile_kwargs)
    trunk = torch.compile(model.hidden_states, **compile_kwargs)

    def forward(idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        nonlocal trunk
        if targets is None or kv_cache is not None or loss_reduction not in ("mean", "sum", "none"):
            return model(idx, targets, kv_cache, loss_reduction)  # what forward() does (or says is wrong)
        try:
            x = trunk(idx)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # raised before the graph ran: nothing to undo
            reason = str(e.inner_exception).strip().splitlines() or [type(e.inner_exception).__name__]
            warn(f"torch.compile could not build its CPU kernels ({reason[0][:200]}); "
                 "training eagerly (--compile off skips the attempt)")
            trunk = model.hidden_states
            x = trunk(idx)
        return model._loss(x, targets, loss_reduction)

    return forward


# lm_head + softcap + cross-entropy, chunk by chunk


def _softcap_cross_entropy_chunks(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  softcap: float, grad_scale: torch.Tensor | None,
                                  rows_per_chunk: int | None = None,
                                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token loss (N,) of logits softcap * tanh(x @ weight.T / softcap); 0 where the target is ignored.

    With `grad_scale` (N,) given, also returns the gradients of sum(grad_scale * loss) with
    respect to x (N, C) and weight (V, C). Rows with an ignored target are skipped entirely.

    Every full pass over a (rows, vocab) chunk counts on a CPU, hence tanh written through the
    sigmoid (3.5x cheaper in torch's CPU kernels): with a = x @ (2 W / cap).T and s = sigmoid(a),
        z = cap * tanh(a / 2) = cap * (2 s - 1),   dz/da = 2 cap * s * (1 - s),
    so d/dx = 4 * (g @ W) and d/dW = 4 * (g.T @ x) for g = dL/dz * s * (1 - s). On a CPU the
    elementwise part runs in one pass per row through a C kernel (picochat/model/fused_ce.py);
    elsewhere, or without it, as in-place torch ops over two buffers allocated once.
    """
    N, V = x.size(0), weight.size(0)
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype  # the compute dtype
    want_grad = grad_scale is not None
    losses = torch.zeros(N, dtype=torch.float32, device=x.device)
    grad_x = torch.zeros_like(x) if want_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
    rows = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    if rows.numel() == N:
        rows = None  # all valid (pretraining): plain slices, no gathers
    n_valid = N if rows is None else rows.numel()
    # Rows per chunk (unless given): one (rows, vocab) fp32 buffer of about 128 MiB on a CPU, 256 MiB on
    # a GPU. Enough rows for efficient matmuls: on a 2-core AVX2 CPU the three (rows x width x vocab)
    # products run at ~100 GFLOP/s with 256 rows and ~135 with 1024 (vocab 32K, width 256), which
    # outweighs the elementwise passes leaving the cache. The buffers are allocated once per call, not
    # per chunk (fresh pages cost more than the arithmetic on them).
    rows_per_chunk = rows_per_chunk or max(16, ((32 << 20) if x.device.type == "cpu" else (64 << 20)) // V)
    step = min(rows_per_chunk, max(n_valid, 1))
    w_a = (weight * (2.0 / softcap)).to(dtype)  # (V, C): x @ w_a.T = a, one pass fewer than dividing
    # exp(z + cap) = exp(2 cap s) cannot overflow when vocab * e^(2 cap) fits in fp32; the shift
    # then cancels in the softmax and comes off the log-sum-exp. Larger caps subtract it first.
    shift = softcap if 2.0 * softcap + math.log(V) < 80.0 else 0.0
    # The kernel reads fp32 or bf16 chunks; an fp16 evaluation (--dtype fp16) takes the torch ops.
    fused = x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and fused_ce.available()
    elementwise = _FusedRows(step, V, dtype, x.device) if fused else _TorchRows(step, V, dtype, x.device, want_grad)
    with torch.autocast(x.device.type, enabled=False):
        for lo in range(0, n_valid, step):
            sel = slice(lo, lo + step) if rows is None else rows[lo:lo + step]  # the last chunk may be short
            xs, ts = x[sel].to(dtype), targets[sel]  # (n, C), (n,)
            loss, sum_exp, g = elementwise(xs, w_a, ts, softcap, shift, want_grad)
            losses[sel] = loss
            if not want_grad:
                continue
            # The per-row factor c = scale / sum_exp commutes with the matmuls (it scales rows of
            # grad_x, and rows of x for grad_w): one pass over the chunk fewer.
            c = grad_scale[sel] / sum_exp  # (n,)
            grad_x[sel] = (g @ w_a).mul_((2.0 * softcap) * c[:, None]).to(x.dtype)  # 2 cap * w_a = 4 W
            xs_c = xs * c[:, None].to(xs.dtype)
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), xs_c)
            elif fused:  # a bf16 product summed into fp32: torch would widen it into a temporary first
                fused_ce.add_into(grad_w, g.t() @ xs_c)
            else:
                grad_w.add_(g.t() @ xs_c)
    if want_grad:
        grad_w.mul_(4.0)
    return losses, grad_x, grad_w


class _FusedRows:
    """One chunk's loss, sum of exp and g (in the compute dtype) through the C kernel: a = xs @ w_a.T
    lands in one buffer, which the kernel reads once and overwrites with g."""

    def __init__(self, step: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buf = torch.empty(step, vocab, dtype=dtype, device=device)

    def __call__(self, xs, w_a, ts, softcap, shift, want_grad):
        a = torch.mm(xs, w_a.t(), out=self.buf[:xs.size(0)])  # (n, V)
        loss, sum_exp = fused_ce.softcap_ce_rows(a, ts, softcap, shift, want_grad)
        return loss, sum_exp, a


class _TorchRows:
    """The same with torch ops, in place, in fp32 buffers allocated once per call (fresh pages cost
    more than the arithmetic on them); g is handed back in the compute dtype."""

    def __init__(self, step: int, vocab: int, dtype: torch.dtype, device: torch.device, want_grad: bool) -> None:
        self.sig_buf = torch.empty(step, vocab, dtype=torch.float32, device=device)
        self.probs_buf = torch.empty(step, vocab, dtype=torch.float32, device=device) if want_grad else None
        self.low_buf = torch.empty(step, vocab, dtype=dtype, device=device) if dtype != torch.float32 else None

    def __call__(self, xs, w_a, ts, softcap, shift, want_grad):
        n = xs.size(0)
        sig = self.sig_buf[:n]  # (n, V); logits z = cap * (2 sig - 1)
        if self.low_buf is None:
            torch.mm(xs, w_a.t(), out=sig)
        else:
            sig.copy_(torch.mm(xs, w_a.t(), out=self.low_buf[:n]))
        sig.sigmoid_()
        target_logit = softcap * (2.0 * sig.gather(1, ts[:, None]).squeeze(1) - 1.0)
        probs = torch.mul(sig, 2.0 * softcap, out=self.probs_buf[:n]) if want_grad else sig.mul_(2.0 * softcap)
        if shift == 0.0:
            probs.sub_(softcap)  # probs = z
        sum_exp = probs.exp_().sum(dim=1)  # probs: unnormalised softmax, times e^shift
        loss = sum_exp.log() - shift - target_logit
        if not want_grad:
            return loss, sum_exp, None
        # g = (exp - onehot * sum_exp) * s * (1 - s)
        probs[torch.arange(n, device=xs.device), ts] -= sum_exp
        g = probs.mul_(sig)
        g = g.addcmul_(g, sig, value=-1.0)  # (n, V)
        if self.low_buf is not None:
            g = self.low_buf[:n].copy_(g)
        return loss, sum_exp, g


class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    """Mean or summed CE of softcap(x @ W.T), with the gradient computed in the forward pass.

    The loss is a scalar, so its gradient is the one computed here times the incoming
    scalar: nothing of size (N, vocab) is kept for the backward pass.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                mean: bool) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1) if mean else torch.ones((), device=x.device)
        grad_scale = valid.float() / count
        losses, grad_x, grad_w = _softcap_cross_entropy_chunks(x, weight, targets, softcap, grad_scale)
        ctx.save_for_backward(grad_x, grad_w)
        return losses.sum() / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None, None
