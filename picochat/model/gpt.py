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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from picochat.errors import ConfigError
from picochat.model import fused_ce
from picochat.model.kv_cache import KVCache

IGNORE_INDEX = -1


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "sequence_len", "mlp_ratio"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model config: {name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model config: n_head={self.n_head} is not a multiple of "
                              f"n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.softcap <= 0:
            raise ConfigError(f"model config: softcap={self.softcap} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, aspect_ratio: int = 64, head_dim: int = 128,
                   max_seq_len: int = 2048, n_kv_head: int | None = None) -> GPTConfig:
        """The one-dial config: width = depth * aspect_ratio rounded UP to a multiple of head_dim."""
        if depth < 1 or aspect_ratio < 1 or head_dim < 1:
            raise ConfigError(f"--depth {depth}, --aspect-ratio {aspect_ratio}, --head-dim {head_dim}: "
                              "all must be positive")
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head if n_kv_head is None else n_kv_head,
                   n_embd=n_embd, sequence_len=max_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps = config.norm_eps
        kv_dim = config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = rms_norm(apply_rotary(q, cos, sin), self.eps)
        k = rms_norm(apply_rotary(k, cos, sin), self.eps)

        mask, is_causal = None, True
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, H_kv, past + T, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if T == 1:
                is_causal = False  # one new token sees everything cached
            elif past > 0:
                # query i (absolute position past + i) sees keys 0 .. past + i
                is_causal = False
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
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
                kv_cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.eps), cos, sin, kv_cache)
        return x + self.mlp(rms_norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        """Declares modules only (works on the meta device); `init_weights` fills them."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables (T, D/2); derived from the config, so not saved in the state dict.
        half = config.head_dim // 2
        self.register_buffer("rotary_cos", torch.empty(config.sequence_len, half), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(config.sequence_len, half), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer, in a fixed order, from torch's global RNG.

        - wte ~ N(0, 1): its output is RMS-normed at once, so the scale only sets how far
          one AdamW step (absolute units) moves an embedding; 1 matches those steps.
        - q, k, v, c_fc ~ U(-a, a), std 1/sqrt(n_embd): their inputs are RMS-normed (unit
          rms per coordinate), so every output coordinate starts with unit variance.
          Uniform has no tails, so no unit starts saturated.
        - both c_proj = 0: each block starts as the identity, the residual stream starts as
          the normed embedding, and depth adds signal only as fast as training asks.
        - lm_head ~ N(0, 0.001): logits start near 0 (loss near ln(vocab)), but not exactly
          0, so gradients reach the blocks from the first step.
        """
        n_embd = self.config.n_embd
        bound = math.sqrt(3.0) / math.sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        self._set_rotary(self.config.sequence_len, self.lm_head.weight.device)

    def _set_rotary(self, length: int, device: torch.device) -> None:
        """cos/sin tables of angle t * theta**(-2i/D), t < length, i < D/2 (fp32)."""
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64,
                                                                 device=device).float() / dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        self.rotary_cos = angles.cos()
        self.rotary_sin = angles.sin()

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
            return self._softcap(self.lm_head(x).float())  # (B, T, vocab)
        return self._loss(x, targets, loss_reduction)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final RMS-normed hidden states (B, T, C) that lm_head reads.

        The inference engine unembeds only the positions it samples from (see
        picochat.infer.unembed); everything else goes through forward().
        """
        T = idx.size(1)
        cos, sin = self.rotary(kv_cache.pos if kv_cache is not None else 0, T)  # (T, D/2)

        eps = self.config.norm_eps
        # The residual stream is fp32 also when the weights are held in bf16 for inference
        # (with_weights_in), as it is under autocast with fp32 master weights in training.
        x = rms_norm(self.transformer.wte(idx).float(), eps)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return rms_norm(x, eps)

    def rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, D/2) for positions start .. start+length-1; the tables grow on demand."""
        if start + length > self.rotary_cos.size(0):
            self._set_rotary(max(2 * self.rotary_cos.size(0), start + length), self.rotary_cos.device)
        return self.rotary_cos[start:start + length], self.rotary_sin[start:start + length]

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap_logits(logits, self.config.softcap)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        B, T, C = x.shape
        x, targets = x.reshape(B * T, C), targets.reshape(B * T)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
        if torch.compiler.is_compiling() or (needs_grad and reduction == "none"):
            # The compiler fuses softcap + cross-entropy on its own; and a per-token loss that
            # is back-propagated needs the per-token graph anyway.
            logits = self._softcap(self.lm_head(x).float())
            losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
            if reduction == "none":
                return losses.view(B, T)
            total = losses.sum()
            return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        if needs_grad:
            return _LinearSoftcapCrossEntropy.apply(x, self.lm_head.weight, targets, self.config.softcap,
                                                    reduction == "mean")
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
        """Hold every weight in `dtype`, in place (the rotary tables stay fp32): for serving,
        where the model never trains, so matmuls read compute-dtype weights without a cast per
        call. Run it under torch.autocast(dtype) (the residual stream stays fp32)."""
        for param in self.parameters():
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
        clone.load_state_dict({k: v.to(dtype) for k, v in self.state_dict().items()}, assign=True)
        clone.rotary_cos, clone.rotary_sin = self.rotary_cos, self.rotary_sin
        return clone.train(self.training).requires_grad_(False)

    def num_scaling_params(self) -> int:
        """Block matrices + lm_head: the parameters that cost FLOPs (the embedding is a lookup)."""
        return self.num_params() - self.transformer.wte.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul parameter (fwd + bwd) + attention scores/values."""
        c = self.config
        return 6 * self.num_scaling_params() + 12 * c.n_layer * c.n_embd * c.sequence_len


def build_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """Declare on meta, materialise on `device` (uninitialised), then initialise explicitly."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


# ----------------------------------------------------------------------------------------------
# lm_head + softcap + cross-entropy, chunk by chunk


def _chunk_rows(vocab_size: int, device: torch.device, rows_per_chunk: int | None = None) -> int:
    """Rows per chunk: one (rows, vocab) fp32 buffer of about 128 MiB on a CPU, 256 MiB on a GPU.

    Enough rows for efficient matmuls: on a 2-core AVX2 CPU the three (rows x width x vocab)
    products run at ~100 GFLOP/s with 256 rows and ~135 with 1024 (vocab 32K, width 256),
    which outweighs the elementwise passes leaving the cache. The buffers are allocated once
    per call, not per chunk (fresh pages cost more than the arithmetic on them).
    """
    elements = (32 << 20) if device.type == "cpu" else (64 << 20)
    return rows_per_chunk or max(16, elements // vocab_size)


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


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
    dtype = _compute_dtype(x.device, weight.dtype)
    want_grad = grad_scale is not None
    losses = torch.zeros(N, dtype=torch.float32, device=x.device)
    grad_x = torch.zeros_like(x) if want_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
    rows = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    if rows.numel() == N:
        rows = None  # all valid (pretraining): plain slices, no gathers
    n_valid = N if rows is None else rows.numel()
    step = min(_chunk_rows(V, x.device, rows_per_chunk), max(n_valid, 1))
    w_a = (weight * (2.0 / softcap)).to(dtype)  # (V, C): x @ w_a.T = a, one pass fewer than dividing
    # exp(z + cap) = exp(2 cap s) cannot overflow when vocab * e^(2 cap) fits in fp32; the shift
    # then cancels in the softmax and comes off the log-sum-exp. Larger caps subtract it first.
    shift = softcap if 2.0 * softcap + math.log(V) < 80.0 else 0.0
    elementwise = _FusedRows(step, V, dtype, x.device) if x.device.type == "cpu" and fused_ce.available() \
        else _TorchRows(step, V, dtype, x.device, want_grad)
    with torch.autocast(x.device.type, enabled=False):
        for lo in range(0, n_valid, step):
            hi = min(lo + step, n_valid)
            sel = slice(lo, hi) if rows is None else rows[lo:hi]
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
