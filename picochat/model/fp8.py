"""FP8 training matmuls for the transformer blocks' linear layers (`base-train --fp8`).

Each converted layer runs its three training GEMMs through `torch._scaled_mm` with one dynamic
scale per tensor ("tensorwise"): the forward product of input and weight in float8 e4m3 (3
mantissa bits, range +-448), and the two backward products with the output gradient in e5m2 (2
mantissa bits, range +-57,344: gradients need range more than precision). Every scale is
448 / max|x| (57,344 / max|g|), computed on the device without a host sync; the products are
summed in fp32 and come out in the compute dtype (the input gradient) and in the weight's dtype
(the weight gradient). The forward saves the fp8 copies of input and weight for the backward,
a quarter of fp32's bytes.

What stays as it was:
- the weights are ordinary fp32 parameters (state dicts, optimisers and checkpoints do not know
  about fp8; a converted model saves and loads exactly like an unconverted one);
- evaluation, sampling and anything under `torch.no_grad()` or `model.eval()` run the layer's
  plain matmul in the compute dtype;
- lm_head and the embeddings: the loss's fused chunked lm_head + softcap + cross-entropy keeps
  its own bf16 matmuls, and embeddings are lookups;
- layers with a side under `MIN_FEATURES` or not a multiple of 16 (the tensor cores' tile), and
  any call whose row count (batch x time) is not a multiple of 16: too small to gain.

On GPUs with FP8 tensor cores (compute capability 8.9 and up: H100, H200, L4, RTX 4090) the
GEMMs run at about twice the bf16 rate; on a CPU `_scaled_mm` computes the same numbers slowly,
which is what the tests use.
"""

from __future__ import annotations

import torch
from torch import nn

from picochat.errors import ConfigError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_FEATURES = 128  # smallest side of a converted layer
TILE = 16  # every dimension of a _scaled_mm operand is a multiple of this


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x scaled into dtype's range and cast, row-major, and the fp32 scalar that undoes the scale)."""
    top = torch.finfo(dtype).max
    scale = (top / x.detach().abs().amax().double().clamp(min=1e-12)).float()
    return (x.detach().float() * scale).clamp(-top, top).to(dtype).contiguous(), scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major strides (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """x (N, in) @ w (out, in).T with fp8 operands; output in `out_dtype`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = quantize(x, E4M3)
        w8, w_inv = quantize(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, w.dtype)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = quantize(grad, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (N, out) @ (out, in)
            grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:  # (out, N) @ (N, in)
            grad_w = torch._scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                      out_dtype=w_dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """nn.Linear whose training matmuls (grad enabled, `.training`) run in fp8; see the module doc."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not (self.training and torch.is_grad_enabled()) or rows % TILE or self.bias is not None:
            return super().forward(x)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            y = _Float8Matmul.apply(x.reshape(rows, x.shape[-1]), self.weight, out_dtype)
        return y.view(*x.shape[:-1], self.out_features)


def eligible(module: nn.Module) -> bool:
    """Whether a layer is converted: a bias-free nn.Linear, both sides multiples of 16, at least MIN_FEATURES."""
    return (type(module) is nn.Linear and module.bias is None
            and module.in_features % TILE == 0 and module.out_features % TILE == 0
            and min(module.in_features, module.out_features) >= MIN_FEATURES)


def convert_to_fp8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Turn every eligible linear layer of `model` (but the names in `skip`) into a Float8Linear, in
    place (parameters, state-dict keys and values unchanged); returns the converted names."""
    names = [name for name, m in model.named_modules() if name not in skip and eligible(m)]
    for name in names:
        model.get_submodule(name).__class__ = Float8Linear
    return names


def fp8_decision(mode: str, device: torch.device) -> bool:
    """Whether `--fp8 mode` trains in fp8 on `device`: auto where FP8 tensor cores exist (CUDA 8.9+);
    on, anywhere `_scaled_mm` runs (a CUDA device without FP8 tensor cores is refused)."""
    if mode not in ("off", "on", "auto"):
        raise ConfigError(f"--fp8 {mode!r} is unknown; use off, on or auto")
    if mode == "off":
        return False
    has_cores = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if mode == "auto":
        return has_cores
    if device.type == "cuda" and not has_cores:
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"--fp8 on: this GPU (compute capability {major}.{minor}) has no FP8 tensor cores "
                          "(8.9 and up: H100, H200, L4, RTX 4090); use --fp8 off or auto")
    return True

