"""tpruntime.kernels.gemv (Triton quantized GEMV) against x @ dequantize(W).T.

Without a CUDA device the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET must be
set before triton is imported); with one, the same small cases run compiled, and the `gpu` cases
add real layer shapes.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import CUDA  # (conftest picked Triton's interpreter without a GPU)
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from tpruntime.kernels.gemv import SUPPORTED, qgemv, qgemv_reference  # noqa: E402
from tpruntime.quants import dequantize, random_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TYPES = sorted(SUPPORTED, key=lambda t: t.value)


def case(qtype: Q, n_out: int, k_in: int, t: int, dtype: torch.dtype, seed: int):
    rng = np.random.default_rng(seed)
    block = GGML_QUANT_SIZES[qtype][0]
    raw = torch.from_numpy(random_blocks(qtype, n_out * k_in // block, rng)).reshape(n_out, -1).to(DEV)
    x = torch.from_numpy(rng.standard_normal((t, k_in), dtype=np.float32)).to(DEV, dtype)
    return x, raw


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def k_of(qtype: Q, n_blocks: int) -> int:
    return n_blocks * GGML_QUANT_SIZES[qtype][0]


# x values are exactly the reference's inputs (bf16 upcasts exactly), so both dtypes meet 1e-5.
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_out,n_blocks,t", [(16, 1, 1), (37, 2, 3)])
def test_matches_reference(qtype, dtype, n_out, n_blocks, t):
    k_in = k_of(qtype, 8 * n_blocks if GGML_QUANT_SIZES[qtype][0] == 32 else n_blocks)
    x, raw = case(qtype, n_out, k_in, t, dtype, seed=n_out + t)
    out = qgemv(x, raw, qtype, n_out, k_in)
    assert rel_err(out, qgemv_reference(x, raw, qtype, n_out, k_in)) < 1e-5


# Every tile ordering and the code paths that only some shapes take: a masked tail of blocks
# (BB not dividing the row), tail rows (BN not dividing n_out), token groups (TG < T).
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_configs(qtype, order):
    big = GGML_QUANT_SIZES[qtype][0] == 256
    k_in = k_of(qtype, 3 if big else 12)
    x, raw = case(qtype, 11, k_in, 4, torch.float32, seed=order)
    cfg = dict(ORD=order, BB=2 if big else 8, BN=4, TG=2, num_warps=1)
    out = qgemv(x, raw, qtype, 11, k_in, config=cfg)
    assert rel_err(out, qgemv_reference(x, raw, qtype, 11, k_in)) < 1e-5


def test_shapes_and_split_k():
    qtype, k_in = Q.Q4_0, 256
    x, raw = case(qtype, 8, k_in, 9, torch.float32, seed=3)
    ref = qgemv_reference(x, raw, qtype, 8, k_in)
    # more than MAX_T tokens go in slices; leading axes are kept; 1-D x gives a 1-D result
    assert rel_err(qgemv(x.view(3, 3, k_in), raw, qtype, 8, k_in).view(9, 8), ref) < 1e-5
    assert rel_err(qgemv(x[0], raw, qtype, 8, k_in), ref[0]) < 1e-5
    cfg = dict(SPLIT_K=2, BB=2, num_warps=1)
    assert rel_err(qgemv(x[:2], raw, qtype, 8, k_in, config=cfg), ref[:2]) < 1e-5


def test_rejects_bad_input():
    x = torch.zeros(1, 256, device=DEV)
    with pytest.raises(ValueError, match="Q2_K"):
        qgemv(x, torch.zeros(84, dtype=torch.uint8, device=DEV), Q.Q2_K, 1, 256)
    with pytest.raises(ValueError, match="bytes"):
        qgemv(x, torch.zeros(100, dtype=torch.uint8, device=DEV), Q.Q4_K, 1, 256)
    with pytest.raises(ValueError, match="k_in"):
        qgemv(x, torch.zeros(144, dtype=torch.uint8, device=DEV), Q.Q4_K, 1, 512)


# Real layer shapes (n_out, k_in); 5120 has 20 K-quant blocks, a masked tail of the default BB.
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,k_in", [(4096, 4096), (1000, 5120), (2048, 12288)])
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_real_shapes(qtype, n_out, k_in, t):
    for dtype in (torch.float32, torch.bfloat16):
        x, raw = case(qtype, n_out, k_in, t, dtype, seed=k_in + t)
        ref = x.double() @ dequantize(raw.reshape(-1), qtype, (n_out, k_in)).double().T
        assert rel_err(qgemv(x, raw, qtype, n_out, k_in), ref) < 1e-5
