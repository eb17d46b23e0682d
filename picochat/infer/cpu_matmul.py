"""Small-batch matmuls for decoding on the CPU, through a C kernel compiled on first use.

Each decode step multiplies a few rows (1 per sequence) by every weight matrix, so the step is
bound by how fast the weights stream from memory, and BLAS libraries, tuned for large products,
leave much of that speed unused at these shapes. small_matmul.c (beside this file) reads weights
packed once per generation in the order its inner loop wants them. Measured on a 2-core AVX2
EPYC, weights cold in cache as they are in a decode step (us per call, fastest torch layout
in brackets):

    rows   256 x 768   1024 x 256   256 x 32768 (unembedding)
    1        89 (85)     145 (183)     1,263 (1,884)
    8        74 (101)    101 (143)     1,747 (2,784)

`PackedLinear(weight)` is the packed copy and its product; `rms_norm(x, eps)` the decode step's
row-wise RMSNorm and `topk(x, k)` the sampler's top-k, from the same library; `available()` says
whether the kernel could be built and loaded. It is compiled with the system's C compiler (`$CC`,
else cc / gcc / clang) into $PICOCHAT_KERNEL_DIR (default $PICOCHAT_HOME/kernels) once per source,
compiler and flags (picochat/kernels.py), and checked against torch before first use. Where there is
no compiler, or the build or that check fails (each said in one warning line), or
PICOCHAT_CPU_KERNEL=0, available() is False and the callers keep torch's matmuls, norms and top-k:
slower, same results. (The batch-1 column "256 x 768" is within noise of torch; the gain there is in
the larger matrices and the unembedding.)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from picochat import kernels
from picochat.model.gpt import rms_norm as model_rms_norm
from picochat.runtime import warn

FALLBACK = "CPU decoding uses torch's matmuls (1.2-1.5x slower at small batch)"

SOURCE = Path(__file__).with_name("small_matmul.c")
COLUMNS_PER_THREAD = 128  # output columns: 8 panels of the 8-lane build, 4 of the 16-lane one
EPILOGUES = {"sums": 0, "bf16": 1, "relu2": 2, "residual": 3}  # small_matmul.c's enum epilogue
MAX_ROWS = 16  # beyond this the products are large enough for BLAS (and PackedLinear defers to it)


# small_matmul.c's functions (kernels.load's short signatures)
SIGNATURES = {"picochat_small_matmul": "pllplpi>", "picochat_small_matmul_bf16": "pllplpi>",
              "picochat_panel_width": ">i", "picochat_small_matmul_bf16_fused": "piifllplippi>i",
              "picochat_rotary_norm_bf16": "pllllpplffpi>", "picochat_rms_norm": "pllfp>",
              "picochat_rms_norm_bf16": "pllfp>", "picochat_rms_norm_f32_bf16": "pllfp>", "picochat_topk": "plllppi>i",
              "picochat_decode_mlp_bf16": "pplllpppfpiii>i",
              "picochat_decode_qkv_bf16": "pllpflllpplffpppllplppi>i"}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = kernels.load(SOURCE, FALLBACK, SIGNATURES)
    if lib is not None and not _agrees_with_torch(lib):
        warn(f"{SOURCE.name} disagrees with torch on a test product: {FALLBACK}")
        return None
    return lib


@torch.autocast("cpu", enabled=False)  # the first use may come inside a caller's bf16 autocast
def _agrees_with_torch(lib: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 19, generator=generator)
    x = torch.randn(9, 19, generator=generator)
    got = PackedLinear(weight, lib=lib)(x)
    low = weight.bfloat16()
    got_low = PackedLinear(low, lib=lib)(x)  # bf16 weights, fp32 input: exact products
    got_io = PackedLinear(low, lib=lib)(x.bfloat16())  # bf16 in and out
    normed, x_low = torch.empty_like(x), x.bfloat16()
    normed_low = torch.empty_like(x_low)
    lib.picochat_rms_norm(x.data_ptr(), x.size(0), x.size(1), 1e-6, normed.data_ptr())
    lib.picochat_rms_norm_bf16(x_low.data_ptr(), x.size(0), x.size(1), 1e-6, normed_low.data_ptr())
    scores = torch.randn(3, 101, generator=generator)
    top_values, top_ids = torch.empty(3, 7), torch.empty(3, 7, dtype=torch.int64)
    nan = lib.picochat_topk(scores.data_ptr(), 3, 101, 7, top_values.data_ptr(), top_ids.data_ptr(), 1)
    return (torch.allclose(got, x @ weight.t(), atol=1e-4, rtol=1e-4)
            and torch.allclose(got_low, x @ low.float().t(), atol=1e-4, rtol=1e-4)
            and got_io.dtype == torch.bfloat16
            and torch.allclose(got_io.float(), x.bfloat16().float() @ low.float().t(), atol=1e-3, rtol=2 ** -7)
            and torch.allclose(normed, model_rms_norm(x, 1e-6), atol=1e-5, rtol=1e-5)
            and torch.allclose(normed_low.float(), model_rms_norm(x_low, 1e-6).float(), atol=0, rtol=2 ** -7)
            and nan == 0 and torch.equal(top_values, torch.topk(scores, 7).values)
            and torch.equal(scores.gather(1, top_ids), top_values))


def available() -> bool:
    """Whether the kernel is built, loaded and checked (False disables every caller's use of it)."""
    return _library() is not None


def rms_norm(x: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """picochat.model.gpt.rms_norm for a few contiguous fp32 or bf16 CPU rows, in one kernel call
    (~10x fewer microseconds than torch's ~8 small ops at decode sizes); any other input, or no
    kernel, goes to the model's function. Equal to it up to float rounding (computed in fp32, the
    sum of squares in double; bf16 rows are rounded to bf16 at the end, as torch's are), each row
    on its own. `out_dtype` bf16 for fp32 rows: the result cast to bf16 in the same call."""
    fits = x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu" and x.is_contiguous()
    lib = _library() if fits else None  # (a GPU's rows never build or load the library)
    if lib is None:
        out = model_rms_norm(x, eps)
        return out if out_dtype is None else out.to(out_dtype)
    if out_dtype in (None, x.dtype):
        out = torch.empty_like(x)
        norm = lib.picochat_rms_norm if x.dtype == torch.float32 else lib.picochat_rms_norm_bf16
    elif x.dtype == torch.float32 and out_dtype == torch.bfloat16:
        out, norm = torch.empty_like(x, dtype=torch.bfloat16), lib.picochat_rms_norm_f32_bf16
    else:
        return rms_norm(x, eps).to(out_dtype)
    norm(x.data_ptr(), x.numel() // x.size(-1), x.size(-1), eps, out.data_ptr())
    return out


def rotary_norm(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, scale: float = 1.0,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
    """rms_norm(apply_rotary(t, cos, sin), eps) * scale for one decode step's bf16 queries and keys t
    (B, heads, D), each head's values contiguous, with cos, sin (1, D/2) for every row or (B, 1, D/2) per
    row, in one kernel call: the same bits as the model's bf16 ops and this module's rms_norm, as bf16,
    or (out_dtype fp32) those bf16 values widened. None where that does not apply (another dtype or
    layout, no kernel): the caller keeps the model's functions."""
    lib = _library()
    if (lib is None or t.dtype != torch.bfloat16 or t.dim() != 3 or t.device.type != "cpu" or t.stride(2) != 1
            or t.stride(1) != t.size(2) or t.size(2) % 2 or cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16
            or out_dtype not in (torch.bfloat16, torch.float32)):
        return None
    B, heads, D = t.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != sin.shape or cos.size(-1) != D // 2 or cos.numel() not in (D // 2, B * D // 2):
        return None
    out = torch.empty(B, heads, D, dtype=out_dtype)
    lib.picochat_rotary_norm_bf16(t.data_ptr(), B, heads, D, t.stride(0), cos.data_ptr(), sin.data_ptr(),
                                  0 if cos.numel() == D // 2 else D // 2, eps, scale, out.data_ptr(),
                                  int(out_dtype == torch.float32))
    return out


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) (sorted, largest first) for (rows, n) fp32 CPU logits, in one pass
    per row (~5x faster than torch's at a 32K vocabulary); equal values come in index order. Other
    inputs, a row with a NaN, or no kernel: torch.topk itself."""
    fits = x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 and 0 < k <= x.size(1)
    lib = _library() if fits else None  # (a GPU's logits never build or load the library)
    if lib is None:
        return torch.topk(x, k, dim=-1)
    x = x.contiguous()
    values = torch.empty(x.size(0), k, dtype=torch.float32)
    ids = torch.empty(x.size(0), k, dtype=torch.int64)
    if lib.picochat_topk(x.data_ptr(), x.size(0), x.size(1), k, values.data_ptr(), ids.data_ptr(),
                         torch.get_num_threads()):
        return torch.topk(x, k, dim=-1)
    return values, ids


def decode_qkv(qkv: PackedLinear, x: torch.Tensor, eps: float, heads: int, kv_heads: int, cos: torch.Tensor,
               sin: torch.Tensor, qk_eps: float, qk_scale: float, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor | None, pos: int, ve: torch.Tensor | None = None,
               gate: torch.Tensor | None = None) -> torch.Tensor | None:
    """A bf16 decode layer up to attention in one kernel call: the queries (rows, heads, D) fp32 of
    rotary_norm(qkv.of_norm(x, eps)) (QK scale included), its keys and values written widened into the
    fp32 caches `keys`, `values` (rows, kv_heads, max_len, D) at `pos`, or row b at positions[b]; with a
    value embedding ve (rows, kv_heads * D) bf16 and its gate (rows, kv_heads) fp32, the values are
    those of the attention's value_residual. The same values as those calls and copies; None where it
    does not apply (the caller takes them)."""
    rows, D = x.size(0), keys.size(-1)
    fits = (qkv.weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.is_contiguous()
            and x.shape == (rows, qkv.in_features) and qkv.out_features == (heads + 2 * kv_heads) * D
            and keys.dtype == values.dtype == torch.float32 and keys.shape == values.shape
            and keys.stride() == values.stride() and keys.stride(3) == 1 and keys.stride(2) == D
            and keys.size(0) == rows and keys.size(1) == kv_heads and cos.dtype == sin.dtype == torch.bfloat16
            and cos.is_contiguous() and sin.is_contiguous() and cos.numel() in (D // 2, rows * D // 2)
            and (positions is None or (positions.dtype == torch.int64 and positions.is_contiguous()))
            and (ve is None or (ve.dtype == torch.bfloat16 and ve.is_contiguous() and ve.shape == (rows, kv_heads * D)
                                and gate.dtype == torch.float32 and gate.is_contiguous()
                                and gate.shape == (rows, kv_heads))))
    if not fits:
        return None
    q = torch.empty(rows, heads, D)
    failed = qkv.lib.picochat_decode_qkv_bf16(
        x.data_ptr(), rows, qkv.in_features, qkv.packed.data_ptr(), eps, heads, kv_heads, D, cos.data_ptr(),
        sin.data_ptr(), 0 if cos.numel() == D // 2 else D // 2, qk_eps, qk_scale, q.data_ptr(), keys.data_ptr(),
        values.data_ptr(), keys.stride(0), keys.stride(1), None if positions is None else positions.data_ptr(),
        pos, None if ve is None else ve.data_ptr(), None if ve is None else gate.data_ptr(), qkv._threads())
    return None if failed else q


def decode_mlp(proj: PackedLinear, fc: PackedLinear, down: PackedLinear, y: torch.Tensor, x: torch.Tensor,
               eps: float) -> torch.Tensor:
    """The rest of a decode layer after attention: with x1 = proj.add_to(y, x), the residual stream
    down.add_to(fc.of_norm(x1, eps, relu2=True), x1), for fp32 attention output y and residual x (rows, C).
    One kernel call for bf16 weights (the same values as the three calls, which any other case takes)."""
    fits = (proj.weight.dtype == fc.weight.dtype == down.weight.dtype == torch.bfloat16
            and y.dtype == x.dtype == torch.float32 and y.is_contiguous() and x.is_contiguous()
            and y.shape == x.shape == (x.size(0), proj.in_features) and proj.out_features == proj.in_features
            and fc.in_features == proj.out_features and down.in_features == fc.out_features
            and down.out_features == proj.out_features)
    if fits:
        out = torch.empty_like(x)
        if not proj.lib.picochat_decode_mlp_bf16(
                y.data_ptr(), x.data_ptr(), x.size(0), x.size(1), fc.out_features, proj.packed.data_ptr(),
                fc.packed.data_ptr(), down.packed.data_ptr(), eps, out.data_ptr(), proj._threads(),
                fc._threads(), down._threads()):
            return out
    x1 = proj.add_to(y, x)
    return down.add_to(fc.of_norm(x1, eps, relu2=True), x1)


class PackedLinear:
    """x (B, K) -> x @ weight.T (B, N) on the CPU, from a copy of `weight` packed for the kernel.

    `weight` is fp32 or bf16 (packed as it is: a bf16 copy streams half the bytes). The result
    has x's dtype, like F.linear: a bf16 x gives the bf16-rounded fp32 sums, which is what a
    bf16 GEMM returns (the products of bf16 values are exact in fp32; only the order of the
    additions may differ). An fp32 x against bf16 weights is multiplied unrounded, in fp32.
    Rows beyond MAX_ROWS go to torch with the original fp32 weight (not a copy), which must
    therefore not change while this object is in use, like the copy; bf16 weights stay with the
    kernel at every batch size, so the arithmetic never changes with the number of rows."""

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
        self.lib = lib or _library()
        if self.lib is None:
            raise RuntimeError("the small-matmul kernel is not available; check cpu_matmul.available() first")
        if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a 2-d fp32 or bf16 CPU weight, got {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        self.matmul = self.lib.picochat_small_matmul if weight.dtype == torch.float32 else self.lib.picochat_small_matmul_bf16
        panel = self.lib.picochat_panel_width()
        self.weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        panels = -(-self.out_features // panel)
        with torch.no_grad():
            padded = self.weight
            if panels * panel != self.out_features:
                padded = F.pad(self.weight, (0, 0, 0, panels * panel - self.out_features))
            # (panels, K, panel): panel p, depth j, column c holds weight[p * panel + c, j]
            self.packed = padded.reshape(panels, panel, self.in_features).transpose(1, 2).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._fused(x, "bf16") if x.dtype == torch.bfloat16 else None
        return self._any(x) if out is None else out

    # The fused forms below take x rounded to the weights' dtype first, as autocast rounds a matmul's input.

    def relu2(self, x: torch.Tensor) -> torch.Tensor:
        """F.relu(self(x)).square(), the MLP's activation: one kernel call for bf16 weights."""
        out = self._fused(x, "relu2")
        return F.relu(self._any(self._low(x))).square() if out is None else out

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x) for an fp32 residual stream (rows, out_features): one kernel call for
        bf16 weights (the same values: the bf16 product widened exactly, one fp32 add)."""
        fits = residual.dtype == torch.float32 and residual.is_contiguous() and residual.shape == (x.size(0), self.out_features)
        out = self._fused(x, "residual", residual) if fits else None
        return residual + self._any(self._low(x)) if out is None else out

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 sums of self(x), unrounded (the unembedding's logits): one kernel call for bf16 weights."""
        out = self._fused(x, "sums")
        return self._any(self._low(x).float()) if out is None else out

    def of_norm(self, x: torch.Tensor, eps: float, relu2: bool = False) -> torch.Tensor:
        """self(rms_norm(x, eps)), or self.relu2 of it, for fp32 rows x, the norm rounded to the weights'
        dtype as the product's input: one kernel call, norm included, for bf16 weights (the same values as
        rms_norm(x, eps, bf16) and then the product)."""
        out = self._fused(x, "relu2" if relu2 else "bf16", norm_eps=eps) if x.dtype == torch.float32 else None
        if out is None:
            normed = rms_norm(x, eps, self.weight.dtype)
            out = self.relu2(normed) if relu2 else self(normed)
        return out

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype)

    def _threads(self) -> int:
        # at least COLUMNS_PER_THREAD output columns per thread: waking many cores for a small matrix costs
        # more than it saves (on 2 cores every decode matrix here still gets both)
        return max(1, min(torch.get_num_threads(), self.out_features // COLUMNS_PER_THREAD))

    def _fused(self, x: torch.Tensor, epilogue: str, residual: torch.Tensor | None = None,
               norm_eps: float | None = None) -> torch.Tensor | None:
        """fp32 or bf16 x against bf16 weights in one call of small_matmul.c's fused product, finished by
        `epilogue`: no rounding copy of x, no cast of the result (~5 us a call). None where it does not apply."""
        self._check(x)
        if self.weight.dtype != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return None
        x, rows = x.contiguous(), x.size(0)
        wide = epilogue in ("sums", "residual")
        out = torch.empty(rows, self.out_features, dtype=torch.float32 if wide else torch.bfloat16)
        failed = self.lib.picochat_small_matmul_bf16_fused(
            x.data_ptr(), int(x.dtype == torch.float32), int(norm_eps is not None), norm_eps or 0.0, rows,
            self.in_features, self.packed.data_ptr(), self.out_features, EPILOGUES[epilogue],
            None if residual is None else residual.data_ptr(), out.data_ptr(), self._threads())
        return None if failed else out

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.size(1) != self.in_features:
            raise ValueError(f"expected (rows, {self.in_features}) input, got {tuple(x.shape)}")

    def _any(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T for fp32 or bf16 x against either weight dtype, through the widening kernel or torch."""
        self._check(x)
        rows = x.size(0)
        if x.dtype not in (torch.float32, torch.bfloat16) or (rows > MAX_ROWS and self.weight.dtype == torch.float32):
            return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        out_dtype = x.dtype
        x = x.float().contiguous()
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        self.matmul(x.data_ptr(), rows, self.in_features, self.packed.data_ptr(), self.out_features,
                    out.data_ptr(), self._threads())
        return out if out_dtype == torch.float32 else out.to(out_dtype)
