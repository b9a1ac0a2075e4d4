"""tpruntime.kernels.gemv_q8 (int8-x integer-dot GEMV) against references built from gguf's
own dequantizer: the kernel's arithmetic (x rounded to int8 per 32 values, the mins applied
to the unrounded x) exactly, and the plain float product within the rounding of x.

Without a CUDA device the kernels run in Triton's interpreter (conftest sets it up)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CUDA, compile_offline
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from tpruntime.kernels.gemv_q8 import qgemv_q8, quantize_x  # noqa: E402
from tpruntime.quants import F16_FIELDS, dequantize, random_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def case(n_out: int, k_in: int, seed: int, dtype=torch.bfloat16):
    rng = np.random.default_rng(seed)
    raw = random_blocks(Q.Q4_K, n_out * k_in // 256, rng)
    x = torch.from_numpy(rng.standard_normal(k_in, dtype=np.float32) * 3).to(dtype)
    return x, raw


def x_rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's rounding of x, in float64: int8 per 32 values to nearest (ties away from
    0), the scale, and where the scaled value lies within 1e-4 of a tie (there a float32
    division 1 ulp apart, torch's or the GPU's, may round the other way)."""
    g = x.double().reshape(-1, 32)
    amax = g.abs().amax(dim=1, keepdim=True)
    v = g * torch.where(amax > 1e-30, 127.0 / amax, torch.zeros_like(amax))
    q = torch.where(v >= 0, v + 0.5, v - 0.5).trunc()
    tie = ((v.abs() - v.abs().floor()) - 0.5).abs() < 1e-4
    return q.reshape(-1), (amax / 127.0).reshape(-1), tie.reshape(-1)


def with_field(raw: np.ndarray, field: int) -> np.ndarray:
    """A copy of Q4_K blocks with the f16 at byte `field` (d: 0, dmin: 2) set to zero."""
    b = raw.reshape(-1, GGML_QUANT_SIZES[Q.Q4_K][1]).copy()
    b[:, field:field + 2] = 0
    return b.reshape(-1)


def emulated(x: torch.Tensor, raw: np.ndarray, n_out: int, k_in: int) -> torch.Tensor:
    """sum d*sc*q * (xq*dx) - dmin*m * x in float64, with x rounded by quantize_x itself
    (checked against x_rounded on its own) and the blocks by gguf-exact dequantizations with
    dmin zeroed (the scale term) and with d zeroed (the min term)."""
    xq, xd, _ = quantize_x(x.to(DEV))
    x_hat = (xq.cpu().double().reshape(-1, 32) * xd.cpu().double()[:, None]).reshape(-1)
    w_scale = dequantize(torch.from_numpy(with_field(raw, 2)), Q.Q4_K, (n_out, k_in)).double()
    w_min = dequantize(torch.from_numpy(with_field(raw, 0)), Q.Q4_K, (n_out, k_in)).double()
    return w_scale @ x_hat + w_min @ x.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantize_x_matches_rounding(seed):
    x, _ = case(1, 2048, seed=seed)
    x[:32] = 0  # an all-zero group: scale 0, quants 0
    x[32:64] *= 1e-38  # a group too small to scale: counted as zeros
    xq, xd, xs = quantize_x(x.to(DEV))
    q, dx, tie = x_rounded(x)
    diff = (xq.cpu().double() - q).abs()
    assert diff.max() <= 1 and bool(((diff == 0) | tie).all())
    assert torch.allclose(xd.cpu().double(), dx, rtol=1e-6, atol=0)
    assert (xq[:64] == 0).all() and torch.isfinite(xd).all()
    assert torch.allclose(xs.cpu(), x.float().reshape(-1, 16).sum(dim=1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("n_out,n_blocks,config", [
    (8, 1, None), (13, 3, None), (9, 20, dict(BN=2, num_warps=2)), (6, 5, dict(SPLIT_K=2)),
    (5, 9, dict(SPLIT_K=3, BN=8)), (7, 11, dict(REP=2, BN=2)),
    (4, 8, None)])  # (the last one unmasked: BB = 8 blocks divide the row, no split)
def test_matches_emulation_and_float(n_out, n_blocks, config, dtype):
    """Tail rows (BN not dividing n_out), masked tails of blocks, split-K partial sums."""
    k_in = 256 * n_blocks
    x, raw = case(n_out, k_in, seed=n_out * 7 + n_blocks, dtype=dtype)
    w = torch.from_numpy(raw).reshape(n_out, -1)
    out = qgemv_q8(x.to(DEV).reshape(1, -1), w.to(DEV), Q.Q4_K, n_out, k_in, config=config)
    assert out.shape == (1, n_out) and out.dtype == torch.float32
    assert rel(out[0], emulated(x, raw, n_out, k_in)) < 1e-5
    exact = dequantize(torch.from_numpy(raw), Q.Q4_K, (n_out, k_in)).double() @ x.double()
    assert rel(out[0], exact) < 2e-2  # the rounding of x to 8 bits, ~0.5% per value


def test_rejects_bad_input():
    x, raw = case(4, 256, seed=3)
    w = torch.from_numpy(raw).reshape(4, -1).to(DEV)
    with pytest.raises(ValueError, match="one token"):
        qgemv_q8(torch.zeros(2, 256, dtype=torch.bfloat16, device=DEV), w, Q.Q4_K, 4, 256)
    with pytest.raises(ValueError, match="dtype"):
        qgemv_q8(torch.zeros(256, dtype=torch.int32, device=DEV), w, Q.Q4_K, 4, 256)
    with pytest.raises(ValueError, match="not supported"):
        qgemv_q8(x.to(DEV), w, Q.Q6_K, 4, 256)
    with pytest.raises(ValueError, match="bytes"):
        qgemv_q8(x.to(DEV), w[:3], Q.Q4_K, 4, 256)
    empty = qgemv_q8(torch.zeros(1, 0, dtype=torch.bfloat16, device=DEV), w[:, :0], Q.Q4_K, 4, 0)
    assert empty.shape == (1, 4) and (empty == 0).all()
    assert F16_FIELDS[Q.Q4_K] == (0, 2)  # the fields with_field() zeroes


def test_config_overrides(monkeypatch):
    """TPRUNTIME_Q8_CONFIG (decode A/B timing): per shape, "*" for all, the shape's own entry last."""
    from tpruntime.errors import TpError
    from tpruntime.kernels import gemv_q8

    assert gemv_q8.parse_overrides("") == gemv_q8.parse_overrides(" none ") == {}
    ov = gemv_q8.parse_overrides("*:BN=2;10240x5120:MAXNREG=96,BN=8")
    assert ov == {"*": {"BN": 2}, "10240x5120": {"MAXNREG": 96, "BN": 8}}
    monkeypatch.setattr(gemv_q8, "CONFIG_OVERRIDES", ov)
    assert gemv_q8.default_config(Q.Q4_K, 10240, 5120) == dict(BN=8, num_warps=1, SPLIT_K=1, REP=1, MAXNREG=96)
    assert gemv_q8.default_config(Q.Q4_K, 4096, 4096) == dict(BN=2, num_warps=1, SPLIT_K=2, REP=1, MAXNREG=0)
    for bad in ("BN=2", "10240:BN=2", "axb:BN=2", "1x2x3:BN=2", "1x2:BN", "1x2:BN=two"):
        with pytest.raises(TpError, match="TPRUNTIME_Q8_CONFIG: .* is not NxK"):
            gemv_q8.parse_overrides(bad)
    with pytest.raises(TpError, match=r"unknown keys \['SPLITK'\]"):  # a typo would otherwise do nothing
        gemv_q8.parse_overrides("*:SPLITK=2")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n_out,k_in", [(10240, 5120), (51200, 5120), (5120, 25600), (5120, 8192), (4096, 12288)])
def test_gpu_real_shapes(n_out, k_in):
    x, raw = case(n_out, k_in, seed=5)
    w = torch.from_numpy(raw).reshape(n_out, -1).cuda()
    out = qgemv_q8(x.cuda(), w, Q.Q4_K, n_out, k_in)
    # float32 partial sums over up to 25600 products: ~sqrt(K) * 6e-8 relative
    assert rel(out, emulated(x, raw, n_out, k_in)) < 1e-4


def test_split_k_zeroes_its_output():
    """With split-K the quantize step zeroes y for the atomics: stale memory must not leak in."""
    x, raw = case(6, 1024, seed=8)
    w = torch.from_numpy(raw).reshape(6, -1).to(DEV)
    y = torch.full((6,), 1e6, device=DEV)
    quantize_x(x.to(DEV), y)
    assert torch.equal(y.cpu(), torch.zeros(6))
    out = qgemv_q8(x.to(DEV), w, Q.Q4_K, 6, 1024, config=dict(SPLIT_K=2))
    assert rel(out, emulated(x, raw, 6, 1024)) < 1e-5


@pytest.mark.parametrize("model_dtype,x_dtype,int8", [
    (torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.float16, True), (torch.float32, torch.float32, False)])
def test_quant_weight_takes_it_for_one_token_of_a_16_bit_model(monkeypatch, model_dtype, x_dtype, int8):
    """QuantWeight's dispatch: a 16-bit model's single token (the float32 attention output too)
    goes through gemv_q8; a float32 model's, and any batch, through the exact kernels."""
    from tpruntime.kernels import gemv_q8
    from tpruntime.qweight import QuantWeight
    calls = []
    real = gemv_q8.qgemv_q8
    monkeypatch.setattr(gemv_q8, "qgemv_q8", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, raw = case(8, 512, seed=11, dtype=x_dtype)
    w = QuantWeight(torch.from_numpy(raw).to(DEV), Q.Q4_K, 8, 512, model_dtype)
    out = w(x.to(DEV).reshape(1, -1))
    assert len(calls) == int(int8) and out.shape == (1, 8) and out.dtype == torch.float32
    exact = dequantize(torch.from_numpy(raw), Q.Q4_K, (8, 512)).double() @ x.double()
    assert rel(out[0], exact) < (2e-2 if int8 else 1e-5)
    w(x.to(DEV).reshape(1, -1).expand(2, -1).contiguous())  # two tokens: the float kernel
    assert len(calls) == int(int8)


def _nan_outputs(monkeypatch, *modules):
    """Make the producers' fresh int8 buffers and zeroed outputs start as NaN: what a kernel
    fails to write then shows."""
    from tpruntime.kernels import gemv_q8
    real = gemv_q8.new_quantized

    def poisoned(x, request):
        qx = real(x, request)
        for t in (qx.xd, qx.xs) + ((qx.y,) if qx.y is not None else ()):
            t.fill_(float("nan"))
        qx.xq.fill_(-128)
        return qx

    for m in modules:
        monkeypatch.setattr(m, "new_quantized", poisoned)


def _same_as_quantize_x(qx, n_zero: int, exact_sums: bool = True):
    """The producer's int8 form equals quantize_x of the values it returned (xq and scales bit
    for bit; the per-16 sums in another addition order), and its zeroed output is zeros."""
    xq, xd, xs = quantize_x(qx.x.reshape(-1).contiguous())
    assert torch.equal(qx.xq, xq) and torch.equal(qx.xd, xd)
    torch.testing.assert_close(qx.xs, xs, rtol=0 if exact_sums else 1e-6, atol=0 if exact_sums else 1e-5)
    if n_zero:
        assert qx.y is not None and qx.y.shape == (n_zero,) and torch.equal(qx.y, torch.zeros_like(qx.y))
    else:
        assert qx.y is None


@pytest.mark.parametrize("n,n_zero", [(256, 0), (320, 1000)])
@pytest.mark.parametrize("delta", [False, True])
def test_norm_writes_the_int8_form(monkeypatch, n, n_zero, delta):
    """rms_norm / add_rms_norm asked for their output's int8 form (one decode token) write what
    quantize_x would, from the values rounded to bf16, and zero the next GEMV's output."""
    from tpruntime.kernels import fused
    from tpruntime.qweight import Int8Request, QuantizedX
    _nan_outputs(monkeypatch, fused)
    g = torch.Generator().manual_seed(n)
    h = torch.randn(1, n, generator=g).to(DEV)
    w = (torch.rand(n, generator=g) + 0.5).to(DEV)
    if delta:
        d = torch.randn(1, n, generator=g).to(DEV)
        _, qx = fused.add_rms_norm(h, d, w, 1e-6, out_dtype=torch.bfloat16, q8=Int8Request(n_zero))
    else:
        qx = fused.rms_norm(h, w, 1e-6, torch.bfloat16, q8=Int8Request(n_zero))
    assert isinstance(qx, QuantizedX) and qx.x.shape == (1, n) and qx.x.dtype == torch.bfloat16
    _same_as_quantize_x(qx, n_zero, exact_sums=False)
    # two rows (a prompt) or no request: a plain tensor
    assert isinstance(fused.rms_norm(h.expand(2, -1).contiguous(), w, 1e-6, torch.bfloat16, q8=Int8Request(0)),
                      torch.Tensor)


@pytest.mark.parametrize("n_ff,n_zero", [(1024, 0), (1024, 700), (96, 64)])
def test_act_mul_writes_the_int8_form(monkeypatch, n_ff, n_zero):
    from tpruntime.kernels import fused
    from tpruntime.qweight import Int8Request
    _nan_outputs(monkeypatch, fused)
    gu = torch.randn(1, 2 * n_ff, generator=torch.Generator().manual_seed(n_ff)).to(DEV)
    qx = fused.act_mul(gu, n_ff, "silu", torch.bfloat16, q8=Int8Request(n_zero))
    _same_as_quantize_x(qx, n_zero, exact_sums=False)
    torch.testing.assert_close(qx.x, fused.act_mul(gu, n_ff, "silu", torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("n_zero", [0, 300])
def test_decode_attention_writes_the_int8_form(monkeypatch, n_zero):
    from tpruntime.kernels import attention
    from tpruntime.qweight import Int8Request
    _nan_outputs(monkeypatch, attention)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 64, generator=g).to(DEV)
    k = torch.randn(2, 48, 64, generator=g).to(DEV)
    v = torch.randn(2, 48, 64, generator=g).to(DEV)
    n_keys = torch.tensor([40], device=DEV)
    qx = attention.decode_attention(q, k, v, n_keys, 0.125, q8=Int8Request(n_zero))
    assert qx.x.shape == (1, 4 * 64)
    _same_as_quantize_x(qx, n_zero, exact_sums=False)
    torch.testing.assert_close(qx.x.reshape(4, 64), attention.decode_attention(q, k, v, n_keys, 0.125),
                               rtol=0, atol=0)


@pytest.mark.parametrize("split", [1, 2])
def test_quant_weight_reads_a_producers_int8_form(split):
    """A QuantizedX input skips the GEMV's own rounding of x and gives the same product; with
    split-K the producer's zeroed output is where the sum lands."""
    from tpruntime.kernels.gemv_q8 import new_quantized
    from tpruntime.qweight import Int8Request, QuantWeight
    x, raw = case(8, 1024, seed=13)
    w = QuantWeight(torch.from_numpy(raw).to(DEV), Q.Q4_K, 8, 1024, torch.bfloat16)
    cfg = dict(SPLIT_K=split)
    x = x.to(DEV).reshape(1, -1)
    qx = new_quantized(x, Int8Request(8 if split > 1 else 0))
    xq, xd, xs = quantize_x(x.reshape(-1))
    qx.xq.copy_(xq), qx.xd.copy_(xd), qx.xs.copy_(xs)
    if qx.y is not None:
        qx.y.zero_()
    got = qgemv_q8(qx, w.raw, Q.Q4_K, 8, 1024, config=cfg)
    assert torch.equal(got, qgemv_q8(x, w.raw, Q.Q4_K, 8, 1024, config=cfg))
    if split > 1:
        assert got.data_ptr() == qx.y.data_ptr()
    assert torch.equal(w(qx), qgemv_q8(x, w.raw, Q.Q4_K, 8, 1024))


@pytest.mark.parametrize("bn", [4, 2])
def test_compiled_kernel_loads_each_word_once(bn):
    """The GEMV compiled for sm_90a (offline, no GPU): a thread loads each weight header word,
    x scale and x sum of a K step once. Per step copy (the loop body and the software-pipelined
    first step) that is 4 header words + a 16-byte quant vector per row and 2 x vectors + 4
    scalars of x. Header words loaded at a broadcast-later tile shape cost more loads and
    registers: 127 instead of 96 per thread under the GPU machines' Triton 3.6, decode ~4%
    slower (docs/benchmarks.md, eighth session); Triton 3.9 shows it as 68 loads instead of 52."""
    import json
    loads_line = compile_offline("ptx_loads.py", str(bn), "4")[-1]
    loads = json.loads(loads_line)
    assert loads["vector_loads"] == 2 * (bn + 2), loads
    assert loads["global_loads"] <= 2 * (5 * bn + 6), loads
