"""Decode-time unembedding: logits for the sampled positions only, in the fastest matmul layout.

During decoding the lm_head is the largest matmul by far (vocab x width, e.g. 32,768 x 256 =
33.5 MB of fp32 weights read for every step), and at batch 1..16 it is bound by memory and by
how the BLAS partitions a very flat product. On a CPU the layout matters more than anything
else; measured with torch 2.13 / MKL on a 2-core AVX2 EPYC (ms per call, vocab 32K, width 256):

    rows   F.linear(h, W)   h @ W.T (copy, contiguous)   (W @ h.T).T
    1          3.7                 1.1                      2.8
    8          8.7                 7.6                      2.5

With the small-batch C kernel (picochat/infer/cpu_matmul.py; 1.3 ms at batch 1 and 1.7 ms at
batch 8 with the weight cold in cache, against the best of these at 1.9 and 2.8 ms) every batch
up to its MAX_ROWS reads a copy of the weight packed for it. Without the kernel, batch 1 reads
a contiguous transposed copy of the weight and larger batches multiply the weight by the
transposed hidden states. All compute the same sums as F.linear (up to float
summation order). A copy lives as long as one generation (an `Unembedder` per request): the
weights may change between requests (RL trains between generations, and fused optimisers do
not bump tensor version counters, so a longer-lived cache could go stale unnoticed). It is made
at the second call, i.e. after the prefill has produced the first token, and costs about as
much as two reads of the weight, which the faster layout wins back within a few tokens.
Weights over MAX_COPY_BYTES are not copied (every batch then uses the (W @ h.T).T layout).

The same holds for weights held in bf16 (GPT.cast_weights_): the copies are bf16, half the
bytes, and the hidden states are rounded to bf16 first, as lm_head under autocast does. The
logits are the fp32 sums of those (exact) bf16 products, *not* rounded to bf16 as forward()'s
bf16 lm_head rounds them: bf16 logits come in steps of 1/32 at 8-16, which makes ties in top-k
and turns a summation-order difference into a different sampled token. Elsewhere (CUDA, or fp32 weights under a
bf16 autocast) F.linear is already the right call.

The softcap is *not* applied here: it is monotonic, so the sampler applies it to the top-k
candidates only (picochat.infer.sampling.sample_next), saving two passes over the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from picochat.infer import cpu_matmul
from picochat.infer.cpu_matmul import PackedLinear

MAX_COPY_BYTES = 512 << 20  # d20's 65,536 x 1,280 fp32 lm_head (335 MB) still gets its copy
_ROWS_PER_BLOCK = 8192  # vocabulary rows per (rows, B) product above batch 1


class Unembedder:
    """hidden (B, C) -> hidden @ weight.T as fp32 (B, V), before the softcap; one per generation.

    `weight` must not change while this object is in use (it may keep a copy of it)."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.weight = weight
        self.dtype = weight.dtype
        self.fast_cpu = (weight.device.type == "cpu" and weight.dtype == compute_dtype
                         and compute_dtype in (torch.float32, torch.bfloat16))
        self.transposed: torch.Tensor | None = None  # (C, V) contiguous, made on demand
        self.packed: PackedLinear | None = None  # the kernel's copy, made on demand
        self.use_kernel = cpu_matmul.available()
        self.calls = 0  # copies are made from the second call on (the first is the prefill's)
        # torch's paths take the weight in fp32: itself, or for bf16 weights one exact fp32 copy per
        # generation, made when first needed (torch's bf16 products would round the logits to bf16)
        self.fp32_weight: torch.Tensor | None = weight if weight.dtype == torch.float32 else None
        # The copy costs the weight's size in memory for the generation; skipped for large vocab x width.
        self.copy_allowed = weight.numel() * weight.element_size() <= MAX_COPY_BYTES

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.fast_cpu:
            return F.linear(hidden, self.weight).float()
        self.calls += 1
        if self.use_kernel and self.copy_allowed and hidden.size(0) <= cpu_matmul.MAX_ROWS:
            if self.packed is None and self.calls >= 2:
                self.packed = PackedLinear(self.weight)
            if self.packed is not None:
                return self.packed.sums(hidden)  # (B, V); hidden rounded to bf16 in the call for bf16 weights
        with torch.autocast("cpu", enabled=False):  # fp32 products of the exact values, as the kernel's
            return self._torch_sums(hidden)

    def _torch_sums(self, hidden: torch.Tensor) -> torch.Tensor:
        """__call__ without the kernel: fp32 sums through torch's matmuls, in the layout fastest for the batch."""
        hidden = hidden.to(self.dtype).float().contiguous()  # bf16: the rounded values, exactly
        if self.fp32_weight is None:
            self.fp32_weight = self.weight.detach().float()
        weight = self.fp32_weight
        if hidden.size(0) == 1:
            if self.transposed is None and self.calls >= 2 and self.copy_allowed:
                self.transposed = weight.detach().t().contiguous()
            if self.transposed is not None:
                return hidden @ self.transposed  # (1, V)
        # (V, B) products in blocks of rows: each block's transpose into the (B, V) output is
        # still in cache (one whole-vocabulary transpose took ~1 ms of a ~10 ms step at batch 8).
        out = torch.empty(hidden.size(0), weight.size(0), dtype=torch.float32, device=hidden.device)
        for lo in range(0, weight.size(0), _ROWS_PER_BLOCK):
            out[:, lo:lo + _ROWS_PER_BLOCK] = torch.mm(weight[lo:lo + _ROWS_PER_BLOCK], hidden.t()).t()
        return out
