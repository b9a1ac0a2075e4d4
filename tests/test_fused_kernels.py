"""tpruntime.kernels.fused (the decode step's fused elementwise kernels) against the torch path
the model takes without them: tpruntime.ops.TorchOps, with rope tables from layers.Rope and
caches from KVCache.

Without a CUDA device the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET must be
set before triton is imported); with one, the same small cases run compiled, and the `gpu` case
replays the kernels from a captured CUDA graph.
"""

from __future__ import annotations


import pytest
import torch

from conftest import CUDA  # (conftest picked Triton's interpreter without a GPU)
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from tpruntime.kernels import fused  # noqa: E402
from tpruntime.kv_cache import KVCache  # noqa: E402
from tpruntime.layers import Rope  # noqa: E402
from tpruntime.ops import TorchOps  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
EPS = 1e-6
N_CTX = 16


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def norm_weight(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(n, generator=g)).to(DEV)


def check(out: torch.Tensor, ref: torch.Tensor):
    """f32: within a few ulp (rsqrt against 1/sqrt, FMA contraction); a narrower dtype: the
    kernel's rounding of a value that may differ from the reference's in its last f32 bits."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


# --- rms_norm / add_rms_norm ------------------------------------------------------------------

# n: a power of two, a masked tail; max_tile 64: the chunked path for rows longer than a tile.
@pytest.mark.parametrize("n,max_tile", [(128, fused.MAX_TILE), (200, fused.MAX_TILE), (200, 64),
                                        (8192, fused.MAX_TILE)])
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)], ids=["f32", "f32-bf16", "bf16-f32"])
def test_rms_norm(n, max_tile, x_dtype, out_dtype):
    x, w = randn(3, n, seed=n, scale=3.0, dtype=x_dtype), norm_weight(n, seed=1)
    out = fused.rms_norm(x, w, EPS, out_dtype, max_tile=max_tile)
    check(out, TorchOps.rms_norm(x, w, EPS, out_dtype))


def test_rms_norm_per_head():
    # q/k norms are over the last axis of [T, heads, head_dim]: every head a row of its own.
    x, w = randn(2, 3, 64, seed=4), norm_weight(64, seed=2)
    check(fused.rms_norm(x, w, EPS, torch.float32), TorchOps.rms_norm(x, w, EPS, torch.float32))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("post", [False, True], ids=["plain", "post"])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,max_tile", [(96, fused.MAX_TILE), (200, 64)])
def test_add_rms_norm(T, post, delta_dtype, n, max_tile):
    h0 = randn(T, n, seed=T, scale=2.0)
    delta = randn(T, n, seed=T + 10, dtype=delta_dtype)
    w, pw = norm_weight(n, seed=3), norm_weight(n, seed=4) if post else None
    for out_dtype in (torch.float32, torch.bfloat16):
        h, h_ref = h0.clone(), h0.clone()
        h_new, normed = fused.add_rms_norm(h, delta, w, EPS, post_weight=pw, out_dtype=out_dtype, max_tile=max_tile)
        h_ref, normed_ref = TorchOps.add_rms_norm(h_ref, delta, w, EPS, post_weight=pw, out_dtype=out_dtype)
        assert h_new.data_ptr() == h.data_ptr()  # in place: a captured graph keeps the buffer
        check(h, h_ref)
        check(normed, normed_ref)


def test_add_rms_norm_rejects_a_copy():
    h = randn(4, 8, seed=0).t()  # not contiguous: the in-place add would be lost in a copy
    with pytest.raises(ValueError, match="in place"):
        fused.add_rms_norm(h, torch.zeros_like(h), norm_weight(4, seed=0), EPS)


# --- qk_norm_rope_store -----------------------------------------------------------------------

def qkv_case(T, n_head, n_kv, d, dv, rope_dim, neox, norm, bias, cache_dtype, seed, freq_factors=None):
    width = n_head * d + n_kv * (d + dv)
    rope = Rope(rope_dim, 10000.0, 1.0, neox, N_CTX, DEV, freq_factors=freq_factors)
    kw = dict(eps=EPS, cos=rope.cos, sin=rope.sin, rope_dim=rope_dim, neox=neox,
              q_norm=norm_weight(d, seed + 1) if norm else None, k_norm=norm_weight(d, seed + 2) if norm else None,
              bias=randn(width, seed=seed + 3) if bias else None)
    cache = KVCache([n_kv], N_CTX, d, dv, DEV, cache_dtype)
    # Garbage, not zeros, in the cache: positions not written must keep exactly these bits.
    cache.k[0].copy_(randn(n_kv, N_CTX, d, seed=seed + 4))
    cache.v[0].copy_(randn(n_kv, N_CTX, dv, seed=seed + 5))
    return randn(T, width, seed=seed, scale=2.0), kw, cache


def run_both(qkv, n_head, n_kv, d, dv, kw, cache, pos, q_dtype):
    ref = KVCache([n_kv], N_CTX, d, dv, DEV, cache.k[0].dtype)
    ref.k[0].copy_(cache.k[0])
    ref.v[0].copy_(cache.v[0])
    q = fused.qk_norm_rope_store(qkv, n_head, n_kv, d, dv, pos=pos, k_cache=cache.k[0], v_cache=cache.v[0],
                                 q_dtype=q_dtype, **kw)
    q_ref = TorchOps.qk_norm_rope_store(qkv, n_head, n_kv, d, dv, pos=pos, k_cache=ref.k[0], v_cache=ref.v[0],
                                        q_dtype=q_dtype, **kw)
    return q, q_ref, ref


def check_cache(cache: KVCache, ref: KVCache, pos: torch.Tensor):
    written = torch.zeros(N_CTX, dtype=torch.bool, device=DEV)
    written[pos] = True
    for c, r in ((cache.k[0], ref.k[0]), (cache.v[0], ref.v[0])):
        assert torch.equal(c[:, ~written], r[:, ~written])
        check(c[:, written], r[:, written])


# T = 3: out of order and not contiguous; T = 11: two programs of 8 tokens, the second part empty
POSITIONS = {1: [7], 3: [9, 2, 5], 11: [15, 0, 4, 13, 5, 6, 1, 14, 12, 3, 10]}


# (n_head, n_head_kv, head_dim, head_dim_v, rope_dim): group sizes 2, 1 and 4 (a rank's share of
# a GQA model), rope over part of the head, head_dim 64/128/256, a v head narrower than a k head.
SHAPES = [(4, 2, 64, 64, 64), (2, 2, 128, 128, 64), (4, 1, 256, 256, 256), (2, 1, 128, 64, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "q{}kv{}d{}v{}r{}".format(*s))
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "pairs"])
@pytest.mark.parametrize("norm,bias", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "qknorm", "bias", "both"])
@pytest.mark.parametrize("T", [1, 3, 11])
def test_qk_norm_rope_store(shape, neox, norm, bias, T):
    n_head, n_kv, d, dv, rope_dim = shape
    seed = n_head + d + rope_dim + 7 * T
    # Cache and q dtypes as the model pairs them (bf16 cache, bf16 q) and both the other ways.
    dtypes = (torch.bfloat16, torch.bfloat16) if T == 1 else (torch.float32, torch.float32)
    if norm and bias:
        dtypes = (torch.bfloat16, torch.float32)
    qkv, kw, cache = qkv_case(T, n_head, n_kv, d, dv, rope_dim, neox, norm, bias, dtypes[0], seed)
    pos = torch.tensor(POSITIONS[T], device=DEV)
    q, q_ref, ref = run_both(qkv, n_head, n_kv, d, dv, kw, cache, pos, dtypes[1])
    assert q.shape == (T, n_head, d)
    check(q, q_ref)
    check_cache(cache, ref, pos)


def test_qk_rope_freq_factors():
    # Llama 3's rope scaling only changes the tables: a sanity check that they are read as given.
    ff = torch.linspace(1.0, 8.0, 32)
    qkv, kw, cache = qkv_case(3, 2, 1, 64, 64, 64, False, False, False, torch.float32, seed=5, freq_factors=ff)
    pos = torch.tensor([15, 0, 8], device=DEV)
    q, q_ref, ref = run_both(qkv, 2, 1, 64, 64, kw, cache, pos, torch.float32)
    check(q, q_ref)
    check_cache(cache, ref, pos)


def test_qk_rank_sitting_out():
    qkv, kw, cache = qkv_case(2, 0, 0, 64, 64, 64, True, True, False, torch.bfloat16, seed=1)
    q = fused.qk_norm_rope_store(qkv, 0, 0, 64, 64, pos=torch.tensor([1, 2], device=DEV), k_cache=cache.k[0],
                                 v_cache=cache.v[0], **kw)
    assert q.shape == (2, 0, 64) and q.dtype == torch.bfloat16


def test_qk_rejects_bad_input():
    qkv, kw, cache = qkv_case(1, 2, 1, 64, 64, 64, True, False, False, torch.float32, seed=1)
    pos = torch.tensor([0], device=DEV)
    with pytest.raises(ValueError, match="qkv"):
        fused.qk_norm_rope_store(qkv[:, 1:], 2, 1, 64, 64, pos=pos, k_cache=cache.k[0], v_cache=cache.v[0], **kw)
    with pytest.raises(ValueError, match="rope_dim"):
        fused.qk_norm_rope_store(qkv, 2, 1, 64, 64, pos=pos, k_cache=cache.k[0], v_cache=cache.v[0],
                                 **dict(kw, rope_dim=32))


# --- act_mul ----------------------------------------------------------------------------------

# n_ff 1000: several programs per row and a masked tail; 3-D input keeps its leading axes.
# exp(-x) overflows to inf far in the negative tail, as meant (x / inf = -0); numpy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape,n_ff", [((1,), 64), ((3,), 1000), ((2, 2), 48)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_act_mul(act, shape, n_ff, out_dtype):
    # scale 4: far into both tails of each activation, where 1 + tanh and 1 + exp(-x) lose
    # precision in different ways: compared relative to the whole output, not value by value.
    gu = randn(*shape, 2 * n_ff, seed=n_ff, scale=4.0)
    out, ref = fused.act_mul(gu, n_ff, act, out_dtype), TorchOps.act_mul(gu, n_ff, act, out_dtype)
    assert out.shape == (*shape, n_ff) and out.dtype == out_dtype
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < (1e-6 if out_dtype == torch.float32 else 1e-3)
    if out_dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- captured in a CUDA graph -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replay():
    T, n_head, n_kv, d, n = 1, 8, 2, 128, 1024
    qkv, kw, cache = qkv_case(T, n_head, n_kv, d, d, d, True, True, True, torch.bfloat16, seed=11)
    pos = torch.zeros(T, dtype=torch.long, device=DEV)
    h, delta = randn(T, n, seed=12), randn(T, n, seed=13)
    w, pw = norm_weight(n, seed=14), norm_weight(n, seed=15)

    def step():
        q = fused.qk_norm_rope_store(qkv, n_head, n_kv, d, d, pos=pos, k_cache=cache.k[0], v_cache=cache.v[0],
                                     **kw)
        _, x = fused.add_rms_norm(h, delta, w, EPS, post_weight=pw)
        return q, x

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles every kernel before the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, x_out = step()

    for i, p in enumerate((5, 11)):
        pos.fill_(p)
        qkv.copy_(randn(*qkv.shape, seed=20 + i))
        h.copy_(randn(T, n, seed=30 + i))
        ref = KVCache([n_kv], N_CTX, d, d, DEV, torch.bfloat16)
        ref.k[0].copy_(cache.k[0])
        ref.v[0].copy_(cache.v[0])
        h_ref = h.clone()
        graph.replay()
        q_ref = TorchOps.qk_norm_rope_store(qkv, n_head, n_kv, d, d, pos=pos, k_cache=ref.k[0], v_cache=ref.v[0],
                                            q_dtype=torch.bfloat16, **kw)
        _, x_ref = TorchOps.add_rms_norm(h_ref, delta, w, EPS, post_weight=pw, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        check(q_out, q_ref)
        check(x_out, x_ref)
        check(h, h_ref)
        check_cache(cache, ref, pos)
