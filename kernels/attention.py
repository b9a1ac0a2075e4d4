"""Split-K ("flash-decoding") attention for the one token of a decode step (Triton).

    out[h] = softmax(scale * q[h] . K[g]^T) V[g]     over the valid keys, g = h // group

The number of valid keys is read from a device tensor and every launch shape depends only on the
cache shape, so one captured CUDA graph serves every position. Two kernels:

- `_split_kernel`, grid (n_kv, n_splits): a program owns all query heads of one KV head and a
  contiguous range of keys; it streams K and V tiles of BLOCK_N keys once (each byte is read once
  per KV group, not once per query head), keeps an online softmax in f32 and writes its partial
  (unnormalized acc, running max, sum) to scratch. Programs whose range is empty return at once.
- `_merge_kernel`, grid (n_head,): log-sum-exp merge of the partials that hold keys.

`decode_attention_qkv` also takes the step before, q/k norm + rope + KV store, into the split
kernel (each program forms its own group's queries; the one holding the newest key stores it
first): one launch fewer per layer, where a launch of that size costs ~2 µs of a decode step.

Key ranges are sized from n_keys on the device: the valid span (the window's, if any) is cut into
n_splits equal ranges of whole tiles, each at least `chunk` keys. A chunk fixed by n_ctx alone
would trade short contexts (512 keys of a 32k cache in 2 programs per KV head) against long ones;
this way 512 keys spread over 8 programs per KV head and 32k keys over every program, under one
graph. The default split count gives ~PROGRAMS_PER_SM programs per SM over all KV heads: with a
few waves the tail wave matters little (a memory-bound program left alone on an SM still keeps
two tiles in flight) and partials stay a few % of the K/V bytes.

Query heads of a group are the rows of tl.dot operands, padded to 16 (the MMA minimum M): the
padded rows cost tensor-core cycles, which are idle here anyway, and the K / V tiles go through
the software pipeliner's cp.async into shared memory, so bytes stay in flight without holding
registers (compiled offline for sm_90 with Triton 3.9: mma.sync m16n8k16, two K/V buffers at
NUM_STAGES=3, 80-100 registers, 72 KB of shared memory at 16 KB tiles, i.e. 3 programs per SM).
The alternative (`dot=False`: broadcast products and tl.sum in f32) spends `group` FMAs per K and
per V element plus cross-lane reductions per tile, and its loads are not pipelined: at group 8
and HBM speed the FMAs alone are ~40% of an H100's FP32 issue rate, before the bf16 converts and
the reductions. It is kept for f32 caches (exact, where tl.dot would use tf32) and for
comparison in scripts/bench_attention.py.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tpruntime.kernels.common import interpreting, launch_kw, sm_count, use_pdl, wait_inputs
from tpruntime.kernels.fused import cast_to, check_qkv_rope, rope_pairs, rope_rotate
from tpruntime.kernels.gemv_q8 import new_quantized, producer_args, quantize_store, zero_share
from tpruntime.qweight import Int8Request, QuantizedX

LOG2E = 1.4426950408889634
# Whether the model's decode steps take decode_attention_qkv (one launch fewer per layer):
# decode steps 0.6% (qwen3-32b) and 0.9% (qwen3-8b) faster on an H100 (docs/benchmarks.md,
# tenth session). TPRUNTIME_ATTN_QKV=0 keeps the separate q/k norm + rope + store launch.
FUSE_QKV = os.environ.get("TPRUNTIME_ATTN_QKV", "1") != "0"
# The first tiles' L2 prefetch in that path (TPRUNTIME_ATTN_PREFETCH=0 leaves it out, for the A/B).
PREFETCH_KV = os.environ.get("TPRUNTIME_ATTN_PREFETCH", "1") != "0"
PROGRAMS_PER_SM = 4  # default split count: programs per SM over all KV heads of a full cache
NUM_STAGES = 3  # cp.async pipeline depth of the tl.dot path (2 tiles of K and V in flight)
NUM_WARPS = 4


@triton.jit
def _key_range(n_keys_ptr, n_ctx, window, n_splits, min_chunk, BLOCK_N: tl.constexpr):
    """(lo, hi, chunk): keys [lo, hi) are attended to, split s owns [lo + s*chunk, +chunk)."""
    hi = tl.minimum(tl.load(n_keys_ptr).to(tl.int32), n_ctx)
    lo = tl.where(window > 0, tl.maximum(hi - window, 0), 0)
    per = (hi - lo + n_splits - 1) // n_splits
    chunk = tl.maximum((per + BLOCK_N - 1) // BLOCK_N * BLOCK_N, min_chunk)
    return lo, hi, chunk


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        # the interpreter: same (already rounded) values, products exact in f32
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")  # f32 caches: not tf32
    else:
        return tl.dot(a, b)


@triton.jit
def _qkv_constants(bias_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, kvh, n_kv, pos, stride_cos, heads, row_ok, dk, dv,
                   G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, ROPE: tl.constexpr, NEOX: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr):
    """What _qkv_prologue reads that no kernel of the step writes (rope tables at pos, norm
    weights, biases): loaded before the launch waits for the previous kernel; with the rope
    pairing of the features (rope_pairs) that both use."""
    part, ang, first, rotated = rope_pairs(dk, ROPE, NEOX)
    d_ok = dk < D
    cs = tl.load(cos_ptr + pos * stride_cos + ang, mask=rotated, other=0.0)
    sn = tl.load(sin_ptr + pos * stride_cos + ang, mask=rotated, other=0.0)
    wq, wqp, wk, wkp = 1.0, 1.0, 1.0, 1.0
    if HAS_NORM:
        wq = tl.load(qn_ptr + dk, mask=d_ok, other=0.0).to(tl.float32)
        wqp = tl.load(qn_ptr + part, mask=rotated, other=0.0).to(tl.float32)
        wk = tl.load(kn_ptr + dk, mask=d_ok, other=0.0).to(tl.float32)
        wkp = tl.load(kn_ptr + part, mask=rotated, other=0.0).to(tl.float32)
    bq, bqp, bk, bkp, bv = 0.0, 0.0, 0.0, 0.0, 0.0
    if HAS_BIAS:
        cols = heads[:, None] * D
        kc = n_kv * G * D + kvh * D
        vc = n_kv * G * D + n_kv * D + kvh * DV
        bq = tl.load(bias_ptr + cols + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        bqp = tl.load(bias_ptr + cols + part[None, :], mask=row_ok[:, None] & rotated[None, :], other=0.0)
        bk = tl.load(bias_ptr + kc + dk, mask=d_ok, other=0.0)
        bkp = tl.load(bias_ptr + kc + part, mask=rotated, other=0.0)
        bv = tl.load(bias_ptr + vc + dv, mask=dv < DV, other=0.0)
    return part, first, rotated, cs, sn, wq, wqp, wk, wkp, bq, bqp, bk, bkp, bv


@triton.jit
def _qkv_prologue(qkv_ptr, k_ptr, v_ptr, consts, kvh, n_kv, pos, writer, stride_kh, stride_kn, stride_vh,
                  stride_vn, eps, heads, row_ok, dk, dv, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  HAS_NORM: tl.constexpr, RNE: tl.constexpr):
    """What qk_norm_rope_store (kernels/fused.py) does for one KV group, inside the attention
    launch: the group's G query heads from the fused q|k|v projection (+bias, q norm, rope),
    returned in the cache dtype as the separate kernel would have stored them; and, in the
    `writer` program (the one whose keys end at the new one), the new key (k norm, rope) and
    value stored into the caches at `pos` before any key is read. The other programs never read
    position `pos`, so only the writer waits for its own stores (a CTA barrier)."""
    part, first, rotated, cs, sn, wq, wqp, wk, wkp, bq, bqp, bk, bkp, bv = consts
    d_ok = dk < D
    cols = heads[:, None] * D
    x = tl.load(qkv_ptr + cols + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0) + bq
    xp = tl.load(qkv_ptr + cols + part[None, :], mask=row_ok[:, None] & rotated[None, :], other=0.0) + bqp
    if HAS_NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        x = x * r * wq[None, :]
        xp = xp * r * wqp[None, :]
    q = cast_to(rope_rotate(x, xp, cs[None, :], sn[None, :], first[None, :], rotated[None, :]),
                k_ptr.dtype.element_ty, RNE)
    if writer:  # (names of their own: a branch may not give a variable another shape)
        kc = n_kv * G * D + kvh * D
        vc = n_kv * G * D + n_kv * D + kvh * DV
        k = tl.load(qkv_ptr + kc + dk, mask=d_ok, other=0.0) + bk
        kp = tl.load(qkv_ptr + kc + part, mask=rotated, other=0.0) + bkp
        v = tl.load(qkv_ptr + vc + dv, mask=dv < DV, other=0.0) + bv
        if HAS_NORM:
            rk = tl.rsqrt(tl.sum(k * k, axis=0) / D + eps)
            k = k * rk * wk
            kp = kp * rk * wkp
        k = rope_rotate(k, kp, cs, sn, first, rotated)
        kvh64 = kvh.to(tl.int64)
        tl.store(k_ptr + kvh64 * stride_kh + pos * stride_kn + dk, cast_to(k, k_ptr.dtype.element_ty, RNE), mask=d_ok)
        tl.store(v_ptr + kvh64 * stride_vh + pos * stride_vn + dv, cast_to(v, v_ptr.dtype.element_ty, RNE),
                 mask=dv < DV)
        tl.debug_barrier()  # (a CTA's global stores are visible to its threads after a barrier)
    return q


@triton.jit
def _prefetch_l2(ptrs, mask):
    """Ask L2 for the lines at ptrs (where mask): a hint with no result, so it may run before the
    launch waits for the previous kernel even for bytes that kernel writes (L2 is where every
    SM's writes meet; nothing lands in L1 or registers)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, n_keys_ptr, part_ptr,
                  qk_scale, n_ctx, window, n_splits, min_chunk,
                  stride_qh, stride_kh, stride_kn, stride_vh, stride_vn,
                  bias_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, stride_cos, eps,
                  G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PART: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr,
                  PDL: tl.constexpr, QKV: tl.constexpr, ROPE: tl.constexpr, NEOX: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, RNE: tl.constexpr,
                  PREFETCH: tl.constexpr):
    # With QKV every input but q|k|v itself was written before the previous kernel started
    # (n_keys = pos + 1 at the start of the step, the keys before the new one by earlier tokens;
    # decode_attention_qkv's contract), so the key range, the constants and an L2 prefetch of
    # the first K and V tiles go before the wait and overlap the q|k|v product's tail. Without
    # it q and the new key are the previous kernel's output.
    if not QKV:
        wait_inputs(PDL)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    lo, hi, chunk = _key_range(n_keys_ptr, n_ctx, window, n_splits, min_chunk, BLOCK_N)
    start = lo + split * chunk
    if start >= hi:  # no keys here; the merge reads n_keys and skips this split
        return
    end = tl.minimum(start + chunk, hi)

    rows = tl.arange(0, BLOCK_H)
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = kvh * G + rows
    row_ok = rows < G
    if QKV:  # q_ptr is the q|k|v projection (decode_attention_qkv)
        pos = (hi - 1).to(tl.int64)
        consts = _qkv_constants(bias_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, kvh, tl.num_programs(0), pos,
                                stride_cos, heads, row_ok, dk, dv, G, D, DV, ROPE, NEOX, HAS_BIAS, HAS_NORM)
        if PREFETCH:
            # the first tile's keys, each row as 128-byte lines (row starts are 16-byte aligned)
            LINES: tl.constexpr = (max(BLOCK_D, BLOCK_DV) * k_ptr.dtype.element_ty.primitive_bitwidth // 8 + 127) // 128
            # (names of their own: the loop below carries `keys` at another shape)
            pk = start + tl.arange(0, BLOCK_N)[:, None]
            pl = tl.arange(0, LINES)[None, :] * (1024 // k_ptr.dtype.element_ty.primitive_bitwidth)
            _prefetch_l2(k_ptr + kvh.to(tl.int64) * stride_kh + pk * stride_kn + pl, (pk < end) & (pl < D))
            _prefetch_l2(v_ptr + kvh.to(tl.int64) * stride_vh + pk * stride_vn + pl, (pk < end) & (pl < DV))
        wait_inputs(PDL)
        q = _qkv_prologue(q_ptr, k_ptr, v_ptr, consts, kvh, tl.num_programs(0), pos, end == hi, stride_kh,
                          stride_kn, stride_vh, stride_vn, eps, heads, row_ok, dk, dv, G, D, DV, HAS_NORM, RNE)
    else:
        q_mask = row_ok[:, None]
        if BLOCK_D != D:
            q_mask = q_mask & (dk < D)[None, :]
        q = tl.load(q_ptr + heads[:, None] * stride_qh + dk[None, :], mask=q_mask, other=0.0)
    if DOT:
        q = q.to(k_ptr.dtype.element_ty)
    else:
        q = q.to(tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    # Every tile starts below `end`, so each holds a valid key and the running max is finite
    # from the first tile on (no -inf - -inf).
    for t in range(start, end, BLOCK_N):
        keys = t + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        # Masked keys load as 0, never the cache's bytes past n_keys (NaN there must not leak).
        if DOT:
            k_mask = key_ok[None, :]  # K^T tile [BLOCK_D, BLOCK_N]
            if BLOCK_D != D:
                k_mask = k_mask & (dk < D)[:, None]
            k = tl.load(k_base + keys[None, :] * stride_kn + dk[:, None], mask=k_mask, other=0.0)
            s = _dot(q, k, IEEE, WIDEN)
        else:
            k_mask = key_ok[:, None]
            if BLOCK_D != D:
                k_mask = k_mask & (dk < D)[None, :]
            k = tl.load(k_base + keys[:, None] * stride_kn + dk[None, :], mask=k_mask, other=0.0)
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if DOT and not IEEE:
            # P enters the PV product in the cache dtype; summing the same rounded weights keeps
            # the output an exact convex combination of V rows.
            p = p.to(v_ptr.dtype.element_ty)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
        v_mask = key_ok[:, None]
        if BLOCK_DV != DV:
            v_mask = v_mask & (dv < DV)[None, :]
        v = tl.load(v_base + keys[:, None] * stride_vn + dv[None, :], mask=v_mask, other=0.0)
        if DOT:
            pv = _dot(p, v, IEEE, WIDEN)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # A partial is one row of PART floats: acc[0:DV], max at DV, sum at DV + 1.
    row = part_ptr + (heads * n_splits + split).to(tl.int64) * PART
    a_mask = row_ok[:, None]
    if BLOCK_DV != DV:
        a_mask = a_mask & (dv < DV)[None, :]
    tl.store(row[:, None] + dv[None, :], acc, mask=a_mask)
    tl.store(row + DV, m_i, mask=row_ok)
    tl.store(row + DV + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(n_keys_ptr, part_ptr, out_ptr, n_ctx, window, n_splits, min_chunk, stride_oh,
                  xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
                  DV: tl.constexpr, PART: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_N: tl.constexpr, PDL: tl.constexpr, Q8: tl.constexpr, ZB: tl.constexpr):
    wait_inputs(PDL)
    h = tl.program_id(0)
    lo, hi, chunk = _key_range(n_keys_ptr, n_ctx, window, n_splits, min_chunk, BLOCK_N)
    n_used = (hi - lo + chunk - 1) // chunk  # the splits that hold keys; the others wrote nothing
    sl = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    base = part_ptr + h.to(tl.int64) * n_splits * PART

    m_run = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        ok = s0 + sl < n_used
        m_run = tl.maximum(m_run, tl.load(base + (s0 + sl) * PART + DV, mask=ok, other=float("-inf")))
    m_all = tl.max(m_run, axis=0)

    l_run = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        ok = s0 + sl < n_used
        row = base + (s0 + sl) * PART
        w = tl.exp2(tl.load(row + DV, mask=ok, other=float("-inf")) - m_all)
        l_run += w * tl.load(row + DV + 1, mask=ok, other=0.0)
        a_mask = ok[:, None]
        if BLOCK_DV != DV:
            a_mask = a_mask & (dv < DV)[None, :]
        acc += tl.load(row[:, None] + dv[None, :], mask=a_mask, other=0.0) * w[:, None]
    out = tl.sum(acc, axis=0) / tl.sum(l_run, axis=0)
    tl.store(out_ptr + h * stride_oh + dv, out, mask=dv < DV)
    if Q8:  # the head's values in int8 form for the output projection (DV whole groups of 32)
        g = h * (DV // 32) + tl.arange(0, DV // 32)[:, None]
        quantize_store(tl.reshape(out, [DV // 32, 32]), g, None, xq_ptr, xd_ptr, xs_ptr)
        zero_share(y_ptr, h, share, n_zero, ZB)


@functools.lru_cache(maxsize=1024)
def plan(n_head: int, n_kv: int, n_ctx: int, head_dim: int, head_dim_v: int, dtype: torch.dtype,
         device: torch.device, chunk: int | None = None, dot: bool | None = None,
         programs_per_sm: int = PROGRAMS_PER_SM) -> dict:
    """The static launch parameters of decode_attention for one cache shape."""
    group = n_head // n_kv
    if dot is None:
        dot = dtype in (torch.bfloat16, torch.float16)
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(head_dim_v)
    width = max(block_d, block_dv)
    if dot:
        block_h = max(16, triton.next_power_of_2(group))
        # K and V tiles of 16 KB at 2-byte elements (64 keys at d=128, 32 at d=256): with
        # NUM_STAGES=3, 64 KB of buffers per program; at least 16 keys for the MMA's K.
        block_n = max(16, min(128, 16384 // (width * torch.empty((), dtype=dtype).element_size())))
    else:
        block_h = triton.next_power_of_2(group)
        # the [BLOCK_H, BLOCK_N, BLOCK_D] f32 products live in registers: ~8K values a program
        block_n = max(1, min(64, 8192 // (block_h * width)))
    if chunk is None:
        # As few keys per split as one tile; at most enough splits that all KV heads together
        # give `programs_per_sm` programs per SM.
        min_chunk = block_n
        n_splits = min(triton.cdiv(n_ctx, block_n), triton.cdiv(programs_per_sm * sm_count(device), n_kv))
    else:
        min_chunk = max(1, int(chunk))
        n_splits = triton.cdiv(n_ctx, min_chunk)
    return dict(group=group, dot=dot, block_h=block_h, block_d=block_d, block_dv=block_dv, block_n=block_n,
                min_chunk=min_chunk, n_splits=max(1, n_splits),
                part=(head_dim_v + 2 + 3) // 4 * 4)  # rows of 16 B multiples: vector stores


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_keys: torch.Tensor,
                     scale: float, window: int = 0, *, chunk: int | None = None,
                     dot: bool | None = None, q8: Int8Request | None = None) -> "torch.Tensor | QuantizedX":
    """q: [n_head, head_dim] (f32/bf16/f16) of the one new token, at position n_keys-1.
    k_cache [n_kv, n_ctx, head_dim], v_cache [n_kv, n_ctx, head_dim_v]: bf16/f16/f32 with a
    contiguous last dim; query head h reads KV head h // (n_head // n_kv).
    n_keys: int32 or int64 device tensor of shape [1]: keys [0, n_keys) are valid (the new key is
    already stored at n_keys-1), 1 <= n_keys <= n_ctx. window > 0: only keys k with
    (n_keys-1) - k < window (sliding window).
    Returns float32 [n_head, head_dim_v]: softmax(scale * q k^T) v per head, accumulated in f32.

    No host sync and launch shapes fixed by the cache shape: capturable in a CUDA graph that is
    then valid for every n_keys. chunk: the fewest keys a split takes; the grid then has
    cdiv(n_ctx, chunk) splits (default: one tile, and a split count sized to the device).
    dot: tl.dot over the query-head group padded to 16 rows (default for bf16/f16 caches; q and
    the softmax weights are rounded to the cache dtype, as in flash attention) or broadcast f32
    FMAs (default for f32 caches). q8: the output projection's request (tpruntime/qweight.py):
    where head_dim_v is a power of two and a multiple of 32, the merge kernel also writes the
    output's int8 form, returned as a QuantizedX whose x is the output as [1, n_head * head_dim_v]."""
    n_head, head_dim = q.shape
    if q.stride(1) != 1:
        q = q.contiguous()
    return _attend(q, n_head, head_dim, k_cache, v_cache, n_keys, scale, window, chunk, dot, q8, None)


def decode_attention_qkv(qkv: torch.Tensor, n_head: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         n_keys: torch.Tensor, scale: float, window: int = 0, *, q_norm: torch.Tensor | None = None,
                         k_norm: torch.Tensor | None = None, eps: float = 1e-6, cos: torch.Tensor,
                         sin: torch.Tensor, rope_dim: int, neox: bool, bias: torch.Tensor | None = None,
                         chunk: int | None = None, dot: bool | None = None,
                         q8: Int8Request | None = None) -> "torch.Tensor | QuantizedX":
    """kernels.fused.qk_norm_rope_store (position n_keys-1, q in the cache dtype) followed by
    decode_attention, with the first inside the attention launch: one launch fewer per layer
    and token. qkv: f32 [1, n_head*head_dim + n_kv*(head_dim + head_dim_v)] (the fused
    projection of the one new token), the other arguments as those two functions take them;
    rope tables over at least the cache's positions. Each attention program norms and rotates
    its own group's query heads (a few KB read again per program); the program that holds the
    newest key writes it and its value to the caches first.

    Everything but qkv is read before the launch waits for the kernel launched just before it
    (a programmatic dependent launch on Hopper, kernels/common.py): n_keys, the tables, the
    weights and the cache before n_keys-1 must not be written by that kernel (the runtime
    makes n_keys at the start of its step). The new token's position is min(n_keys, n_ctx)-1."""
    n_kv, _, head_dim = k_cache.shape
    head_dim_v = v_cache.shape[2]
    check_qkv_rope("decode_attention_qkv", qkv, n_head, n_kv, head_dim, head_dim_v, q_norm, k_norm, cos, rope_dim)
    if qkv.shape[0] != 1 or cos.shape != sin.shape:
        raise ValueError(f"decode_attention_qkv: qkv {tuple(qkv.shape)} is not one token, or the rope tables "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)} differ")
    if qkv.dtype != torch.float32 or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != qkv.shape[1])):
        raise ValueError("decode_attention_qkv: qkv and bias must be float32 over the fused columns")
    if cos.shape[0] < k_cache.shape[1]:
        raise ValueError(f"decode_attention_qkv: rope tables of {cos.shape[0]} positions, a cache of {k_cache.shape[1]}")
    # (no copies here: a copy would be the kernel just before the launch, whose output the
    # kernel reads before it waits)
    if not all(t is None or t.is_contiguous() for t in (qkv, cos, sin, bias, q_norm, k_norm)):
        raise ValueError("decode_attention_qkv: qkv, the rope tables, norm weights and bias must be contiguous")
    pro = dict(bias=bias, q_norm=q_norm, k_norm=k_norm, cos=cos, sin=sin, rope_dim=rope_dim, neox=bool(neox),
               eps=float(eps))
    return _attend(qkv, n_head, head_dim, k_cache, v_cache, n_keys, scale, window, chunk, dot, q8, pro)


def _attend(q, n_head, head_dim, k_cache, v_cache, n_keys, scale, window, chunk, dot, q8, pro: dict | None):
    n_kv, n_ctx, d_k = k_cache.shape
    head_dim_v = v_cache.shape[2]
    if d_k != head_dim or v_cache.shape[:2] != k_cache.shape[:2] or n_kv == 0 or n_head % n_kv:
        raise ValueError(f"decode_attention: {n_head} query heads of {head_dim}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)} do not fit (whole GQA groups, one head_dim)")
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or k_cache.dtype != v_cache.dtype:
        raise ValueError("decode_attention: K and V caches need one dtype and a contiguous last dim")
    if n_keys.numel() != 1 or n_keys.dtype not in (torch.int32, torch.int64):
        raise ValueError("decode_attention: n_keys must be an int32/int64 tensor of one element")
    p = plan(n_head, n_kv, n_ctx, head_dim, head_dim_v, k_cache.dtype, q.device, chunk, dot, PROGRAMS_PER_SM)
    ns, part = p["n_splits"], p["part"]
    window = max(0, int(window))
    scratch = torch.empty(n_head, ns, part, dtype=torch.float32, device=q.device)
    out = torch.empty(n_head, head_dim_v, dtype=torch.float32, device=q.device)
    qx = None
    if q8 is not None and head_dim_v % 32 == 0 and p["block_dv"] == head_dim_v:
        qx = new_quantized(out.view(1, -1), q8)
    q8_args, q8_kw = producer_args(qx, n_head, out)
    pdl = use_pdl(q)
    if pro is None:
        pro_args = (q,) * 5 + (0, 0.0)
        pro_kw = dict(QKV=False, ROPE=0, NEOX=False, HAS_BIAS=False, HAS_NORM=False)
    else:
        pro_args = (pro["bias"] if pro["bias"] is not None else q, pro["q_norm"] if pro["q_norm"] is not None else q,
                    pro["k_norm"] if pro["k_norm"] is not None else q, pro["cos"], pro["sin"],
                    pro["cos"].stride(0), pro["eps"])
        pro_kw = dict(QKV=True, ROPE=pro["rope_dim"], NEOX=pro["neox"], HAS_BIAS=pro["bias"] is not None,
                      HAS_NORM=pro["q_norm"] is not None)
    _split_kernel[(n_kv, ns)](
        q, k_cache, v_cache, n_keys, scratch, float(scale) * LOG2E, n_ctx, window, ns, p["min_chunk"],
        q.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), *pro_args,
        G=p["group"], D=head_dim, DV=head_dim_v, PART=part, BLOCK_H=p["block_h"], BLOCK_D=p["block_d"],
        BLOCK_DV=p["block_dv"], BLOCK_N=p["block_n"], DOT=p["dot"],
        # (Triton's interpreter multiplies bf16 tl.dot operands as their integer bit patterns)
        IEEE=p["dot"] and k_cache.dtype == torch.float32, WIDEN=interpreting(), PDL=pdl, RNE=interpreting(),
        PREFETCH=pro is not None and PREFETCH_KV and q.is_cuda and not interpreting(),
        **pro_kw, **launch_kw(pdl), num_warps=NUM_WARPS, num_stages=NUM_STAGES if p["dot"] else 1)
    _merge_kernel[(n_head,)](
        n_keys, scratch, out, n_ctx, window, ns, p["min_chunk"], out.stride(0),
        *q8_args, DV=head_dim_v, PART=part, BLOCK_DV=p["block_dv"], BLOCK_S=32 if p["block_dv"] <= 128 else 16,
        BLOCK_N=p["block_n"], PDL=pdl, **launch_kw(pdl), **q8_kw, num_warps=4)
    return out if qx is None else qx


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_keys: int,
                               scale: float, window: int = 0) -> torch.Tensor:
    """The same in float64 over the valid keys (n_keys a host int), returned as float32."""
    n_head, n_kv = q.shape[0], k_cache.shape[0]
    lo = max(0, n_keys - window) if window > 0 else 0
    k = k_cache[:, lo:n_keys].double().repeat_interleave(n_head // n_kv, dim=0)
    v = v_cache[:, lo:n_keys].double().repeat_interleave(n_head // n_kv, dim=0)
    s = torch.einsum("hd,hnd->hn", q.double(), k) * scale
    return torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v).float()


__all__ = ["decode_attention", "decode_attention_qkv", "decode_attention_reference", "plan"]
