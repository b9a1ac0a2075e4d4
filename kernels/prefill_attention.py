"""Attention of a later prompt chunk: T queries over the cache's first depth + T keys, causal
aligned to the bottom right (query i sees keys up to depth + i).

torch's SDPA takes a causal mask only aligned to the top left, except in its FA2 flash kernel,
which is what tpruntime.layers called for these chunks. On an H100 that kernel ran a qwen3-32b
chunk of 2048 queries at depth 2048 in 765 µs a layer, while cuDNN's Hopper kernel did the
depth-0 chunk (top left = bottom right) at ≈ 430 TFLOP/s (docs/benchmarks.md, thirteenth
session). The mask splits cleanly: every query sees the whole prefix, and the chunk against
itself is a square causal block. So cuDNN runs twice, the prefix without a mask and the square
block causal, each returning its log-sum-exp, and `_merge_kernel` combines the two partial
softmaxes (out = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2)), writing [T, H * d] for the output
projection directly. No library merges two attention partials by their log-sum-exps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpruntime.kernels.common import interpreting
from tpruntime.kernels.fused import cast_to

BLOCK_T = 16  # query rows per merge program


@triton.jit
def _merge_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, T,
                  s_o1h, s_o1t, s_o2h, s_o2t, s_l1h, s_l1t, s_l2h, s_l2t, s_out,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr, RNE: tl.constexpr):
    # program (t block, head h)
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.arange(0, BLOCK_D)
    tm = t < T
    m = tm[:, None] & (d < D)[None, :]
    l1 = tl.load(l1_ptr + h * s_l1h + t * s_l1t, mask=tm, other=0.0)
    l2 = tl.load(l2_ptr + h * s_l2h + t * s_l2t, mask=tm, other=0.0)
    top = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - top)
    w2 = tl.exp(l2 - top)
    inv = 1.0 / (w1 + w2)
    t64 = t.to(tl.int64)[:, None]
    o1 = tl.load(o1_ptr + h * s_o1h + t64 * s_o1t + d[None, :], mask=m, other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + h * s_o2h + t64 * s_o2t + d[None, :], mask=m, other=0.0).to(tl.float32)
    out = (o1 * (w1 * inv)[:, None] + o2 * (w2 * inv)[:, None])
    tl.store(out_ptr + t64 * s_out + h * D + d[None, :], cast_to(out, out_ptr.dtype.element_ty, RNE), mask=m)


def merge_partials(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Two attention results over disjoint key sets, o1/o2 [1, H, T, d] (any strides with a unit
    last one) with their natural-log log-sum-exps l1/l2 ([1, H, T] or [1, H, T, 1], float32):
    the attention over both key sets, as [T, H * d] in o1's dtype."""
    _, H, T, D = o1.shape
    if o2.shape != o1.shape or o1.stride(-1) != 1 or o2.stride(-1) != 1:
        raise ValueError(f"merge_partials: o1 {tuple(o1.shape)} / o2 {tuple(o2.shape)} must match, unit last stride")
    l1, l2 = l1.reshape(1, H, T), l2.reshape(1, H, T)
    if l1.dtype != torch.float32 or l2.dtype != torch.float32:
        raise ValueError("merge_partials: the log-sum-exps must be float32")
    out = torch.empty(T, H * D, dtype=o1.dtype, device=o1.device)
    if T == 0 or H == 0:
        return out
    _merge_kernel[(triton.cdiv(T, BLOCK_T), H)](
        o1, l1, o2, l2, out, T, o1.stride(1), o1.stride(2), o2.stride(1), o2.stride(2),
        l1.stride(1), l1.stride(2), l2.stride(1), l2.stride(2), out.stride(0),
        D=D, BLOCK_D=triton.next_power_of_2(D), BT=BLOCK_T, RNE=interpreting(), num_warps=4)
    return out


def _cudnn(q4, k4, v4, causal: bool, scale: float):
    """cuDNN attention with its log-sum-exp: (out [1, H, T, d], lse)."""
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, causal, False, scale=scale)
    return r[0], r[1]


def prefix_chunk_attention(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, depth: int,
                           scale: float) -> torch.Tensor:
    """q4 [1, H, T, d], k4/v4 [1, Hkv, depth + T, d] (16-bit, on CUDA; Hkv divides H, query head
    h reading KV head h // (H / Hkv), as cuDNN broadcasts them): bottom-right causal attention
    as [T, H * d]."""
    o1, l1 = _cudnn(q4, k4[:, :, :depth], v4[:, :, :depth], False, scale)
    o2, l2 = _cudnn(q4, k4[:, :, depth:], v4[:, :, depth:], True, scale)
    return merge_partials(o1, l1, o2, l2)


__all__ = ["merge_partials", "prefix_chunk_attention"]
