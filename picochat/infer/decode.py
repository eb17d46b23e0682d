"""A one-token decode step for a picochat GPT on the CPU: the same arithmetic as forward(), fewer ops.

Decoding one token at depth 4 runs ~25 small ops per layer on (B, 1, C) tensors, where each op
costs microseconds of dispatch and the matmuls read weights that no longer sit in the core's
cache. `DecodeStep` computes exactly what `GPT.hidden_states` computes for a (B, 1) input, with
the model's own functions (rms_norm, apply_rotary, the rotary tables, scaled-dot-product
attention over the cache), and with:

- every weight matrix read from a copy packed for the small-batch C kernel
  (picochat/infer/cpu_matmul.py), with q, k and v stacked into one matrix; where that kernel
  cannot be built, from a contiguous transposed copy (x @ W.T), the layout in which MKL's
  small-batch products ran up to 1.5x faster here (except the MLP down-projection at batch 1,
  which keeps the original layout);
- every RMSNorm (the embedding's, the blocks' inputs, queries and keys, the final one) through
  the same kernel library's row-wise norm, passed to the model's methods (cpu_matmul.rms_norm:
  one call where torch runs ~8 small ops; equal to the model's rms_norm up to float rounding;
  1.2x tokens/s at batch 1 and ~1.1x at batch 8 here);
- rotary embedding and QK-norm applied to q and k together (one set of ops, not two);
- in bf16 with the kernel, a layer in two kernel calls around torch's attention: norm, q/k/v
  product, rotary + QK-norm, a value embedding's gated add and the cache writes in one
  (cpu_matmul.decode_qkv), the output projection, the MLP (norm, relu^2) and both
  residual adds in the other (cpu_matmul.decode_mlp): the same bits as torch's ops and the separate
  calls, without ~20 small ops per layer;
- the architecture options through the model's own methods (GPT.embed, layer_input,
  value_embedding, final_norm; the attention's rotate_norm, value_residual and value_gate) and its window
  per layer (attention_span / attention_mask);
- keys and values written straight into the cache at the current position.

It works in the dtype the model's weights are held in, fp32 or bf16 (GPT.cast_weights_ /
with_weights_in), and must then run under the same torch.autocast as forward(): in bf16 the
copies are bf16 (half the bytes to stream per token), each matmul takes its input rounded to
bf16 and returns bf16 as a bf16 GEMM would, and the residual stream stays fp32. One deliberate
difference: attention runs in fp32 over a cache of fp32 keys and values (bf16 values, exactly),
its output then rounded to bf16. torch's bf16 attention rounds differently with and without a
mask and with the length of the masked span, so rows of a continuous batch (each at its own
position, masked) would not get what they get alone; in fp32 the difference stays far below one
bf16 step (0 rounding differences in 1,044 random rows, against 66 in bf16).

Measured on a 2-core AVX2 CPU (depth 4, width 256, fp32, lm_head included): about 1.3x faster
per step than hidden_states() at batch 8 and 1.1x at batch 1. The result equals
hidden_states() to float rounding; tests/infer/test_decode.py checks it for several model
shapes in both dtypes, and the engine tests check whole generations against full recomputation.

The packed or transposed weights are copies (as much memory again as the blocks' weights, made
in about a millisecond per 10 MB): a DecodeStep belongs to one generation, during which the
model's weights must not change.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from picochat.infer import cpu_matmul
from picochat.infer.cpu_matmul import PackedLinear
from picochat.model.gpt import GPT, attention_mask, attention_span, rms_norm
from picochat.model.kv_cache import KVCache

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)

# The copies double the blocks' memory while a generation runs: worth it for the small models a
# CPU decodes quickly (d4: 13 MB), not for d20 and up (1.6 GB at d20), where weight traffic dominates.
MAX_COPY_BYTES = 256 << 20


class DecodeStep:
    def __init__(self, model: GPT, copies: bool | None = None) -> None:
        """`copies`: read the weights from copies laid out for small batches (the default where
        `supports` says the step is faster), or from the model's own weights through F.linear
        (a GPU, or a model too large to copy: what continuous batching runs there)."""
        cfg = model.config
        self.model = model
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.eps = cfg.norm_eps
        self.dtype = model.weights_dtype()
        self.device_type = model.lm_head.weight.device.type
        on_cpu = self.device_type == "cpu"
        self.norm = cpu_matmul.rms_norm if on_cpu and cpu_matmul.available() else rms_norm
        # bf16 rotary + norm of q and k in one kernel call (the same bits as the model's ops and self.norm)
        self.fused_rotary = on_cpu and cpu_matmul.available() and self.dtype == torch.bfloat16
        self.copies = self.supports(model, self.dtype) if copies is None else copies
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # _rotary's
        blocks = model.transformer.h
        attn = [(b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight) for b in blocks]
        if self.copies:
            make = PackedLinear if on_cpu and cpu_matmul.available() else _TransposedLinear
            self.explicit = make is PackedLinear  # every matmul a kernel call, in the dtypes it is given
            with torch.no_grad():  # per layer; q, k and v stacked into one (C + 2 kv_dim, C) matrix
                self.qkv = [make(torch.cat(w)) for w in attn]
        else:
            make, self.explicit = _ModelLinear, False
            self.qkv = [_ModelLinear(*w) for w in attn]
        self.attn_proj = [make(b.attn.c_proj.weight) for b in blocks]
        self.fc = [make(b.mlp.c_fc.weight) for b in blocks]
        self.mlp_proj = [make(b.mlp.c_proj.weight) for b in blocks]
        # bf16 copies for the kernel: norms, products and their epilogues in the kernel's fused calls
        self.fused = self.explicit and self.dtype == torch.bfloat16

    @staticmethod
    def supports(model: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
        """Where the step with copies is measured faster than forward(): a picochat GPT on the CPU
        computing in fp32 or bf16, whose block weights are small enough to copy per generation
        (MAX_COPY_BYTES at the compute dtype's size; d20 and up are not)."""
        if not (DecodeStep.runs(model, compute_dtype) and model.lm_head.weight.device.type == "cpu"):
            return False
        block_numel = sum(p.numel() for p in model.transformer.h.parameters())
        return block_numel * compute_dtype.itemsize <= MAX_COPY_BYTES

    @staticmethod
    def runs(model: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
        """Whether the step can run at all (without copies where `supports` is False): a picochat
        GPT computing in fp32 or bf16, on any device."""
        return isinstance(model, GPT) and compute_dtype in COMPUTE_DTYPES

    def __call__(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, 1) -> final normed hidden state (B, C), writing this position's keys and values.

        Without `positions` every row is at cache.pos, which advances by one. With `positions`
        (B,) int64, row b of ids is cache row b at its own position (continuous batching: rows
        of different requests, picochat.infer.batching), cache.pos is left alone, and each row
        attends to its own first positions[b] + 1 entries only (its window's, in a layer with one).
        """
        on = torch.is_autocast_enabled(self.device_type)
        if on and self.explicit:  # autocast would change nothing but attention: off once, not per layer
            with torch.autocast(self.device_type, enabled=False):
                return self(ids, cache, positions)
        model, H, Hk, D = self.model, self.n_head, self.n_kv_head, self.head_dim
        B = ids.size(0)
        if cache.k.dtype != torch.float32:
            raise ValueError(f"DecodeStep needs an fp32 KV cache (bf16 values are held exactly), got {cache.k.dtype}")
        if positions is None:
            pos = cache.pos
            cache.room_for(1)
            cos, sin = self._rotary(pos, 1)  # (1, D/2)
            where = (slice(None), slice(None), pos)  # cache [every row, every head, pos]
            length = pos + 1
        else:
            length = int(positions.max()) + 1
            if length > cache.max_len:
                raise ValueError(f"KV cache overflow: position {length - 1} is past max_len={cache.max_len}")
            cos, sin = self._rotary(0, length)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, D/2)
            where = (torch.arange(B, device=ids.device), slice(None), positions)  # [row b, every head, positions[b]]
        spans: dict[int | None, tuple[int, torch.Tensor | None]] = {}  # window -> (first key, mask)
        # The matmuls' inputs are rounded to the weights' dtype, as autocast does (by _norm_product and the
        # linears' fused forms; in fp32 a no-op). At batch 1 a step is dispatch-bound: a per-layer
        # autocast switch cost ~15% of a d4 token, and every small op counts.
        exact = torch.autocast(self.device_type, enabled=False) if on else contextlib.nullcontext()
        x = x0 = model.embed(ids, cache, positions, self.norm)[:, 0]  # (B, C) fp32 residual
        mid = None
        for i, block in enumerate(model.transformer.h):
            attn = block.attn
            x = model.layer_input(i, x, x0)
            keys, values = cache.k[i, :B], cache.v[i, :B]  # (B, Hk, max_len, D), fp32
            q = self._queries_and_cache(i, attn, x, ids, cos, sin, keys, values, where, positions, cache.pos)
            if attn.window not in spans and positions is None:  # every row at length - 1: a slice of the keys
                spans[attn.window] = attention_span(length - 1, 1, attn.window, ids.device)
            elif attn.window not in spans:  # each row at its own position: a mask (B, 1, 1, length)
                keys_at = torch.arange(length, device=ids.device)
                spans[attn.window] = 0, attention_mask(positions.view(-1, 1, 1), keys_at, attn.window)
            first, mask = spans[attn.window]
            with exact:  # autocast, where it is on, would run it in bf16
                y = F.scaled_dot_product_attention(q.unsqueeze(2).float(), keys[:, :, first:length],
                                                   values[:, :, first:length], attn_mask=mask,
                                                   enable_gqa=H != Hk)  # (B, H, 1, D) fp32
            y = y.view(B, H * D)
            if self.fused:  # the three products below in one call
                x = cpu_matmul.decode_mlp(self.attn_proj[i], self.fc[i], self.mlp_proj[i], y, x, self.eps)
            else:
                x = self.attn_proj[i].add_to(y, x)  # x + the projection of y rounded to the weights' dtype
                hidden = self._norm_product(self.fc[i], x, relu2=True)  # relu(norm(x) W_fc)^2 (B, 4C)
                x = self.mlp_proj[i].add_to(hidden, x)
            if i == model.backout_layer:
                mid = x
        if positions is None:
            cache.advance(1)
        return model.final_norm(x, mid, self.norm)

    def _queries_and_cache(self, i: int, attn, x: torch.Tensor, ids: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, where: tuple,
                           positions: torch.Tensor | None, pos: int) -> torch.Tensor:
        """Layer i's queries (B, H, D) for residual x, its keys and values written into the cache at `where`
        (every row at `pos`, or row b at positions[b]): in one kernel call for a bf16 layer (cpu_matmul.decode_qkv,
        the same values; a value embedding's gate is computed here first), else step by step."""
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        ve = self.model.value_embedding(i, ids[:, 0])
        if self.fused:  # the value gate reads the normed input unrounded, as forward() does
            gate = None if ve is None else attn.value_gate(self.norm(x, self.eps))
            q = cpu_matmul.decode_qkv(self.qkv[i], x, self.eps, H, Hk, cos, sin, attn.eps, attn.qk_scale,
                                      keys, values, positions, pos, ve, gate)
            if q is not None:
                return q
        qkv = self._norm_product(self.qkv[i], x).view(x.size(0), H + 2 * Hk, D)
        qk, v = qkv[:, :H + Hk], qkv[:, H + Hk:]  # (B, H + Hk, D), (B, Hk, D)
        if ve is not None:  # its gate reads the normed input unrounded, as forward() does
            v = attn.value_residual(v, self.norm(x, self.eps), ve)
        # rotary + QK-norm through cpu_matmul.rotary_norm where it applies (its bf16 values then come
        # widened to fp32, the dtype attention and the cache take them in), else the attention's own
        out = cpu_matmul.rotary_norm(qk, cos, sin, attn.eps, attn.qk_scale, torch.float32) if self.fused_rotary else None
        qk = attn.rotate_norm(qk, cos, sin, self.norm) if out is None else out
        if positions is None:  # a view of every row at one position: copied in, widened on the way
            keys[where].copy_(qk[:, H:])
            values[where].copy_(v)
        else:
            keys[where], values[where] = qk[:, H:].float(), v.float()  # (B, Hk, D) each
        return qk[:, :H]

    def _norm_product(self, linear, x: torch.Tensor, relu2: bool = False) -> torch.Tensor:
        """linear(self.norm(x) rounded to the weights' dtype), or linear.relu2 of it: norm and product in
        one kernel call where every matmul is the kernel's and the weights are bf16 (the same values)."""
        if self.fused:
            return linear.of_norm(x, self.eps, relu2)
        if self.dtype == torch.float32:
            normed = self.norm(x, self.eps)
        elif self.norm is cpu_matmul.rms_norm:  # norm and rounding in one kernel call
            normed = cpu_matmul.rms_norm(x, self.eps, self.dtype)
        else:
            normed = self.norm(x, self.eps).to(self.dtype)
        return linear.relu2(normed) if relu2 else linear(normed)

    def _rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """model.rotary(start, length) in the weights' dtype, sliced from a copy of the tables made once
        per table size (a cast per step cost two ops a token)."""
        cos, sin = self.model.rotary(start, length)
        if self.dtype == torch.float32:
            return cos, sin
        if self._tables is None or self._tables[0] is not self.model.rotary_cos:
            self._tables = (self.model.rotary_cos, self.model.rotary_cos.to(self.dtype),
                            self.model.rotary_sin.to(self.dtype))
        return self._tables[1][start:start + length], self._tables[2][start:start + length]


class _Linear:
    """The fused forms PackedLinear runs in one kernel call, here as torch ops on self(x), x rounded to
    the weights' dtype first as autocast rounds a matmul's input."""

    dtype: torch.dtype

    def relu2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self(x.to(self.dtype))).square()

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self(x.to(self.dtype))


class _ModelLinear(_Linear):
    """x -> x @ W.T for the model's own weights (no copy); several weights give their outputs side
    by side, as one stacked matrix would (q, k and v)."""

    def __init__(self, *weights: torch.Tensor) -> None:
        self.weights, self.dtype = weights, weights[0].dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.weights) == 1:
            return F.linear(x, self.weights[0])
        return torch.cat([F.linear(x, w) for w in self.weights], dim=-1)


class _TransposedLinear(_Linear):
    """x -> x @ weight.T through a contiguous transposed copy: the fastest torch layout for these
    small-batch products (except (1, 4C) x (4C, C), faster in the original layout; the copy is
    made for the first batch > 1).

    The copy is in the weights' dtype and x is rounded to it, so a bf16 product is one bf16 GEMM
    with no per-call cast (autocast, where it is on, finds both operands in bf16 already). torch's
    bf16 GEMMs round a row differently with the batch's size (1 row in ~3,000 at these shapes), so
    on this path a request's tokens can depend on what else is in a continuous batch; the C kernel's
    rows (PackedLinear) do not."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.dtype = weight.dtype
        wide = weight.size(1) > weight.size(0)  # the MLP down-projection
        self.transposed = None if wide else self.weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype, x = x.dtype, x.to(self.dtype)
        if self.transposed is None:
            if x.size(0) == 1:
                return F.linear(x, self.weight).to(out_dtype)
            self.transposed = self.weight.t().contiguous()
        return (x @ self.transposed).to(out_dtype)
