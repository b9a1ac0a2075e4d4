"""tpruntime.kernels.dequant (Triton GGUF block dequantization) against tpruntime.quants.

Without a CUDA device the kernel runs in Triton's interpreter on the CPU (TRITON_INTERPRET must be
set before triton is imported); with one, the same small cases run compiled and the `gpu` cases
add a real layer shape and a CUDA-graph capture. Every comparison is bit for bit: the kernel does
the reference's f32 operations in its order, and an FMA contraction cannot change them (see the
module docstring).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import CUDA  # (conftest picked Triton's interpreter without a GPU)
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from tpruntime.kernels.dequant import SUPPORTED, _kernel, _plan, dequantize_rows  # noqa: E402
from tpruntime.quants import F16_FIELDS, dequantize, random_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TYPES = sorted(SUPPORTED, key=lambda t: t.value)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_BITS = {4: torch.int32, 2: torch.int16}


def k_of(qtype: Q, n_blocks: int) -> int:
    return n_blocks * GGML_QUANT_SIZES[qtype][0]


def blocks(qtype: Q, n_out: int, k_in: int, seed: int) -> np.ndarray:
    """uint8 [n_out, row_bytes] of random_blocks (finite f16 scales, weight-like values)."""
    raw = random_blocks(qtype, n_out * k_in // GGML_QUANT_SIZES[qtype][0], np.random.default_rng(seed))
    return raw.reshape(n_out, -1)


def reference(raw: torch.Tensor, qtype: Q, n_out: int, k_in: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(raw.cpu().reshape(-1), qtype, (n_out, k_in)).to(dtype)


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-identical, except that NaNs only have to be NaN where the reference has one (their
    payload is not a value)."""
    out = out.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan)
    bits = _BITS[ref.element_size()]
    same = out.view(bits) == ref.view(bits)
    assert bool((same | nan).all()), f"{int((~same & ~nan).sum())} values differ"


# Odd row counts, one and several blocks per row; every output dtype.
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n_out,n_blocks", [(37, 2), (16, 1)])
def test_matches_reference(qtype, dtype, n_out, n_blocks):
    k_in = k_of(qtype, n_blocks * (8 if GGML_QUANT_SIZES[qtype][0] == 32 else 1))
    raw = torch.from_numpy(blocks(qtype, n_out, k_in, seed=n_out + n_blocks)).to(DEV)
    out = dequantize_rows(raw, qtype, n_out, k_in, dtype=dtype)
    assert out.device == raw.device
    assert_same(out, reference(raw, qtype, n_out, k_in, dtype))


# Scale fields at the f16 extremes (zeros of both signs, subnormals, the largest finite value,
# infinities and NaN) and quant bytes at theirs (all 0x00, all 0xFF), beside random blocks.
_SPECIAL_F16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0x7C00, 0xFC00, 0x7E00]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: inf - inf, overflow
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_special_values(qtype, dtype):
    block, ts = GGML_QUANT_SIZES[qtype]
    n_sp = len(_SPECIAL_F16)
    n_out, nb = 3 * n_sp, 1 if block == 256 else 4
    raw = blocks(qtype, n_out, nb * block, seed=7).reshape(n_out * nb, ts).copy()
    d_off, m_off = F16_FIELDS[qtype]
    scale = np.array(_SPECIAL_F16, np.uint16).view(np.uint8).reshape(-1, 2)
    rng = np.random.default_rng(1)
    for i in range(raw.shape[0]):
        raw[i, d_off:d_off + 2] = scale[i % n_sp]
        if m_off is not None:
            raw[i, m_off:m_off + 2] = scale[(i // n_sp + i) % n_sp]
        fields = [o for o in (d_off, m_off) if o is not None]
        kind = i % 3
        if kind:  # every byte but the scale fields 0x00 or 0xFF
            keep = {o + j: raw[i, o + j] for o in fields for j in (0, 1)}
            raw[i] = 0 if kind == 1 else 0xFF
            for j, v in keep.items():
                raw[i, j] = v
    rng.shuffle(raw)
    raw_t = torch.from_numpy(raw.reshape(n_out, -1)).to(DEV)
    out = dequantize_rows(raw_t, qtype, n_out, nb * block, dtype=dtype)
    ref = reference(raw_t, qtype, n_out, nb * block, dtype)
    assert ref.isnan().any() and ref.isinf().any() and (ref == 0).any()
    assert_same(out, ref)


def test_random_blocks_have_finite_scales():
    # what the other tests rely on: random_blocks sets every f16 scale field to a finite value
    for qtype in TYPES:
        ts = GGML_QUANT_SIZES[qtype][1]
        raw = random_blocks(qtype, 4096, np.random.default_rng(0)).reshape(-1, ts)
        for off in F16_FIELDS[qtype]:
            if off is not None:
                assert np.isfinite(raw[:, off:off + 2].copy().view(np.float16)).all(), qtype.name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_out_buffer(qtype):
    n_out, k_in = 5, k_of(qtype, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 8)
    raw = torch.from_numpy(blocks(qtype, n_out, k_in, seed=3)).to(DEV)
    scratch = torch.full((n_out * k_in + 100,), 7.0, dtype=torch.bfloat16, device=DEV)
    w = dequantize_rows(raw, qtype, n_out, k_in, out=scratch)
    assert w.shape == (n_out, k_in) and w.data_ptr() == scratch.data_ptr()
    assert_same(w, reference(raw, qtype, n_out, k_in, torch.bfloat16))
    assert bool((scratch[n_out * k_in:] == 7.0).all())
    # a slice of rows, as a prefill walks a large matrix (a view at a nonzero offset)
    w = dequantize_rows(raw[2:4], qtype, 2, k_in, out=scratch)
    assert_same(w, reference(raw[2:4], qtype, 2, k_in, torch.bfloat16))
    # rows that are not contiguous are copied first
    wide = torch.zeros(n_out, raw.shape[1] + 6, dtype=torch.uint8, device=DEV)
    wide[:, 3:3 + raw.shape[1]] = raw
    w = dequantize_rows(wide[:, 3:3 + raw.shape[1]], qtype, n_out, k_in, dtype=torch.float32)
    assert_same(w, reference(raw, qtype, n_out, k_in, torch.float32))


# Tile configurations away from the default: masked tails (BB not dividing the blocks), each
# vector width, few and many warps.
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("cfg", [dict(BB=2, V=2, num_warps=1), dict(BB=4, V=16, num_warps=2),
                                 dict(BB=8, V=4, num_warps=8)], ids=["bb2v2", "bb4v16", "bb8v4"])
def test_configs(qtype, cfg):
    n_out, k_in = 7, k_of(qtype, 3)
    raw = torch.from_numpy(blocks(qtype, n_out, k_in, seed=5)).to(DEV)
    for dtype in (torch.bfloat16, torch.float32):
        out = dequantize_rows(raw, qtype, n_out, k_in, dtype=dtype, config=cfg)
        assert_same(out, reference(raw, qtype, n_out, k_in, dtype))


@pytest.mark.skipif(CUDA, reason="interpreter only: launches the 64-bit offset variant on a small matrix")
def test_int64_offsets():
    qtype, n_out, k_in = Q.Q5_K, 3, 512
    raw = torch.from_numpy(blocks(qtype, n_out, k_in, seed=9))
    grid, n_blocks, _, kw = _plan(qtype, n_out, k_in, torch.bfloat16, True, (("BB", 4),))
    out = torch.empty(n_out, k_in, dtype=torch.bfloat16)
    _kernel[grid](raw, out, n_blocks, **dict(kw, I64=True))
    assert_same(out, reference(raw, qtype, n_out, k_in, torch.bfloat16))


@pytest.mark.skipif(CUDA, reason="the CPU fallback is for CPU tensors")
def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    raw = torch.from_numpy(blocks(Q.Q6_K, 3, 512, seed=2))
    assert_same(dequantize_rows(raw, Q.Q6_K, 3, 512), reference(raw, Q.Q6_K, 3, 512, torch.bfloat16))


def test_empty_and_rejects_bad_input():
    assert dequantize_rows(torch.zeros(0, dtype=torch.uint8, device=DEV), Q.Q8_0, 0, 64).shape == (0, 64)
    raw = torch.zeros(144, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="Q2_K"):
        dequantize_rows(torch.zeros(84, dtype=torch.uint8, device=DEV), Q.Q2_K, 1, 256)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_rows(raw, Q.Q4_K, 2, 256)
    with pytest.raises(ValueError, match="k_in"):
        dequantize_rows(raw, Q.Q4_K, 1, 320)
    with pytest.raises(ValueError, match="dtype"):
        dequantize_rows(raw, Q.Q4_K, 1, 256, dtype=torch.int32)
    with pytest.raises(ValueError, match="out"):
        dequantize_rows(raw, Q.Q4_K, 1, 256, out=torch.empty(255, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="out"):
        dequantize_rows(raw, Q.Q4_K, 1, 256, out=torch.empty(256, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="config"):
        dequantize_rows(raw, Q.Q4_K, 1, 256, config=dict(BN=4))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gpu_real_shape(qtype):
    n_out = k_in = 4096
    raw = torch.from_numpy(blocks(qtype, n_out, k_in, seed=11)).to(DEV)
    for dtype in DTYPES.values():
        assert_same(dequantize_rows(raw, qtype, n_out, k_in, dtype=dtype), reference(raw, qtype, n_out, k_in, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph():
    qtype, n_out, k_in = Q.Q4_K, 1024, 4096
    raw = torch.from_numpy(blocks(qtype, n_out, k_in, seed=12)).to(DEV)
    scratch = torch.empty(n_out * k_in, dtype=torch.bfloat16, device=DEV)
    dequantize_rows(raw, qtype, n_out, k_in, out=scratch)  # compile outside the capture
    scratch.zero_()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w = dequantize_rows(raw, qtype, n_out, k_in, out=scratch)
    g.replay()
    torch.cuda.synchronize()
    assert_same(w, reference(raw, qtype, n_out, k_in, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("f32_out", [True, False], ids=["mm-f32-out", "linear"])
def test_gpu_prefill_matmul_in_slices(f32_out, monkeypatch):
    """A prefill matmul over a matrix dequantized in several scratch slices (the last one short)
    equals the float64 product with the bf16 weights it dequantized, written by cuBLAS in f32
    (the default) or converted from a bf16 product; two calls back to back."""
    from tpruntime import qweight
    monkeypatch.setattr(qweight, "F32_OUT", f32_out)
    monkeypatch.setattr(qweight, "SCRATCH_ELEMENTS", 256 * 1024)  # 256 rows a slice at k_in 1024
    monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", 0)  # else 64 Q4_K tokens take kernels/qmatmul.py
    n_out, k_in = 640, 1024
    raw = blocks(Q.Q4_K, n_out, k_in, 11)
    w = qweight.QuantWeight(torch.from_numpy(raw).to(DEV), Q.Q4_K, n_out, k_in, torch.bfloat16)
    x = torch.randn(64, k_in, device=DEV).to(torch.bfloat16)
    w_bf16 = dequantize(torch.from_numpy(raw), Q.Q4_K, (n_out, k_in)).to(torch.bfloat16)  # what the scratch holds
    outs = [w(xi) for xi in (x, -x)]  # back to back: the second call's dequantizing trails the first's matmul
    for xi, out in zip((x, -x), outs):
        ref = xi.double() @ w_bf16.to(DEV).double().T
        assert out.dtype == torch.float32 and out.shape == (64, n_out)
        err = float((out.double() - ref).norm() / ref.norm())
        # f32 accumulation of bf16 products: ~1e-6; a bf16-rounded product: ~2e-3
        assert err < (1e-5 if f32_out else 5e-3), err
