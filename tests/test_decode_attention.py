"""tpruntime.kernels.attention.decode_attention (split-K decode attention) against float64 softmax.

Without a CUDA device the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET must be
set before triton is imported); with one, the same small cases run compiled, and the `gpu` case
replays one captured CUDA graph at several numbers of keys.
"""

from __future__ import annotations


import pytest
import torch

from conftest import CUDA, compile_offline  # (conftest picked Triton's interpreter without a GPU)
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from tpruntime.kernels.attention import (decode_attention, decode_attention_qkv,  # noqa: E402
                                         decode_attention_reference, plan)
from tpruntime.kv_cache import KVCache  # noqa: E402
from tpruntime.layers import Rope  # noqa: E402
from tpruntime.ops import TorchOps  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
CHUNK = 128  # a multiple of every BLOCK_N, so splits end exactly at multiples of it
# f32 caches: f32 products and sums. bf16 caches (tl.dot path): the softmax weights enter the
# PV product rounded to bf16 (2^-9 relative each, ~1e-3 on the output norm).
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-4}


def make(n_head: int, n_kv: int, n_ctx: int, d: int, dtype: torch.dtype, seed: int, dv: int | None = None,
         q_dtype: torch.dtype | None = None):
    g = torch.Generator().manual_seed(seed)
    # q of std 2 against unit keys at scale d^-0.5: logits of std ~2, a softmax with clear peaks
    q = (2 * torch.randn(n_head, d, generator=g)).to(q_dtype or dtype).to(DEV)
    k = torch.randn(n_kv, n_ctx, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(n_kv, n_ctx, dv or d, generator=g).to(dtype).to(DEV)
    return q, k, v


def n_keys_tensor(n: int, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor([n], dtype=dtype, device=DEV)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check(q, k, v, n: int, window: int = 0, tol: float | None = None, n_dtype=torch.int64, **kw):
    scale = q.shape[1] ** -0.5
    out = decode_attention(q, k, v, n_keys_tensor(n, n_dtype), scale, window, **kw)
    ref = decode_attention_reference(q, k, v, n, scale, window)
    err = rel_err(out.cpu(), ref.cpu())
    assert err < (tol or TOL[k.dtype]), f"n_keys={n} window={window}: rel err {err:.2e}"


# Split boundaries: one key, a split one short of full, exactly full, one key into the next, and
# the whole cache (n_ctx not a multiple of the chunk or of any tile).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_split_boundaries(group, head_dim, dtype):
    n_kv = 2 if group <= 2 else 1
    n_ctx = CHUNK + 44
    q, k, v = make(group * n_kv, n_kv, n_ctx, head_dim, dtype, seed=group * head_dim)
    for i, n in enumerate([1, CHUNK - 1, CHUNK, CHUNK + 1, n_ctx]):
        check(q, k, v, n, chunk=CHUNK, n_dtype=(torch.int32, torch.int64)[i % 2])


# The default plan: the valid keys spread over all splits (ranges of whole tiles sized from
# n_keys on the device), with and without a window.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("group,head_dim", [(1, 256), (4, 64), (8, 128)])
def test_default_splits(group, head_dim, dtype):
    n_kv, n_ctx = 2, 300
    q, k, v = make(group * n_kv, n_kv, n_ctx, head_dim, dtype, seed=7 + group)
    assert plan(group * n_kv, n_kv, n_ctx, head_dim, head_dim, dtype, torch.device(DEV))["n_splits"] > 1
    for n, window in [(2, 0), (n_ctx - 1, 0), (n_ctx, 100), (150, 33)]:
        check(q, k, v, n, window)


# Sliding windows shorter than n_keys: a window inside one split, across a split boundary, of
# one key, and one as long as n_keys (no effect).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("group", [1, 4])
def test_window(group, dtype):
    n_kv, n_ctx = 2, 2 * CHUNK + 44
    q, k, v = make(group * n_kv, n_kv, n_ctx, 128, dtype, seed=3 + group)
    for n, window in [(100, 50), (CHUNK + 30, 60), (n_ctx, CHUNK + 1), (n_ctx, 1), (90, 90)]:
        check(q, k, v, n, window, chunk=CHUNK)
        check(q, k, v, n, window)


# Whatever the cache holds past n_keys (and before a window) is never read: NaN there would
# survive any masking done after the load.
@pytest.mark.parametrize("dot", [True, False], ids=["dot", "fma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_garbage_outside_keys_is_not_read(dtype, dot):
    n_kv, group, n_ctx = 2, 4, 2 * CHUNK + 44
    q, k, v = make(group * n_kv, n_kv, n_ctx, 128, dtype, seed=11)
    for n, window in [(1, 0), (CHUNK + 1, 0), (200, 70)]:
        kk, vv = k.clone(), v.clone()
        lo = max(0, n - window) if window else 0
        for c in (kk, vv):
            c[:, n:] = float("nan")
            c[:, :lo] = float("nan")
        out = decode_attention(q, kk, vv, n_keys_tensor(n), 128 ** -0.5, window, chunk=CHUNK, dot=dot)
        ref = decode_attention_reference(q, k, v, n, 128 ** -0.5, window)
        assert rel_err(out.cpu(), ref.cpu()) < (TOL[dtype] if dot else 1e-5)


# Both paths on both dtypes: bf16 through f32 FMAs is exact up to f32 sums; f32 through tl.dot
# uses input_precision="ieee" (not tf32); f16 caches take the tl.dot path.
@pytest.mark.parametrize("dtype,dot,tol", [(torch.bfloat16, False, 1e-5), (torch.float32, True, 1e-5),
                                           (torch.float16, None, TOL[torch.float16])],
                         ids=["bf16-fma", "f32-dot", "f16-dot"])
def test_other_paths(dtype, dot, tol):
    q, k, v = make(8, 2, 200, 128, dtype, seed=5)
    for n, window in [(1, 0), (129, 0), (200, 64)]:
        check(q, k, v, n, window, tol=tol, dot=dot, chunk=64)
        check(q, k, v, n, window, tol=tol, dot=dot)


# An f32 q against a bf16 cache: the tl.dot path rounds q to bf16 (the runtime passes q in the
# cache dtype already); the FMA path keeps it.
def test_f32_query_bf16_cache():
    q, k, v = make(8, 2, 200, 128, torch.bfloat16, seed=9, q_dtype=torch.float32)
    check(q, k, v, 150, tol=1e-2)
    check(q, k, v, 150, tol=1e-5, dot=False)


# head_dim that is not a power of two (padded and masked), and a V head size of its own.
@pytest.mark.parametrize("d,dv", [(80, 80), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_head_dims(d, dv, dtype):
    q, k, v = make(4, 2, 150, d, dtype, seed=d + dv, dv=dv)
    for n in (1, 97, 150):
        check(q, k, v, n)


def test_non_contiguous_query():
    q, k, v = make(8, 2, 100, 64, torch.float32, seed=2)
    qt = torch.empty(64, 8, device=DEV).T  # a row stride of 1 along the heads, 8 along d
    qt.copy_(q)
    assert qt.stride(1) != 1
    out = decode_attention(qt, k, v, n_keys_tensor(70), 0.125)
    assert rel_err(out.cpu(), decode_attention_reference(q, k, v, 70, 0.125).cpu()) < 1e-5


def test_plan_fills_the_device():
    """A full 32k cache spreads over a few programs per SM; a short cache is cut into tiles."""
    for n_head, n_kv in [(32, 8), (16, 4), (64, 8), (32, 4), (4, 1)]:
        p = plan(n_head, n_kv, 32768, 128, 128, torch.bfloat16, torch.device("cpu"))
        assert p["dot"] and p["block_h"] == 16 and p["block_n"] == 64
        assert 2 * 132 <= n_kv * p["n_splits"] <= 8 * 132
    p = plan(8, 2, 100, 256, 256, torch.bfloat16, torch.device("cpu"))
    assert p["block_n"] == 32 and p["n_splits"] == 4
    assert not plan(8, 2, 100, 128, 128, torch.float32, torch.device("cpu"))["dot"]


def test_rejects_bad_shapes():
    q, k, v = make(6, 4, 16, 64, torch.float32, seed=0)
    with pytest.raises(ValueError):
        decode_attention(q, k, v, n_keys_tensor(4), 1.0)  # 6 heads over 4 KV heads
    with pytest.raises(ValueError):
        decode_attention(q[:4], k, v, n_keys_tensor(4).float(), 1.0)
    with pytest.raises(ValueError):
        decode_attention(q[:4, :32], k, v, n_keys_tensor(4), 1.0)


# --- decode_attention_qkv: q/k norm, rope and the KV store inside the attention launch ---------

def qkv_case(n_head, n_kv, n_ctx, d, dv, rope_dim, neox, norm, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    width = n_head * d + n_kv * (d + dv)
    rope = Rope(rope_dim, 10000.0, 1.0, neox, n_ctx, torch.device(DEV))
    kw = dict(eps=1e-6, cos=rope.cos, sin=rope.sin, rope_dim=rope_dim, neox=neox,
              q_norm=(0.5 + torch.rand(d, generator=g)).to(DEV) if norm else None,
              k_norm=(0.5 + torch.rand(d, generator=g)).to(DEV) if norm else None,
              bias=torch.randn(width, generator=g).to(DEV) if bias else None)
    qkv = (2 * torch.randn(1, width, generator=g)).to(DEV)
    cache = KVCache([n_kv], n_ctx, d, dv, torch.device(DEV), dtype)
    cache.k[0].copy_(torch.randn(n_kv, n_ctx, d, generator=g))  # garbage, kept where not written
    cache.v[0].copy_(torch.randn(n_kv, n_ctx, dv, generator=g))
    return qkv, kw, cache


def check_qkv(n_head, n_kv, n_ctx, d, dv, rope_dim, neox, norm, bias, dtype, n, window=0, **akw):
    """decode_attention_qkv against the torch path (TorchOps.qk_norm_rope_store into a copy of
    the cache, then float64 attention with q rounded to the cache dtype as the runtime passes it):
    the output, the new key and value at n - 1, and every other cache position untouched."""
    qkv, kw, cache = qkv_case(n_head, n_kv, n_ctx, d, dv, rope_dim, neox, norm, bias, dtype, seed=n + d + n_head)
    k0, v0 = cache.k[0].clone(), cache.v[0].clone()
    pos = torch.tensor([n - 1], device=DEV)
    q_ref = TorchOps.qk_norm_rope_store(qkv, n_head, n_kv, d, dv, pos=pos, k_cache=k0, v_cache=v0,
                                        q_dtype=dtype, **kw)[0]
    scale = d ** -0.5
    out = decode_attention_qkv(qkv, n_head, cache.k[0], cache.v[0], n_keys_tensor(n), scale, window, **kw, **akw)
    ref = decode_attention_reference(q_ref, k0, v0, n, scale, window)
    for c, r in ((cache.k[0], k0), (cache.v[0], v0)):
        assert torch.equal(c[:, :n - 1], r[:, :n - 1]) and torch.equal(c[:, n:], r[:, n:])
        torch.testing.assert_close(c[:, n - 1].float(), r[:, n - 1].float(),
                                   rtol=1e-6 if dtype == torch.float32 else 2 ** -7, atol=1e-6)
    err = rel_err(out.cpu(), ref.cpu())
    # bf16: q and the new key may round the other way from the reference's in a last bit
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"n_keys={n} window={window}: rel err {err:.2e}"


# The new key in the first, a middle and the last split (chunk 64: splits of 64 keys), windows,
# rope over part of the head, both rope layouts, q/k norms and biases, groups of 1, 4 and 8.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_head,n_kv,d,dv,rope_dim,neox,norm,bias", [
    (8, 1, 128, 128, 128, True, True, False),     # qwen3: one KV head of a group of 8
    (8, 2, 64, 64, 32, False, False, True),       # qwen2-like bias, rope on half the head
    (2, 2, 128, 64, 64, True, True, True),        # group 1, a narrower V head
    (4, 2, 80, 80, 80, True, True, False),        # a head padded to 128 lanes
], ids=["qwen3", "bias-pairs", "g1-dv64", "d80"])
def test_qkv_prologue(n_head, n_kv, d, dv, rope_dim, neox, norm, bias, dtype):
    n_ctx = 200
    for n, window, chunk in [(1, 0, 64), (64, 0, 64), (65, 0, 64), (200, 0, 64), (130, 0, None), (150, 40, 64),
                             (200, 70, None)]:
        check_qkv(n_head, n_kv, n_ctx, d, dv, rope_dim, neox, norm, bias, dtype, n, window, chunk=chunk)


def test_split_kernel_compiles_for_sm90():
    """Every prologue variant compiled offline for sm_90a: the interpreter runs code the compiler
    rejects (a variable given another shape in a branch passed the tests above and failed to
    compile), and only a GPU run would otherwise find out."""
    import json
    variants = [json.loads(line) for line in compile_offline("compile_attention.py")]
    assert [v["qkv"] for v in variants] == [False, True, True, True]
    assert all(v["cubin_bytes"] > 0 for v in variants)
    # bf16 caches: the K/V tiles go through the cp.async pipeline; with the prologue, the
    # writer's stores are followed by a barrier before the first copy, and the first K and V
    # tiles are prefetched (two hints a thread).
    assert all(v["cp_async"] > 0 for v in variants[:3]), variants
    assert [v["store_barrier_copy"] for v in variants[:3]] == [False, True, True], variants
    assert [v["prefetch"] for v in variants] == [0, 2, 2, 2], variants


def test_qkv_rejects_bad_input():
    qkv, kw, cache = qkv_case(4, 2, 16, 64, 64, 64, True, True, False, torch.float32, seed=0)
    n = n_keys_tensor(3)
    with pytest.raises(ValueError, match="qkv"):
        decode_attention_qkv(qkv[:, 1:], 4, cache.k[0], cache.v[0], n, 0.125, **kw)
    with pytest.raises(ValueError, match="rope_dim"):
        decode_attention_qkv(qkv, 4, cache.k[0], cache.v[0], n, 0.125, **dict(kw, rope_dim=32))
    with pytest.raises(ValueError, match="come together"):
        decode_attention_qkv(qkv, 4, cache.k[0], cache.v[0], n, 0.125, **dict(kw, k_norm=None))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n_head,n_kv,d,window", [(32, 8, 128, 0), (8, 1, 256, 512), (64, 8, 128, 0)])
def test_cuda_graph_replay(n_head, n_kv, d, window):
    """One capture replayed at several n_keys: launch shapes must not depend on n_keys."""
    n_ctx = 4096 + 37
    q, k, v = make(n_head, n_kv, n_ctx, d, torch.bfloat16, seed=n_head + d)
    n_keys = n_keys_tensor(1)
    decode_attention(q, k, v, n_keys, d ** -0.5, window)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, n_keys, d ** -0.5, window)
    for n in [1, 63, 64, 65, 511, 1000, 4096, n_ctx]:
        n_keys.fill_(n)
        graph.replay()
        ref = decode_attention_reference(q, k, v, n, d ** -0.5, window)
        assert rel_err(out, ref) < TOL[torch.bfloat16], f"n_keys={n}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replay_qkv():
    """decode_attention_qkv captured once (qwen3-32b's group of 8, its default plan) behind the
    kernels a decode step has before it: n_keys made from pos by a torch op, then q|k|v by a
    Triton kernel launched as a programmatic dependent (act_mul here), both with new values at
    every replay. A load of q|k|v before the wait would read the previous replay's values; the
    new key must land where the reference puts it."""
    from tpruntime.kernels.fused import act_mul
    n_head, n_kv, d, n_ctx = 64, 8, 128, 4096 + 37
    qkv, kw, cache = qkv_case(n_head, n_kv, n_ctx, d, d, d, True, True, False, torch.bfloat16, seed=3)
    width = qkv.shape[1]
    g = torch.Generator().manual_seed(4)
    gate_up = torch.randn(1, 2 * width, generator=g).to(DEV)
    pos = torch.zeros(1, dtype=torch.long, device=DEV)

    def step():
        n_keys = pos + 1
        return decode_attention_qkv(act_mul(gate_up, width), n_head, cache.k[0], cache.v[0], n_keys, d ** -0.5, **kw)

    step()  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for n in [1, 64, 65, 1000, 4096, n_ctx]:
        gate_up.copy_(torch.randn(1, 2 * width, generator=g))
        pos.fill_(n - 1)
        qkv_now = TorchOps.act_mul(gate_up, width)
        k0, v0 = cache.k[0].clone(), cache.v[0].clone()
        q_ref = TorchOps.qk_norm_rope_store(qkv_now, n_head, n_kv, d, d, pos=pos, k_cache=k0, v_cache=v0,
                                            q_dtype=torch.bfloat16, **kw)[0]
        graph.replay()
        torch.testing.assert_close(cache.k[0][:, n - 1].float(), k0[:, n - 1].float(), rtol=2 ** -7, atol=1e-6)
        torch.testing.assert_close(cache.v[0].float(), v0.float(), rtol=2 ** -7, atol=1e-6)
        assert rel_err(out, decode_attention_reference(q_ref, k0, v0, n, d ** -0.5)) < 1e-2, f"n_keys={n}"
