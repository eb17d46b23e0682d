"""A picochat GPT as a transformers causal LM, shipped as remote code:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

Standalone (torch and transformers only); it computes what picochat's own GPT computes, with
every architecture option of its config, and reads picochat's tensor names unchanged:
- the token embedding, RMS-normed (no norm weights anywhere, eps `norm_eps`), in fp32;
  `smear`: plus smear_lambda * sigmoid(smear_gate . x[:24]) times the previous token's;
- block i reads x, or with `layer_lambdas` resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the
  embedding); then x += attn(norm(x)); x += mlp(norm(x));
- attention: q/k/v projections; on `value_embed_layers` v gains that layer's embedding of the
  token times 3 * sigmoid(ve_gate . norm(x)[:12]) per kv head; rotary (halves layout, angle
  t * rope_theta**(-2i/D)), then RMSNorm of q and k, times `qk_scale`; causal, grouped-query,
  and each layer sees `window_sizes[i]` earlier tokens (null: all);
- MLP: relu(x W1)^2 W2;
- `backout`: backout_lambda times the residual after block n_layer // 2 is subtracted, then the
  final norm; untied lm_head; logits softcap * tanh(logits / softcap), in fp32.
Weights held in bf16 or fp16 run under autocast with an fp32 residual stream and fp32 per-layer
scalars, as picochat's inference does. A 2-D attention_mask marks padding (left or right);
rotary attention depends only on distances, so a padded row computes what it would alone.

Generation keeps no KV cache: every step recomputes the whole sequence. That is exact and
simple, and costs a forward pass over the whole sequence per new token: fine for short chats,
slow for long ones.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_picochat import PicochatConfig

SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of a token's embedding
VALUE_GATE_CHANNELS = 12  # the value-embedding gate reads this many leading channels of the block input


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x[..., :k] . weight rows -> (..., n), summed in x's dtype for a (n, k) weight."""
    return (x[..., None, :weight.size(1)] * weight).sum(-1)


def rotary(config: PicochatConfig, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, head_dim / 2) in fp32."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def visible_keys(length: int, window: int | None, real: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor | None:
    """Boolean mask of the keys each query sees, (T, T) or with padding (B, 1, T, T); None for plain
    causal attention. `real` (B, T): False at padding, which no query sees (a padding query sees
    itself: no row of the mask is empty)."""
    if real is None and (window is None or window >= length - 1):
        return None
    behind = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)  # (T, T)
    mask = behind >= 0 if window is None else (behind >= 0) & (behind <= window)
    if real is None:
        return mask
    return ((mask & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: PicochatConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps, self.qk_scale = config.norm_eps, config.qk_scale
        kv_dim = config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Parameter(torch.zeros(config.n_kv_head, VALUE_GATE_CHANNELS)) if has_ve else None

    def rotate_norm(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = rms_norm(apply_rotary(t, cos, sin), self.eps)
        return t if self.qk_scale == 1.0 else t * self.qk_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3.0 * torch.sigmoid(gate_logits(x, self.ve_gate))  # (B, T, H_kv)
            v = (v + gate.unsqueeze(-1) * ve.view(v.shape)).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, D)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = self.rotate_norm(q, cos, sin), self.rotate_norm(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: PicochatConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: PicochatConfig, layer_idx: int) -> None:
        super().__init__()
        self.eps, self.window = config.norm_eps, config.window_sizes[layer_idx]
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ve, mask):
        x = x + self.attn(rms_norm(x, self.eps), cos, sin, ve, mask)
        return x + self.mlp(rms_norm(x, self.eps))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    base_model_prefix = "picochat"  # no separate base model: every tensor belongs to this class
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    # The per-layer scalars scale the fp32 residual stream: fp32 whatever the other weights' dtype.
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = [
        "resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"]

    def __init__(self, config: PicochatConfig) -> None:
        super().__init__(config)
        L, kv_dim = config.n_layer, config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(config.vocab_size, config.n_embd),
                                          "h": nn.ModuleList(Block(config, i) for i in range(L))})
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in config.value_embed_layers})
        self.resid_lambdas = nn.Parameter(torch.ones(L)) if config.layer_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.zeros(L)) if config.layer_lambdas else None
        self.smear_gate = nn.Parameter(torch.zeros(1, SMEAR_CHANNELS)) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.post_init()

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the fp32 per-layer scalars come first among the parameters)."""
        return self.lm_head.weight.dtype

    def embed(self, idx: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """idx (B, T) -> normed fp32 embeddings (B, T, C), smeared; padding is no previous token."""
        x = rms_norm(self.transformer.wte(idx).float(), self.config.norm_eps)
        if self.smear_gate is None:
            return x
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # (B, T, C); zeros before the first token
        if real is not None:
            previous = previous * F.pad(real[:, :-1], (1, 0)).unsqueeze(-1)
        return x + self.smear_lambda * torch.sigmoid(gate_logits(x, self.smear_gate)) * previous

    def hidden_states(self, idx: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """idx (B, T) -> the final normed hidden states (B, T, C) that lm_head reads."""
        c, T = self.config, idx.size(1)
        cos, sin = rotary(c, T, idx.device)
        masks = {w: visible_keys(T, w, real, idx.device) for w in set(c.window_sizes)}
        x = x0 = self.embed(idx, real)
        mid = None
        for i, block in enumerate(self.transformer.h):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, ve, masks[block.window])
            if self.backout_lambda is not None and i == c.n_layer // 2:
                mid = x
        if mid is not None:
            x = x - self.backout_lambda * mid
        return rms_norm(x, c.norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **unused) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, vocab), fp32 softcapped; with labels also the mean
        next-token loss (labels shifted here, -100 ignored). Cache arguments are accepted and unused."""
        if unused.get("inputs_embeds") is not None:
            raise ValueError("picochat models take input_ids, not inputs_embeds")
        real = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        low = self.dtype != torch.float32  # low-precision weights: autocast, as picochat's inference runs
        with torch.autocast(input_ids.device.type, dtype=self.dtype) if low else contextlib.nullcontext():
            logits = self.lm_head(self.hidden_states(input_ids, real)).float()
        cap = self.config.softcap
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **unused) -> dict:
        """Every generation step runs the whole sequence (no KV cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
