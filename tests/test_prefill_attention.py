"""tpruntime.kernels.prefill_attention: a later prompt chunk's attention as two partial
attentions merged by their log-sum-exps, against float64 softmax with the bottom-right mask.

The merge kernel runs in Triton's interpreter on the CPU; the whole path (two cuDNN calls and the
merge) needs CUDA and cuDNN and runs on the device.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CUDA  # (conftest picked Triton's interpreter without a GPU)
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from tpruntime.kernels.prefill_attention import merge_partials, prefix_chunk_attention  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def reference(q, k, v, depth: int, scale: float, lo: int = 0, hi: int | None = None):
    """float64 attention of q [H, T, d] over keys lo:hi of k/v [H, S, d], query t seeing keys up
    to depth + t: (out [H, T, d], natural-log log-sum-exp [H, T])."""
    T, S = q.shape[1], k.shape[1]
    hi = S if hi is None else hi
    s = torch.einsum("htd,hsd->hts", q.double(), k[:, lo:hi].double()) * scale
    keep = torch.arange(lo, hi, device=q.device)[None, :] <= depth + torch.arange(T, device=q.device)[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("hts,hsd->htd", torch.exp(s - lse[..., None]), v[:, lo:hi].double()), lse


def case(H, T, depth, d, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(H, T, d, generator=g)).to(dtype).to(DEV)
    k = torch.randn(H, depth + T, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(H, depth + T, d, generator=g).to(dtype).to(DEV)
    return q, k, v


@pytest.mark.parametrize("H,T,depth,d", [(2, 5, 7, 64), (3, 33, 16, 128), (1, 1, 40, 80)])
@pytest.mark.parametrize("lse_shape", ["flat", "trailing-1"])
def test_merge_equals_attention_over_both_key_sets(H, T, depth, d, lse_shape):
    q, k, v = case(H, T, depth, d, seed=H + T + d)
    scale = d ** -0.5
    o1, l1 = reference(q, k, v, depth, scale, 0, depth)
    o2, l2 = reference(q, k, v, depth, scale, depth)
    want, _ = reference(q, k, v, depth, scale)
    # as cuDNN hands them over: [1, H, T, d] views of [T, H, d] memory, 16-bit, f32 log-sum-exps
    o1 = o1.transpose(0, 1).contiguous().to(torch.bfloat16).transpose(0, 1)[None]
    o2 = o2.to(torch.bfloat16)[None]  # and one plain [1, H, T, d]
    l1, l2 = l1.float()[None], l2.float()[None]
    if lse_shape == "trailing-1":
        l1, l2 = l1[..., None], l2[..., None]
    got = merge_partials(o1, l1, o2, l2)
    assert got.shape == (T, H * d) and got.dtype == torch.bfloat16
    want = want.transpose(0, 1).reshape(T, H * d)
    err = float((got.double() - want).abs().max())
    assert err < 2e-2, err  # the partials' and the output's bf16 roundings (values of size ~1)


def test_merge_rejects_mismatched_partials():
    o = torch.zeros(1, 2, 3, 64, dtype=torch.bfloat16, device=DEV)
    lse = torch.zeros(1, 2, 3, device=DEV)
    with pytest.raises(ValueError, match="must match"):
        merge_partials(o, lse, o[:, :1], lse)
    with pytest.raises(ValueError, match="float32"):
        merge_partials(o, lse.double(), o, lse)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (cuDNN attention)")
@pytest.mark.parametrize("H,Hkv,T,depth", [(4, 4, 64, 64), (8, 2, 300, 1000), (2, 1, 1024, 17)])
def test_gpu_prefix_chunk_attention(H, Hkv, T, depth):
    """The whole path on cache-like views (keys of a longer cache, sliced; grouped KV heads as
    layers.Attention passes them) against float64."""
    d = 128
    q, k, v = case(H, T, depth, d, seed=T)
    k, v = k[:Hkv], v[:Hkv]
    cache_k = torch.zeros(Hkv, depth + T + 50, d, dtype=k.dtype, device=DEV)
    cache_v = torch.zeros_like(cache_k)
    cache_k[:, :depth + T], cache_v[:, :depth + T] = k, v
    q4 = q.transpose(0, 1).contiguous().transpose(0, 1)[None]  # [1, H, T, d] over [T, H, d]
    got = prefix_chunk_attention(q4, cache_k[None, :, :depth + T], cache_v[None, :, :depth + T], depth, d ** -0.5)
    g = H // Hkv
    want, _ = reference(q, k.repeat_interleave(g, 0), v.repeat_interleave(g, 0), depth, d ** -0.5)
    err = float((got.double() - want.transpose(0, 1).reshape(T, H * d)).abs().max())
    assert err < 3e-2, err
