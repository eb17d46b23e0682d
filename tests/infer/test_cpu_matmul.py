"""The small-batch C kernel for decoding: equal to torch's product, built safely, optional."""

import pytest
import torch
import torch.nn.functional as F

from picochat import kernels
from picochat.infer import cpu_matmul
from picochat.infer.cpu_matmul import MAX_ROWS, PackedLinear


@pytest.fixture
def kernel():
    if kernels.compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert cpu_matmul.available()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features, in_features", [(16, 8), (48, 256), (1000, 48), (37, 19), (5, 1024), (1, 3)])
def test_packed_product_equals_torch(kernel, threads, out_features, in_features):
    torch.set_num_threads(threads)  # the one-thread fixture restores it
    generator = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    linear = PackedLinear(weight)
    # every pass size of the kernel (6 rows per pass with 8 lanes, 12 with 16), and past MAX_ROWS (torch's product)
    for rows in (1, 2, 3, 5, 6, 7, 8, 12, 13, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, in_features, generator=generator)
        got = linear(x)
        assert got.shape == (rows, out_features) and got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features, in_features", [(16, 8), (48, 256), (1000, 48), (37, 19), (1, 3)])
def test_bf16_weights_multiply_exactly_with_fp32_sums(kernel, threads, out_features, in_features):
    """bf16 weights packed as bf16: every product is exact, so the result is the fp32 product of
    the same values (an fp32 input), or that rounded to bf16 (a bf16 input, as a bf16 GEMM)."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    linear = PackedLinear(weight)
    assert linear.packed.dtype == torch.bfloat16  # half the bytes of an fp32 copy
    for rows in (1, 2, 5, 6, 7, 13, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, in_features, generator=generator)
        exact = x.double() @ weight.double().t()
        got = linear(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, atol=1e-4, rtol=1e-4)
        low = linear(x.bfloat16())
        assert low.dtype == torch.bfloat16
        if rows <= MAX_ROWS:  # the kernel's rows do not depend on the batch: each row alone is the same
            assert torch.equal(low[-1:], linear(x[-1:].bfloat16()))
        torch.testing.assert_close(low.float(), F.linear(x.bfloat16(), weight).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("out_features, in_features", [(48, 256), (2100, 8), (300, 1024), (37, 19)])
def test_bf16_in_and_out_equals_widen_multiply_and_cast(kernel, out_features, in_features):
    """bf16 rows against bf16 weights go through one call (bf16 in, bf16 out): the same bits as
    widening the rows, the fp32 product and torch's cast to bf16; large calls (scratch rows past the
    kernel's stack buffers: 9 x 2,100 outputs, 8 x 1,024 inputs) and non-contiguous rows included."""
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    linear = PackedLinear(weight)
    for rows in (1, 2, 8, 9, 13, MAX_ROWS + 1):
        x = torch.randn(rows, in_features, generator=generator).bfloat16()
        got = linear(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        assert torch.equal(got, linear(x.float()).bfloat16())
    x = torch.randn(in_features, 3, generator=generator).bfloat16().t()
    assert torch.equal(linear(x), linear(x.float()).bfloat16())


@pytest.mark.parametrize("out_features, in_features", [(1024, 256), (256, 1024), (2100, 8), (37, 19)])
def test_fused_epilogues_equal_the_torch_ops_they_replace(kernel, out_features, in_features):
    """relu(x W)^2, residual + x W and the unrounded sums of x W for bf16 weights come from one call each
    (the decode step's MLP activation and residual adds, the unembedding), bf16 or fp32 rows alike: the
    same bits as rounding the rows, the bf16 product and torch's ops, with negative, zero, NaN and
    infinite products among them, large calls included."""
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    weight[0] = float("nan")
    weight[1, 0] = float("inf")
    weight[2] = 0.0
    linear = PackedLinear(weight)
    for rows in (1, 3, 8, 9, MAX_ROWS + 1):
        x = torch.randn(rows, in_features, generator=generator).bfloat16()
        residual = torch.randn(rows, out_features, generator=generator)
        plain = linear(x)
        assert plain[:, 0].isnan().all() and (plain < 0).any()
        got = linear.relu2(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got.isnan(), plain.isnan())
        assert torch.equal(got.nan_to_num(), F.relu(plain).square().nan_to_num())
        added = linear.add_to(x, residual)
        assert added.dtype == torch.float32 and torch.equal(added.nan_to_num(), (residual + plain).nan_to_num())
        # fp32 rows are rounded to bf16 first, as autocast rounds a matmul's input
        wide = torch.randn(rows, in_features, generator=generator)
        assert torch.equal(linear.add_to(wide, residual).nan_to_num(), (residual + linear(wide.bfloat16())).nan_to_num())
        assert torch.equal(linear.relu2(wide).nan_to_num(), F.relu(linear(wide.bfloat16())).square().nan_to_num())
        normed = cpu_matmul.rms_norm(wide, 1e-6, torch.bfloat16)  # the norm folded into the call: the same bits
        assert torch.equal(linear.of_norm(wide, 1e-6).nan_to_num(), linear(normed).nan_to_num())
        assert torch.equal(linear.of_norm(wide, 1e-6, relu2=True).nan_to_num(), linear.relu2(normed).nan_to_num())
        sums = linear.sums(wide)
        assert sums.dtype == torch.float32 and torch.equal(sums.nan_to_num(), linear(wide.bfloat16().float()).nan_to_num())
    wide = torch.randn(2, in_features, generator=generator)  # a residual of another shape: torch's add
    expected = (torch.ones(out_features) + linear(wide.bfloat16())).nan_to_num()
    assert torch.equal(linear.add_to(wide, torch.ones(out_features)).nan_to_num(), expected)


@pytest.mark.parametrize("shape", [(1, 256), (8, 3, 128), (5, 1280)])
def test_rms_norm_of_fp32_rows_to_bf16_is_the_norm_then_the_cast(kernel, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 3
    x.view(-1)[5] = float("nan")
    got = cpu_matmul.rms_norm(x, 1e-6, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float().nan_to_num(), cpu_matmul.rms_norm(x, 1e-6).bfloat16().float().nan_to_num())
    assert torch.equal(got.isnan(), cpu_matmul.rms_norm(x, 1e-6).isnan())


@pytest.mark.parametrize("per_row", [False, True], ids=["shared-position", "own-positions"])
def test_rotary_norm_equals_the_models_bf16_ops(kernel, per_row):
    """One call for rotary + RMSNorm of a decode step's bf16 q and k: the same bits as the model's
    apply_rotary in bf16 followed by this module's rms_norm, for a slice of a wider (B, heads, D) tensor
    (q and k inside q/k/v) and cos/sin shared by every row or one pair per row."""
    from picochat.model.gpt import apply_rotary

    generator = torch.Generator().manual_seed(7 + per_row)
    B, heads, D = 3, 5, 64
    qkv = (torch.randn(B, heads + 2, D, generator=generator) * 3).bfloat16()
    qk = qkv[:, :heads]  # rows of 5 heads inside rows of 7
    angles = torch.rand(B if per_row else 1, 1, D // 2, generator=generator) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    if not per_row:
        cos, sin = cos[0], sin[0]  # (1, D/2), as a step with every row at one position passes them
    got = cpu_matmul.rotary_norm(qk, cos, sin, 1e-6)
    want = cpu_matmul.rms_norm(apply_rotary(qk, cos, sin).contiguous(), 1e-6)
    assert got is not None and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    wide = cpu_matmul.rotary_norm(qk, cos, sin, 1e-6, out_dtype=torch.float32)  # the same values, widened
    assert wide.dtype == torch.float32 and torch.equal(wide, want.float())
    for scale in (1.2, 0.37):  # QK scale: the normed bf16 values times the scale, rounded to bf16
        scaled = cpu_matmul.rotary_norm(qk, cos, sin, 1e-6, scale, torch.float32)
        assert torch.equal(scaled, (want * scale).float())
    assert cpu_matmul.rotary_norm(qk.float(), cos, sin, 1e-6) is None  # fp32: the model's ops


def test_inputs_need_not_be_contiguous(kernel):
    weight = torch.randn(40, 32)
    x = torch.randn(32, 6).t()  # (6, 32), transposed strides
    torch.testing.assert_close(PackedLinear(weight)(x), x @ weight.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(rows, 32\)"):
        PackedLinear(weight)(torch.randn(2, 31))
    with pytest.raises(ValueError, match="fp32 or bf16 CPU weight"):
        PackedLinear(weight.double())


def test_the_packed_copy_is_a_copy(kernel):
    weight = torch.randn(20, 8)
    linear = PackedLinear(weight)
    x = torch.randn(3, 8)
    before = linear(x)
    weight.mul_(2.0)  # the copy keeps the weights it was made from (the engine makes one per generation)
    torch.testing.assert_close(linear(x), before)


def test_a_failed_build_falls_back_and_leaves_no_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "compiler", lambda: "/bin/false")
    assert kernels.build(cpu_matmul.SOURCE, cpu_matmul.FALLBACK) is None
    assert list(tmp_path.iterdir()) == []
    assert "warning: could not compile small_matmul.c" in capsys.readouterr().err


def test_an_unwritable_kernel_dir_falls_back(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    monkeypatch.setenv("PICOCHAT_KERNEL_DIR", str(blocker / "kernels"))
    monkeypatch.setattr(kernels, "compiler", lambda: "/bin/false")
    assert kernels.build(cpu_matmul.SOURCE, cpu_matmul.FALLBACK) is None


def test_the_build_is_cached_by_source_and_flags(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_KERNEL_DIR", str(tmp_path))
    first = kernels.build(cpu_matmul.SOURCE, cpu_matmul.FALLBACK)
    assert first is not None and first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert kernels.build(cpu_matmul.SOURCE, cpu_matmul.FALLBACK) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PICOCHAT_CPU_KERNEL", "0")
    cpu_matmul._library.cache_clear()
    try:
        assert not cpu_matmul.available()
        with pytest.raises(RuntimeError, match="not available"):
            PackedLinear(torch.randn(4, 4))
    finally:
        monkeypatch.delenv("PICOCHAT_CPU_KERNEL")
        cpu_matmul._library.cache_clear()


def test_the_first_use_may_come_inside_a_bf16_autocast(kernel):
    """The serving thread's first decode runs under autocast: the kernel's self-check must not be
    autocast itself (its torch product would come back in bf16 and fail to compare)."""
    cpu_matmul._library.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_matmul.available()


@pytest.mark.parametrize("shape", [(1, 256), (8, 256), (3, 4, 128), (5, 1280), (2, 7)])
def test_rms_norm_equals_the_models_row_by_row(kernel, shape):
    """The decode step's RMSNorm kernel: the model's rms_norm up to float rounding, and each row's
    result the same bits whatever rows come with it (a request's tokens must not depend on its batch)."""
    from picochat.model.gpt import rms_norm
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator) * 3 + 0.5
    got = cpu_matmul.rms_norm(x, 1e-6)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, rms_norm(x, 1e-6), atol=2e-6, rtol=2e-6)
    assert torch.equal(cpu_matmul.rms_norm(x[:1].clone(), 1e-6), got[:1])
    assert torch.equal(cpu_matmul.rms_norm(torch.zeros(2, 16), 1e-6), torch.zeros(2, 16))  # eps: no 0/0
    assert not torch.equal(cpu_matmul.rms_norm(x, 1.0), got)  # eps is passed through


def test_rms_norm_hands_other_inputs_to_the_model(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_matmul, "model_rms_norm", lambda x, eps: calls.append(x.dtype) or x)
    cpu_matmul.rms_norm(torch.randn(2, 8).half(), 1e-6)
    cpu_matmul.rms_norm(torch.randn(8, 2).t(), 1e-6)  # not contiguous
    cpu_matmul.rms_norm(torch.randn(2, 8), 1e-6)
    cpu_matmul.rms_norm(torch.randn(2, 8).bfloat16(), 1e-6)
    assert calls == [torch.float16, torch.float32]


@pytest.mark.parametrize("shape", [(1, 256), (8, 3, 128), (5, 1280)])
def test_rms_norm_of_bf16_rows_rounds_as_torch_does(kernel, shape):
    """bf16 rows (the QK-norm of a bf16 decode): computed in fp32 and rounded to bf16 at the end, like
    the model's; the two fp32 results differ in the last bits at most, so a few values may round to
    the neighbouring bf16 value and no more."""
    from picochat.model.gpt import rms_norm
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 3).bfloat16()
    got, expected = cpu_matmul.rms_norm(x, 1e-6), rms_norm(x, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=2 ** -7)  # one bf16 step
    assert (got != expected).float().mean() < 0.01
    assert torch.equal(cpu_matmul.rms_norm(x[:1].clone(), 1e-6), got[:1])
    special = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [0.0, 0.0]]).bfloat16()
    out = cpu_matmul.rms_norm(special, 1e-6)
    assert out[0].isnan().all() and out[1].isnan().any() and torch.equal(out[2], special[2])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, n, k", [(1, 32768, 50), (8, 1000, 7), (3, 9, 9), (5, 37, 1), (2, 64, 20), (4, 200, 199)])
def test_topk_equals_torch(kernel, threads, rows, n, k):
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, n, generator=generator) * 4
    values, ids = cpu_matmul.topk(x, k)
    expected = torch.topk(x, k, dim=-1)
    assert values.shape == ids.shape == (rows, k) and ids.dtype == torch.int64
    assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices)
    assert torch.equal(cpu_matmul.topk(x[-1:].clone(), k)[1], ids[-1:])  # a row alone: the same


def test_topk_ties_come_in_index_order_and_a_nan_goes_to_torch(kernel):
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.5, 2.0, 3.0, 1.0, 2.0, 3.0]])  # past one 8-wide block
    values, ids = cpu_matmul.topk(x, 6)
    assert values.tolist() == [[3.0, 3.0, 3.0, 3.0, 3.0, 2.0]] and ids.tolist() == [[1, 3, 4, 7, 10, 2]]
    for where in (0, 5, 10):  # in the first k, in a block, in the tail
        bad = x.clone()
        bad[0, where] = float("nan")
        values, ids = cpu_matmul.topk(bad, 3)
        expected = torch.topk(bad, 3)
        torch.testing.assert_close(values, expected.values, equal_nan=True)
        assert torch.equal(ids, expected.indices) and values[0, 0].isnan()
    low = torch.randn(2, 40).bfloat16()
    assert torch.equal(cpu_matmul.topk(low, 5)[0], torch.topk(low, 5).values)  # bf16: torch's
    strided = torch.randn(40, 2).t()
    assert torch.equal(cpu_matmul.topk(strided, 5)[1], torch.topk(strided, 5).indices)


def test_other_devices_never_touch_the_library(monkeypatch):
    """Sampling on a GPU goes straight to torch: no C build (or its warning) for a CUDA machine."""
    monkeypatch.setattr(cpu_matmul, "_library", lambda: pytest.fail("the library was loaded"))
    x = torch.randn(2, 50, device="meta")
    values, ids = cpu_matmul.topk(x, 5)
    assert values.device.type == "meta" and ids.shape == (2, 5)
    assert cpu_matmul.rms_norm(x, 1e-6).device.type == "meta"


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
def test_decode_mlp_is_the_three_calls_in_one(kernel, weights_dtype):
    """cpu_matmul.decode_mlp: the attention projection's residual add, the MLP's normed relu^2 product and its
    down-projection's residual add, in one kernel call for bf16 weights: the same bits as the three calls
    (and, for fp32 weights, those three calls themselves)."""
    generator = torch.Generator().manual_seed(3)
    C, hidden = 96, 384

    def packed(n, k):
        return PackedLinear((torch.randn(n, k, generator=generator) / k ** 0.5).to(weights_dtype))

    proj, fc, down = packed(C, C), packed(hidden, C), packed(C, hidden)
    for rows in (1, 5, MAX_ROWS + 1):
        y, x = torch.randn(rows, C, generator=generator), torch.randn(rows, C, generator=generator)
        x1, before = proj.add_to(y, x), x.clone()
        want = down.add_to(fc.of_norm(x1, 1e-6, relu2=True), x1)
        got = cpu_matmul.decode_mlp(proj, fc, down, y, x, 1e-6)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(x, before)  # the residual stream it was given is left alone


@pytest.mark.parametrize("per_row", [False, True], ids=["shared-position", "own-positions"])
def test_decode_qkv_is_the_calls_and_copies_in_one(kernel, per_row):
    """cpu_matmul.decode_qkv: norm + q/k/v product, rotary + QK-norm with a QK scale (GQA heads), q out in
    fp32, k and v widened into a strided fp32 cache at one shared position or one per row: the same bits as
    the separate calls, and nothing else in the cache touched."""
    generator = torch.Generator().manual_seed(11 + per_row)
    B, H, Hk, D, C, max_len = 3, 4, 2, 16, 48, 10
    qkv = PackedLinear(torch.randn((H + 2 * Hk) * D, C, generator=generator).bfloat16())
    x = torch.randn(B, C, generator=generator)
    angles = torch.rand(B if per_row else 1, 1, D // 2, generator=generator) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    if not per_row:
        cos, sin = cos[0], sin[0]
    positions = torch.tensor([0, 5, 9]) if per_row else None
    cache = torch.zeros(2, 2, B + 1, Hk, max_len, D)  # (k/v, layer, rows, heads, positions, D): a layer's slice
    keys, values = cache[0, 1, :B], cache[1, 1, :B]
    q = cpu_matmul.decode_qkv(qkv, x, 1e-6, H, Hk, cos, sin, 1e-6, 1.3, keys, values, positions, 4)
    out = qkv.of_norm(x, 1e-6).view(B, H + 2 * Hk, D)
    rotated = cpu_matmul.rotary_norm(out[:, :H + Hk], cos, sin, 1e-6, 1.3, torch.float32)
    assert q.dtype == torch.float32 and torch.equal(q, rotated[:, :H])
    rows, at = torch.arange(B), positions if per_row else torch.full((B,), 4)
    assert torch.equal(keys[rows, :, at], rotated[:, H:]) and torch.equal(values[rows, :, at], out[:, H + Hk:].float())
    assert int((cache != 0).sum()) == 2 * B * Hk * D  # those rows and positions only


def test_decode_qkv_adds_a_gated_value_embedding_as_torch_rounds_it(kernel):
    """decode_qkv with a value embedding: the cached values are value_residual's, (v + gate * ve) in bf16 with
    the product rounded to fp32 before the sum, as torch's two ops round it. One value is picked where a
    fused multiply-add would round the other way: v = 1, gate * ve a hair above 2^-8 + 2^-24, so that the
    fp32 sum is a bf16 tie (-> 1.0) only when the product is rounded first (fused: 1.0078125)."""
    generator = torch.Generator().manual_seed(5)
    B, H, Hk, D, C, max_len = 2, 2, 2, 8, 16, 6
    weight = torch.randn((H + 2 * Hk) * D, C, generator=generator)
    weight[(H + Hk) * D] = 0.0
    weight[(H + Hk) * D, 0] = 1.0  # row 0's first value is its normed input's first channel: 1.0
    qkv = PackedLinear(weight.bfloat16())
    x = torch.randn(B, C, generator=generator)
    x[0] = 0.5  # a constant row normalises to ones (1 - 5e-7, rounded to bf16: 1.0)
    ve = torch.randn(B, Hk * D, generator=generator).bfloat16()
    gate = torch.rand(B, Hk, generator=generator) * 3
    ve[0, 0], gate[0, 0] = 1.03125, 0.003787936642765999
    cos, sin = torch.ones(D // 2).bfloat16(), torch.zeros(D // 2).bfloat16()
    cache = torch.zeros(2, B, Hk, max_len, D)
    assert cpu_matmul.decode_qkv(qkv, x, 1e-6, H, Hk, cos, sin, 1e-6, 1.0, cache[0], cache[1], None, 3, ve, gate) is not None
    v = qkv.of_norm(x, 1e-6).view(B, H + 2 * Hk, D)[:, H + Hk:]
    want = (v + gate.unsqueeze(-1) * ve.view(v.shape)).to(torch.bfloat16).float()
    assert v[0, 0, 0] == 1.0 and want[0, 0, 0] == 1.0
    assert torch.addcmul(v[0, 0, 0].float(), gate[0, 0], ve[0, 0].float()).bfloat16() == 1.0078125  # fused
    assert torch.equal(cache[1, :, :, 3], want)
    assert int((cache[1] != 0).sum()) == B * Hk * D  # that position only
