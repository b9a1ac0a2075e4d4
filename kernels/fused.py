"""Fused elementwise steps of a decoder block (Triton), one launch each.

    rms_norm(x, w)               x * rsqrt(mean(x^2) + eps) * w, per row, in float32
    add_rms_norm(h, delta, w)    h += delta (optionally post-normed first), then rms_norm(h)
    qk_norm_rope_store(qkv, …)   split q|k|v, (+bias), per-head q/k norm, rope, k/v into the cache
    act_mul(gate_up, n_ff)       act(gate) * up, silu or gelu (tanh approximation)

They compute what tpruntime.ops.TorchOps computes (the reference, which they replace on the
GPU). A decode step moves a few kilobytes through each of these, so on an H100 their cost is
launch and memory latency, not bandwidth or math: a program owns a whole row (or head), issues
all its loads up front, reduces within as few warps as hold the row, and writes once. Nothing
here reads device data on the host or branches on it, so every call can be captured in a CUDA
graph; launch parameters are a cached function of the shapes (each is called once per layer per
token with the same ones).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tpruntime.kernels.common import interpreting, launch_kw, use_pdl, wait_inputs
from tpruntime.kernels.gemv_q8 import new_quantized, producer_args, quantize_store, zero_share
from tpruntime.qweight import Int8Request, QuantizedX

# A row up to this long is held in registers for the whole kernel (32 floats per thread at 8
# warps); a longer one is streamed in chunks of half this, read again from cache per pass.
MAX_TILE = 8192
_ACTS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def cast_to(x, dtype: tl.constexpr, RNE: tl.constexpr):
    y = x.to(dtype)
    if RNE:
        if dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b += 0x7FFF + ((b >> 16) & 1)
            y = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


def _warps_for(block: int, per_thread: int, most: int = 8) -> int:
    # Enough warps that no thread holds more than `per_thread` values of a row tile: fewer warps
    # keep a row's reduction inside one warp (shuffles, no shared-memory round trip), more keep
    # the register count (and spills) down on the long rows.
    return max(1, min(most, block // (32 * per_thread)))


# Values per thread of a norm's row tile. A decode step's norm is one program on one row, so its
# time is latency: 16 values a thread (16 warps at 5120 values, 8 at 4096) rather than 32 made
# decode steps 1.1% (qwen3-32b) and 1.5% (qwen3-8b) faster on an H100 (8 was no better;
# docs/benchmarks.md). TPRUNTIME_NORM_PER_THREAD sets it for A/B runs.
NORM_PER_THREAD = int(os.environ.get("TPRUNTIME_NORM_PER_THREAD", "16"))
# The norm weights loaded before the wait (PDL): they come from HBM, since a step's weights evict
# them from L2; with the attention prologue, decode steps 0.4% (qwen3-32b) and 0.9% (qwen3-8b)
# faster on an H100 (docs/benchmarks.md, tenth session). TPRUNTIME_NORM_PREWAIT=0 for A/B runs.
NORM_PREWAIT = os.environ.get("TPRUNTIME_NORM_PREWAIT", "1") != "0"


# --- RMS norm, with the residual add ---------------------------------------------------------

@triton.jit
def _rstd(x, n, eps):
    return tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / n + eps)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, pw_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_d, stride_o,
                         xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
                         HAS_DELTA: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr,
                         NCHUNK: tl.constexpr, RNE: tl.constexpr, PDL: tl.constexpr, Q8: tl.constexpr,
                         ZB: tl.constexpr, PREWAIT: tl.constexpr):
    # x is h (f32, rewritten with h + delta) when HAS_DELTA, else the input of a plain norm.
    # Tiles are [BLOCK / 4, 4], not [BLOCK]: every load and store then has the same 4-wide
    # vectors, where a flat tile lets Triton store f32 four and bf16 eight to a thread, with a
    # layout conversion through shared memory between them.
    # Products are x * rstd first, then * w: the order torch's rms_norm multiplies in.
    row = tl.program_id(0)
    xr, dr, orow = x_ptr + row * stride_x, d_ptr + row * stride_d, out_ptr + row * stride_o
    offs = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    if NCHUNK == 1:
        m = offs < n
        if not PREWAIT:
            wait_inputs(PDL)
        # The norm weights are constants, so they are read before the wait, overlapping the
        # previous kernel's tail (they come from HBM: a step's weight stream evicts them from L2).
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        pw = w
        if HAS_DELTA and HAS_POST:
            pw = tl.load(pw_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if PREWAIT:
            wait_inputs(PDL)
        # Every other load before the first reduction: one memory round trip per row.
        x = tl.load(xr + offs, mask=m, other=0.0).to(tl.float32)
        d = x
        if HAS_DELTA:
            d = tl.load(dr + offs, mask=m, other=0.0).to(tl.float32)
        add_norm_row(x, d, w, pw, xr, orow, offs, m, n, eps, xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
                     HAS_DELTA, HAS_POST, BLOCK, RNE, Q8, ZB)
    else:
        wait_inputs(PDL)
        # Streamed: h + delta is summed in one pass and formed again in the next (from cache)
        # rather than stored and read back, which would need the writing and reading threads
        # to be the same or to synchronize.
        rd = 1.0
        if HAS_POST:
            acc = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
            for c in range(NCHUNK):
                o = c * BLOCK + offs
                d = tl.load(dr + o, mask=o < n, other=0.0).to(tl.float32)
                acc += d * d
            rd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / n + eps)
        acc = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
        for c in range(NCHUNK):
            o = c * BLOCK + offs
            x = _chunk(xr, dr, pw_ptr, o, o < n, rd, HAS_DELTA, HAS_POST)
            acc += x * x
        r = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / n + eps)
        for c in range(NCHUNK):
            o = c * BLOCK + offs
            m = o < n
            x = _chunk(xr, dr, pw_ptr, o, m, rd, HAS_DELTA, HAS_POST)
            if HAS_DELTA:
                tl.store(xr + o, x, mask=m)
            w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
            tl.store(orow + o, cast_to(x * r * w, out_ptr.dtype.element_ty, RNE), mask=m)


@triton.jit
def add_norm_row(x, d, w, pw, xr, orow, offs, m, n, eps, xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
                 HAS_DELTA: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr,
                 Q8: tl.constexpr, ZB: tl.constexpr):
    """The rest of a row held whole, its values loaded ([BLOCK / 4, 4] tiles at offs): x +=
    (post-normed) d, stored back at xr when HAS_DELTA; rms_norm(x) * w cast and stored at orow;
    with Q8 (one row) its int8 form for the next GEMV, from the rounded values. Shared with the
    all-reduce that ends in this norm (kernels/allreduce.py)."""
    if HAS_DELTA:
        if HAS_POST:
            d = d * _rstd(d, n, eps) * pw
        x = x + d
        tl.store(xr + offs, x, mask=m)
    o = cast_to(x * _rstd(x, n, eps) * w, orow.dtype.element_ty, RNE)
    tl.store(orow + offs, o, mask=m)
    if Q8:
        g = tl.arange(0, BLOCK // 32)[:, None]
        quantize_store(tl.reshape(o.to(tl.float32), [BLOCK // 32, 32]), g, g < n // 32, xq_ptr, xd_ptr, xs_ptr)
        zero_share(y_ptr, 0, share, n_zero, ZB)


@triton.jit
def _chunk(xr, dr, pw_ptr, o, m, rd, HAS_DELTA: tl.constexpr, HAS_POST: tl.constexpr):
    # x, or h + (post-normed) delta, over one chunk of a streamed row
    x = tl.load(xr + o, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(dr + o, mask=m, other=0.0).to(tl.float32)
        if HAS_POST:
            d = d * rd * tl.load(pw_ptr + o, mask=m, other=0.0).to(tl.float32)
        x = x + d
    return x


@functools.lru_cache(maxsize=None)
def norm_config(n: int, max_tile: int) -> dict:
    block = max(16, triton.next_power_of_2(n))
    chunks = 1
    if block > max_tile:
        block = max_tile // 2
        chunks = triton.cdiv(n, block)
    return dict(BLOCK=block, NCHUNK=chunks, num_warps=_warps_for(block, NORM_PER_THREAD, 32), num_stages=1)


def row_view(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if t.shape[-1] != n:
        raise ValueError(f"{what}: last dimension {t.shape[-1]} != the weight's {n}")
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_int8(out2: torch.Tensor, q8: Int8Request | None, cfg: dict, dummy: torch.Tensor):
    """(qx, launch arguments, launch keywords) of a norm kernel writing out2 [rows, n]: with q8
    and a row it can quantize (one row of a multiple of 32 values held whole) it also writes
    out2's int8 form, qx a QuantizedX; else qx is None."""
    rows, n = out2.shape
    qx = new_quantized(out2, q8) if q8 is not None and rows == 1 and n % 32 == 0 and cfg["NCHUNK"] == 1 else None
    return (qx, *producer_args(qx, rows, dummy))


def _launch_norm(x2, d2, pw, w, out2, eps, max_tile, q8: Int8Request | None = None):
    """Launch the norm kernel; with q8 (and a row it can quantize) it also writes out2's int8
    form, returned as a QuantizedX (else None)."""
    # The weights are read before the kernel waits for the one launched just before it, which
    # must then not have written them: a weight that needs a copy first is read after the wait.
    prewait = NORM_PREWAIT and w.is_contiguous() and (pw is None or pw.is_contiguous())
    w = w.contiguous()
    pw = pw.contiguous() if pw is not None else None
    n = w.numel()
    rows = x2.shape[0]
    if rows == 0:
        return None
    cfg = norm_config(n, max_tile)
    qx, q8_args, q8_kw = norm_int8(out2, q8, cfg, x2)
    pdl = use_pdl(x2)
    _add_rms_norm_kernel[(rows,)](
        x2, d2 if d2 is not None else x2, pw if pw is not None else x2, w, out2, n, float(eps),
        x2.stride(0), d2.stride(0) if d2 is not None else 0, out2.stride(0),
        *q8_args, HAS_DELTA=d2 is not None, HAS_POST=pw is not None, RNE=interpreting(), PDL=pdl, PREWAIT=prewait,
        **launch_kw(pdl), **q8_kw, **cfg)
    return qx


def with_int8(out: torch.Tensor, qx: QuantizedX | None):
    return out if qx is None else qx._replace(x=out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.bfloat16, *,
             max_tile: int = MAX_TILE, q8: Int8Request | None = None) -> "torch.Tensor | QuantizedX":
    """F.rms_norm(x.float(), weight.shape, weight, eps) cast to out_dtype: x [..., n] (any float
    dtype), weight [n]; each row of n normalized on its own. `max_tile` (tests): the longest row
    held in registers. q8: the next GEMV's request; where the kernel can, the result comes as a
    QuantizedX (tpruntime/qweight.py) with its int8 form."""
    n = weight.numel()
    x2 = row_view(x, n, "rms_norm")
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return with_int8(out, _launch_norm(x2, None, None, weight, out.view(-1, n), eps, max_tile, q8))


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 post_weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 max_tile: int = MAX_TILE, q8: Int8Request | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm in one pass: h += delta, IN PLACE (h is the float32
    residual stream, contiguous; a captured graph keeps reusing its buffer), or h +=
    rms_norm(delta) * post_weight when post_weight is given (Gemma's sandwich norm). Returns
    (h, rms_norm(h) * weight as out_dtype). delta: f32 or bf16, h's shape. q8: as rms_norm's."""
    if h.dtype != torch.float32 or not h.is_contiguous():
        raise ValueError("add_rms_norm: h must be a contiguous float32 tensor (it is updated in place)")
    if delta.shape != h.shape:
        raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} != h {tuple(h.shape)}")
    n = weight.numel()
    h2 = row_view(h, n, "add_rms_norm")
    out = torch.empty(h.shape, dtype=out_dtype, device=h.device)
    qx = _launch_norm(h2, row_view(delta, n, "add_rms_norm"), post_weight, weight, out.view(-1, n), eps,
                      max_tile, q8)
    return h, with_int8(out, qx)


# --- q/k norm, rope, KV-cache store ----------------------------------------------------------

@triton.jit
def rope_pairs(offs, ROPE: tl.constexpr, NEOX: tl.constexpr):
    """For features offs of a head: the partner of each in its rotation pair, the pair's angle
    index, whether it is the first of its pair, and whether it is rotated at all (< ROPE).
    The partner is loaded again from memory (an L1 hit) rather than moved between lanes: then
    the norm and bias apply to it with the same ops, and no layout shuffle is needed."""
    HALF: tl.constexpr = ROPE // 2
    if NEOX:
        first = offs < HALF
        part = tl.where(first, offs + HALF, offs - HALF)
        ang = tl.where(first, offs, offs - HALF)
    else:
        first = (offs % 2) == 0
        part = offs ^ 1
        ang = offs // 2
    return part, ang, first, offs < ROPE


@triton.jit
def rope_rotate(x, xp, cs, sn, first, rotated):
    """x1*cos - x2*sin on the first of a pair, x2*cos + x1*sin on the second (xp: the partners)."""
    return tl.where(rotated, x * cs + tl.where(first, -xp, xp) * sn, x)


@triton.jit
def _qk_norm_rope_store_kernel(
        qkv_ptr, bias_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
        T, n_q, n_kv, stride_qkv, stride_cos, stride_kh, stride_kp, stride_vh, stride_vp, eps,
        D: tl.constexpr, DV: tl.constexpr, ROPE: tl.constexpr, NEOX: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, TB: tl.constexpr,
        RNE: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    # Program (tb, hid): TB tokens (rows of the tile) of one head; hid < n_q a query head, then
    # n_kv key heads, then n_kv value heads. q and k heads lie side by side with the same width,
    # so head hid starts at column hid * D.
    t = tl.program_id(0) * TB + tl.arange(0, TB)[:, None]
    hid = tl.program_id(1)
    tm = t < T
    src = qkv_ptr + t.to(tl.int64) * stride_qkv
    offs = tl.arange(0, BLOCK)[None, :]
    pos = tl.load(pos_ptr + t, mask=tm, other=0).to(tl.int64)
    if hid < n_q + n_kv:
        m = (offs < D) & tm
        col = src + hid * D
        part, ang, first, rotated = rope_pairs(offs, ROPE, NEOX)
        r_m = rotated & tm
        x = tl.load(col + offs, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(col + part, mask=r_m, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + pos * stride_cos + ang, mask=r_m, other=0.0)
        sn = tl.load(sin_ptr + pos * stride_cos + ang, mask=r_m, other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + hid * D + offs, mask=offs < D, other=0.0).to(tl.float32)
            xp += tl.load(bias_ptr + hid * D + part, mask=rotated, other=0.0).to(tl.float32)
        if HAS_NORM:
            if hid < n_q:
                w = tl.load(qn_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
                wp = tl.load(qn_ptr + part, mask=rotated, other=0.0).to(tl.float32)
            else:
                w = tl.load(kn_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
                wp = tl.load(kn_ptr + part, mask=rotated, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, axis=1)[:, None] / D + eps)
            x = x * r * w
            xp = xp * r * wp
        x = rope_rotate(x, xp, cs, sn, first, rotated)
        if hid < n_q:
            tl.store(q_ptr + (t.to(tl.int64) * n_q + hid) * D + offs, cast_to(x, q_ptr.dtype.element_ty, RNE), mask=m)
        else:
            j = (hid - n_q).to(tl.int64)
            tl.store(k_ptr + j * stride_kh + pos * stride_kp + offs, cast_to(x, k_ptr.dtype.element_ty, RNE), mask=m)
    else:
        j = hid - n_q - n_kv
        m = (offs < DV) & tm
        c0 = (n_q + n_kv) * D + j * DV
        x = tl.load(src + c0 + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + c0 + offs, mask=offs < DV, other=0.0).to(tl.float32)
        tl.store(v_ptr + j.to(tl.int64) * stride_vh + pos * stride_vp + offs, cast_to(x, v_ptr.dtype.element_ty, RNE),
                 mask=m)


def check_qkv_rope(what: str, qkv: torch.Tensor, n_head: int, n_head_kv: int, head_dim: int, head_dim_v: int,
                   q_norm, k_norm, cos: torch.Tensor, rope_dim: int) -> None:
    """The checks shared by the two kernels that split a q|k|v projection and rotate it
    (qk_norm_rope_store, kernels/attention.py decode_attention_qkv)."""
    width = n_head * head_dim + n_head_kv * (head_dim + head_dim_v)
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"{what}: qkv {tuple(qkv.shape)} is not [T, {width}]")
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{what}: q_norm and k_norm come together")
    if rope_dim % 2 or rope_dim > head_dim:
        raise ValueError(f"{what}: rope_dim {rope_dim} must be even and <= head_dim {head_dim}")
    if cos.shape[-1] != rope_dim // 2:
        raise ValueError(f"{what}: rope tables of {cos.shape[-1]} angles, rope_dim {rope_dim}")


# Tokens per program of qk_norm_rope_store for a prefill chunk. One (token, head) per program made
# 40 960 one-warp programs per qwen3-32b layer at ub 512: 50.3 us a layer on an H100, ≈ 5x its
# bytes' time (the SMs' resident-block limit, not HBM, set the pace); 8 tokens: 10.7 us
# (docs/benchmarks.md, thirteenth session). A decode token keeps its one-row programs.
QK_TOKENS = 8


@functools.lru_cache(maxsize=None)
def _head_config(head_dim: int, head_dim_v: int, tb: int) -> dict:
    block = triton.next_power_of_2(max(head_dim, head_dim_v))
    # One warp a token row up to 256 features (8 per thread): the norm's sum stays in shuffles.
    return dict(BLOCK=block, TB=tb, num_warps=min(8, tb * _warps_for(block, 8)), num_stages=1)


def qk_norm_rope_store(qkv: torch.Tensor, n_head: int, n_head_kv: int, head_dim: int, head_dim_v: int, *,
                       q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, rope_dim: int, neox: bool,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor | None = None,
                       q_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The attention block's steps between the q|k|v projection and attention, one launch.

    qkv: f32 [T, n_head*head_dim + n_head_kv*(head_dim + head_dim_v)]; bias (optional) the same
    width, added first; q_norm/k_norm (optional, together) [head_dim]: RMS norm of each q/k head;
    then rope of the first rope_dim features of q and k heads at positions pos (int64 [T] on the
    device) with the tables cos/sin [n_pos, rope_dim/2], neox (halves) or interleaved (pairs).
    k and v are written, in the caches' dtype, to k_cache[:, pos[t]] and v_cache[:, pos[t]]
    (caches [n_head_kv, n_ctx, d], last axis contiguous). Returns q as q_dtype [T, n_head, head_dim]."""
    T = qkv.shape[0]
    q = torch.empty(T, n_head, head_dim, dtype=q_dtype, device=qkv.device)
    if n_head == 0 or T == 0:
        return q  # a rank that sits this layer's attention out
    check_qkv_rope("qk_norm_rope_store", qkv, n_head, n_head_kv, head_dim, head_dim_v, q_norm, k_norm, cos,
                   rope_dim)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("qk_norm_rope_store: the caches' last axis must be contiguous")
    dummy = qkv
    pdl = use_pdl(qkv)
    cfg = _head_config(head_dim, head_dim_v, min(QK_TOKENS, triton.next_power_of_2(T)))
    _qk_norm_rope_store_kernel[(triton.cdiv(T, cfg["TB"]), n_head + 2 * n_head_kv)](
        qkv, bias if bias is not None else dummy, q_norm if q_norm is not None else dummy,
        k_norm if k_norm is not None else dummy, cos, sin, pos, q, k_cache, v_cache,
        T, n_head, n_head_kv, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), float(eps),
        D=head_dim, DV=head_dim_v, ROPE=rope_dim, NEOX=bool(neox), HAS_BIAS=bias is not None,
        HAS_NORM=q_norm is not None, RNE=interpreting(), PDL=pdl, **launch_kw(pdl), **cfg)
    return q


# --- gated activation ------------------------------------------------------------------------

@triton.jit
def _act_mul_kernel(gu_ptr, out_ptr, n_ff, stride_in, stride_out, xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
                    ACT: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr, PDL: tl.constexpr,
                    Q8: tl.constexpr, ZB: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_ff
    g = tl.load(gu_ptr + row * stride_in + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_in + n_ff + offs, mask=m, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    else:
        # 0.5 * g * (1 + tanh(z)) is g * sigmoid(2z): one exp, and no cancellation in 1 + tanh
        # where the tanh nears -1.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * z))
    o = cast_to(a * u, out_ptr.dtype.element_ty, RNE)
    tl.store(out_ptr + row * stride_out + offs, o, mask=m)
    if Q8:  # one row: its int8 form for the down projection (BLOCK holds whole groups of 32)
        g = tl.program_id(1) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)[:, None]
        quantize_store(tl.reshape(o.to(tl.float32), [BLOCK // 32, 32]), g, g < n_ff // 32, xq_ptr, xd_ptr, xs_ptr)
        zero_share(y_ptr, tl.program_id(1), share, n_zero, ZB)


@functools.lru_cache(maxsize=None)
def _act_config(n_ff: int) -> dict:
    # Small tiles (4 values per thread, one vector load of gate and of up) in many programs:
    # at one token the row is split over as many SMs as it fills, each with one round trip.
    block = min(512, max(32, triton.next_power_of_2(n_ff)))
    return dict(BLOCK=block, num_warps=_warps_for(block, 4), num_stages=1)


def act_mul(gate_up: torch.Tensor, n_ff: int, act: str = "silu",
            out_dtype: torch.dtype = torch.float32, *, q8: Int8Request | None = None) -> "torch.Tensor | QuantizedX":
    """act(gate) * up in float32, cast to out_dtype: gate_up [..., 2 * n_ff] holds gate in its
    first n_ff columns and up in the last; act is silu or gelu_tanh (F.gelu(approximate="tanh")).
    q8: as rms_norm's (for one row of a multiple of 32 values)."""
    if act not in _ACTS:
        raise ValueError(f"act_mul: activation {act!r} is not one of {sorted(_ACTS)}")
    if gate_up.shape[-1] != 2 * n_ff:
        raise ValueError(f"act_mul: gate_up {tuple(gate_up.shape)} does not end in 2 * n_ff = {2 * n_ff}")
    out = torch.empty(*gate_up.shape[:-1], n_ff, dtype=out_dtype, device=gate_up.device)
    if n_ff == 0:  # a rank outside the layer's FFN (and reshape(-1, 0) is ambiguous)
        return out
    g2 = gate_up.reshape(-1, 2 * n_ff)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    qx = None
    if g2.shape[0]:
        cfg = _act_config(n_ff)
        grid = (g2.shape[0], triton.cdiv(n_ff, cfg["BLOCK"]))
        if q8 is not None and g2.shape[0] == 1 and n_ff % 32 == 0:
            qx = new_quantized(out, q8)
        q8_args, q8_kw = producer_args(qx, grid[1], out)
        pdl = use_pdl(g2)
        _act_mul_kernel[grid](
            g2, out, n_ff, g2.stride(0), n_ff, *q8_args,
            ACT=_ACTS[act], RNE=interpreting(), PDL=pdl, **launch_kw(pdl), **q8_kw, **cfg)
    return with_int8(out, qx)


__all__ = ["MAX_TILE", "rms_norm", "add_rms_norm", "qk_norm_rope_store", "act_mul"]
