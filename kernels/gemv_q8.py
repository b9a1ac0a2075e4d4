"""Decode matrix-vector products on integer dot products: x quantized to 8 bits (Triton).

    y[n] = sum_k x[k] * W[n, k],  x: one token, bf16/f16; W: Q4_K blocks as stored in the file

Why a second GEMV beside kernels/gemv.py: that kernel turns every 4-bit quant into a float and
spends ~3 instructions per weight on the way (unpack, convert, FMA). An H200 streams a byte in
the time of ~8 thread-instructions, so at 2 weights per byte it is bound by instruction issue
at ~50% of HBM bandwidth (measured: 8.5 of 9.5 ms of a qwen3-32b decode step). Here x is
first rounded to int8 with one scale per 32 values (what llama.cpp's MMVQ kernels do with its
q8_1 blocks), so eight 4-bit weights meet their eight x values in two `dp4a` instructions (four
byte products each, integer accumulate) after two mask operations: ~0.6 instruction per weight,
and the block's scales are applied once per 16 products.

    sum_j w_j x_j = d_w sc_s * d_x * sum_j q_j xq_j  -  dmin_w m_s * sum_j x_j

The second sum is taken over the unrounded x (kept per 16 values), so only the first term sees
the rounding of x: a relative error of a few 1e-3 on a row, the size of bf16's own rounding of
the activations. A float32 model therefore keeps the exact kernel (tpruntime/qweight.py picks).

Layout: a thread loads 16 consecutive quant bytes (4 words: one 16-byte load) of one block,
i.e. values 64g + 16c + [0, 16) of sub-block 2g (low nibbles) and of sub-block 2g + 1 (high
nibbles), and the matching 2 x 16 int8 x values; the tile is [BB blocks, 4 g, 2 c, 4 words], so
a warp covers 4 blocks per step, each thread REP of them: BB = 4 * num_warps * REP. BN rows are
unrolled in the thread and share the x loads. A split-K grid axis adds programs where a matrix has few rows (the FFN down
projection), summing its partial rows with atomics.
"""

from __future__ import annotations

import functools
import os
import re

import torch
import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from tpruntime.errors import TpError
from tpruntime.kernels.common import (interpreting, k4_header, launch_kw, masked_load, row_offsets, use_pdl,
                                      wait_inputs)
from tpruntime.qweight import Int8Request, QuantizedX

SUPPORTED = frozenset({Q.Q4_K})
X_DTYPES = (torch.bfloat16, torch.float16)  # the model dtypes that take this kernel (x may be f32 too)


@triton.jit
def quantize_store(x, g, m, xq_ptr, xd_ptr, xs_ptr):
    """Round x (float32 [G, 32]: the values of groups g, an int [G, 1] tile) to int8 per group of
    32 and store what the GEMV reads: xq int8 (group g at [32 g, 32 g + 32)), xd f32 [g] (xq * xd
    ~ x), xs f32 [2 g, 2 g + 1] (the sums of each half, unrounded); m ([G, 1] or None): the
    groups to store. Shared by the quantize kernel and the kernels that produce a GEMV's input
    (norms, activation, attention merge), which then spare the GEMV a launch."""
    G: tl.constexpr = x.shape[0]
    amax = tl.max(tl.abs(x), axis=1, keep_dims=True)
    # (a group below 1e-30 counts as zeros: 127 / amax would overflow to inf and 0 * inf is NaN)
    inv = tl.where(amax > 1e-30, 127.0 / amax, 0.0)
    v = x * inv
    q = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)  # to nearest, ties away from zero
    s = tl.sum(tl.reshape(x, [G, 2, 16]), axis=2)
    tl.store(xq_ptr + g * 32 + tl.arange(0, 32)[None, :], q.to(tl.int8), mask=m)
    tl.store(xd_ptr + g, amax / 127.0, mask=m)
    tl.store(xs_ptr + 2 * g + tl.arange(0, 2)[None, :], s, mask=m)


@triton.jit
def zero_share(y_ptr, part, share, n_zero, ZB: tl.constexpr):
    """Zero y[part * share, (part + 1) * share) (within [0, n_zero)) in ZB-wide stores: the part
    of the GEMV's split-K output that one program of the producing kernel clears (ZB 0: none)."""
    if ZB > 0:
        for z in range(0, share, ZB):
            i = z + tl.arange(0, ZB)
            tl.store(y_ptr + part * share + i, tl.zeros([ZB], tl.float32),
                     mask=(i < share) & (part * share + i < n_zero))


@triton.jit
def _quantize_x_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, n_groups, y_ptr, n_zero, share, BG: tl.constexpr,
                       MASK: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr):
    """x [K] -> xq, xd, xs (quantize_store); with ZB > 0 it also zeroes y [n_zero] (`share`
    values per program) for the split-K atomics, which saves the GEMV a memset launch."""
    wait_inputs(PDL)
    zero_share(y_ptr, tl.program_id(0), share, n_zero, ZB)
    g = tl.program_id(0) * BG + tl.arange(0, BG)[:, None]
    m = g < n_groups
    x = masked_load(x_ptr + g * 32 + tl.arange(0, 32)[None, :], m, MASK).to(tl.float32)
    quantize_store(x, g, m if MASK else None, xq_ptr, xd_ptr, xs_ptr)


@triton.jit
def _dp4a(a, b, ASM: tl.constexpr):
    """Per element: sum of the four products of a's unsigned bytes and b's signed bytes."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)
    s = ((a & 0xFF) * ((b << 24) >> 24) + ((a >> 8) & 0xFF) * ((b << 16) >> 24)
         + ((a >> 16) & 0xFF) * ((b << 8) >> 24) + ((a >> 24) & 0xFF) * (b >> 24))
    return s


@triton.jit
def _per_thread(t, bi):
    """t (offsets or a mask of one value per block, or per block and group) at the accumulators'
    shape [BB, 4, 2, 1], an element per thread, for the loads of the block headers and x scales.
    Loaded at their own shape and broadcast afterwards, Triton 3.6 (the GPU machines') laid them
    out as 140 scalar loads where this takes 40, and 4-block steps needed 127 registers instead
    of 96 (3.9: 95 instead of 80): 16 one-warp programs per SM instead of 21. H100 decode steps:
    qwen3-32b 7.99 -> 7.64 ms, qwen3-8b 2.29 -> 2.22 (docs/benchmarks.md, eighth session)."""
    return tl.broadcast_to(t, [bi.shape[0], 4, 2, 1])


@triton.jit
def _load_x(xw, xd_ptr, xs_ptr, k0, kb1, bi, gi, ci, wi, MASK: tl.constexpr):
    """What one K step reads of x: the int8 words of the low / high sub-block, the per-32
    scales and the per-16 sums."""
    kb = k0 + bi
    m = kb < kb1
    xo = kb * 64 + 16 * gi + 4 * ci + wi
    so = _per_thread(kb * 8 + 2 * gi, bi)
    xo16 = kb * 16 + 4 * gi + ci
    sm = _per_thread(m, bi)
    return (masked_load(xw + xo, m, MASK), masked_load(xw + (xo + 8), m, MASK),
            masked_load(xd_ptr + so, sm, MASK), masked_load(xd_ptr + (so + 1), sm, MASK),
            masked_load(xs_ptr + xo16, m, MASK), masked_load(xs_ptr + (xo16 + 2), m, MASK))


@triton.jit
def _load_w(w_ptr, rows, k0, kb1, bi, gi, ci, wi, BN: tl.constexpr, MASK: tl.constexpr):
    """What one K step reads of the weights: per row the block header words and this thread's
    16 quant bytes."""
    kb = k0 + bi
    m = kb < kb1
    hm = _per_thread(m, bi)
    out = ()
    for r in tl.static_range(BN):
        blk = _per_thread(rows[r] + kb * 144, bi)
        hp = (w_ptr + blk).to(tl.pointer_type(tl.int32))
        qp = (w_ptr + blk + 16 + 32 * gi + 16 * ci).to(tl.pointer_type(tl.int32)) + wi
        out = out + (masked_load(hp, hm, MASK), masked_load(hp + 1, hm, MASK), masked_load(hp + 2, hm, MASK),
                     masked_load(hp + 3, hm, MASK), masked_load(qp, m, MASK))
    return out


@triton.jit
def _q4k_kernel(xq_ptr, xd_ptr, xs_ptr, w_ptr, y_ptr, N, NB, row_bytes,
                BN: tl.constexpr, BB: tl.constexpr, SPLIT_K: tl.constexpr, MASK: tl.constexpr,
                I64: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    bi = tl.arange(0, BB)[:, None, None, None]
    gi = tl.arange(0, 4)[None, :, None, None]
    ci = tl.arange(0, 2)[None, None, :, None]
    wi = tl.arange(0, 4)[None, None, None, :]
    rows = row_offsets(pid, N, row_bytes, BN, I64)
    kb0 = 0
    kb1 = NB
    if SPLIT_K > 1:
        kb0 = tl.program_id(1) * NB // SPLIT_K
        kb1 = (tl.program_id(1) + 1) * NB // SPLIT_K
    xw = xq_ptr.to(tl.pointer_type(tl.int32))
    # Low 6 bits of byte (2 * (g % 2) + h) of a scale word: sub-block 2g + h's scale (min).
    sh = (gi % 2) * 16
    acc = ()
    for r in tl.static_range(BN):
        acc = acc + (tl.zeros([BB, 4, 2, 1], tl.float32),)
    # Software pipelining by hand: the loads of step k + 1 are issued before the math of step k,
    # so a warp keeps its next bytes in flight while it computes (Triton pipelines only loads
    # that feed tl.dot; these feed registers). The step past the end loads nothing (masked).
    # The first weights are in flight before the wait for x (a dependent launch: see use_pdl).
    w0 = _load_w(w_ptr, rows, kb0, kb1, bi, gi, ci, wi, BN, MASK)
    wait_inputs(PDL)
    cur = _load_x(xw, xd_ptr, xs_ptr, kb0, kb1, bi, gi, ci, wi, MASK) + w0
    for k0 in range(kb0, kb1, BB):
        nxt = (_load_x(xw, xd_ptr, xs_ptr, k0 + BB, kb1, bi, gi, ci, wi, True)
               + _load_w(w_ptr, rows, k0 + BB, kb1, bi, gi, ci, wi, BN, True))
        x_lo, x_hi, dx_lo, dx_hi, s_lo, s_hi = cur[0], cur[1], cur[2], cur[3], cur[4], cur[5]
        new = ()
        for r in tl.static_range(BN):
            h0, h1, h2, h3, qw = cur[6 + 5 * r], cur[7 + 5 * r], cur[8 + 5 * r], cur[9 + 5 * r], cur[10 + 5 * r]
            d, dmin, sc, mn = k4_header(h0, h1, h2, h3, gi)
            p_lo = tl.sum(_dp4a(qw & 0x0F0F0F0F, x_lo, ASM), axis=3, keep_dims=True).to(tl.float32)
            p_hi = tl.sum(_dp4a((qw >> 4) & 0x0F0F0F0F, x_hi, ASM), axis=3, keep_dims=True).to(tl.float32)
            a_lo = d * ((sc >> sh) & 63).to(tl.float32)
            a_hi = d * ((sc >> (sh + 8)) & 63).to(tl.float32)
            b_lo = dmin * ((mn >> sh) & 63).to(tl.float32)
            b_hi = dmin * ((mn >> (sh + 8)) & 63).to(tl.float32)
            new = new + (acc[r] + (a_lo * dx_lo * p_lo + a_hi * dx_hi * p_hi - b_lo * s_lo - b_hi * s_hi),)
        acc = new
        cur = nxt
    for r in tl.static_range(BN):
        n = pid * BN + r
        if n < N:
            out = tl.sum(tl.sum(tl.sum(tl.sum(acc[r], axis=3), axis=2), axis=1), axis=0)
            if SPLIT_K > 1:
                tl.atomic_add(y_ptr + n, out, sem="relaxed")
            else:
                tl.store(y_ptr + n, out)


# default_config's starting point: BN rows per program, warps, split of K, REP blocks per warp
# and step (BB = 4 * num_warps * REP), MAXNREG a register cap (0: the compiler's choice).
_DEFAULT = dict(BN=4, num_warps=1, SPLIT_K=1, REP=2, MAXNREG=0)


def parse_overrides(text: str) -> dict[str, dict[str, int]]:
    """TPRUNTIME_Q8_CONFIG, for A/B timing of whole decode steps: "NxK:KEY=V[,KEY=V][;...]"
    overrides default_config for the matrices of n_out N and k_in K ("*" for all), e.g.
    "10240x5120:MAXNREG=96;5120x25600:SPLIT_K=2". "" or "none": no overrides."""
    out: dict[str, dict[str, int]] = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        if item == "none":
            continue
        shape, sep, kvs = item.partition(":")
        try:
            if not sep or (shape != "*" and not re.fullmatch(r"\d+x\d+", shape)):
                raise ValueError
            out[shape] = {k.strip(): int(v) for k, v in (kv.split("=") for kv in kvs.split(","))}
        except ValueError:
            raise TpError(f"TPRUNTIME_Q8_CONFIG: {item!r} is not NxK:KEY=V[,KEY=V] (or *:KEY=V)") from None
        unknown = sorted(set(out[shape]) - set(_DEFAULT))
        if unknown:
            raise TpError(f"TPRUNTIME_Q8_CONFIG: unknown keys {unknown} in {item!r} (known: {', '.join(_DEFAULT)})")
    return out


CONFIG_OVERRIDES = parse_overrides(os.environ.get("TPRUNTIME_Q8_CONFIG", ""))


def default_config(qtype: Q, n_out: int, k_in: int) -> dict:
    """BN rows per program, warps (BB = 4 * REP blocks per warp), and a split of K that gives a
    matrix with few rows more programs. From an H200 sweep over the qwen3-8b / qwen3-32b decode
    shapes (scripts/bench_kernels.py --q8 --sweep): within 1-10% of the best per shape. A sweep's back-to-back launches hide
    a launch's tail behind the next one, which a decode step's small kernels in between do not:
    split-K for qwen3-32b's o and down projections ran 11-13% faster there and 3-6% slower in
    decode steps (H100; within +-0.4% once 4-block steps fit 21 programs per SM), so a change is
    kept only when whole steps (TPRUNTIME_Q8_CONFIG, scripts/device_bench.sh envab) agree."""
    nb = k_in // GGML_QUANT_SIZES[qtype][0]
    cfg = dict(_DEFAULT)
    if n_out <= 4096 and nb >= 16:
        cfg.update(SPLIT_K=2, REP=1)
    elif nb % 8 and nb < 64:
        # short rows that 8-block steps would end in a half-masked one (k_in 5120: 20 blocks):
        # 4-block steps, none masked (H200: qwen3-32b gate/up 48.7 -> 46.5 us, q/k/v 14.1 -> 13.7)
        cfg.update(REP=1)
    cfg.update(CONFIG_OVERRIDES.get("*", {}))
    cfg.update(CONFIG_OVERRIDES.get(f"{n_out}x{k_in}", {}))
    return cfg


@functools.lru_cache(maxsize=4096)
def _plan(qtype: Q, n_out: int, k_in: int, asm: bool, config: tuple) -> tuple:
    if qtype not in SUPPORTED:
        raise ValueError(f"qgemv_q8: {qtype.name} is not supported ({', '.join(t.name for t in SUPPORTED)})")
    block, ts = GGML_QUANT_SIZES[qtype]
    if k_in % block:
        raise ValueError(f"qgemv_q8: k_in {k_in} is not a multiple of the {qtype.name} block size {block}")
    cfg = default_config(qtype, n_out, k_in)
    if set(dict(config)) - set(cfg):
        raise ValueError(f"qgemv_q8: unknown config keys {sorted(set(dict(config)) - set(cfg))}")
    cfg.update(config)
    nb = k_in // block
    bb = 4 * cfg["num_warps"] * cfg["REP"]  # REP blocks per thread and step: loads in flight
    split = max(1, min(cfg["SPLIT_K"], nb))
    kw = dict(BN=cfg["BN"], BB=bb, SPLIT_K=split, MASK=split > 1 or nb % bb != 0,
              I64=n_out * nb * ts >= 2**31, ASM=asm, num_warps=cfg["num_warps"], num_stages=1)
    if cfg["MAXNREG"] and asm:  # (a compile option: the interpreter has none)
        kw["maxnreg"] = cfg["MAXNREG"]
    return (triton.cdiv(n_out, cfg["BN"]), split), nb, nb * ts, kw


def split_k(qtype, n_out: int, k_in: int) -> int:
    """The split of K the default configuration gives this matrix (> 1: its output is summed
    with atomics and must start zeroed)."""
    return _plan(Q(qtype), n_out, k_in, True, ())[0][1]


def zero_config(n_zero: int, programs: int) -> tuple[int, int]:
    """(share, ZB) for zero_share: values per program and store width, for n_zero values over
    `programs` programs (ZB 0: nothing to zero)."""
    if not n_zero:
        return 0, 0
    share = triton.cdiv(n_zero, programs)
    return share, min(1024, triton.next_power_of_2(share))


def producer_args(qx: QuantizedX | None, programs: int, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """What a kernel that produces a GEMV's input takes to also write it in the int8 form
    (quantize_store) and zero the GEMV's output over its `programs` programs (zero_share):
    (xq, xd, xs, y, n_zero, share) and the constexprs Q8, ZB; placeholders when qx is None."""
    if qx is None:
        return (dummy,) * 4 + (0, 0), dict(Q8=False, ZB=0)
    n_zero = 0 if qx.y is None else qx.y.numel()
    share, zb = zero_config(n_zero, programs)
    return (qx.xq, qx.xd, qx.xs, dummy if qx.y is None else qx.y, n_zero, share), dict(Q8=True, ZB=zb)


def new_quantized(x: torch.Tensor, request: Int8Request) -> QuantizedX:
    """Empty buffers for x [1, K] in the int8 form (filled by a producing kernel), with the
    request's output values for the consumer (to be zeroed by the same kernel)."""
    k = x.numel()
    dev = x.device
    return QuantizedX(x, torch.empty(k, dtype=torch.int8, device=dev),
                      torch.empty(k // 32, dtype=torch.float32, device=dev),
                      torch.empty(k // 16, dtype=torch.float32, device=dev),
                      torch.empty(request.n_zero, dtype=torch.float32, device=dev) if request.n_zero else None)


def quantize_x(x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] (K a multiple of 32) -> (int8 [K], f32 scales [K/32], f32 sums of 16 [K/16]);
    zeroes y (float32) on the way when given."""
    k = x.numel()
    n_groups = k // 32
    qx = new_quantized(x, Int8Request(0))
    bg = 16
    grid = triton.cdiv(n_groups, bg)
    n = 0 if y is None else y.numel()
    share, zb = zero_config(n, grid)
    pdl = use_pdl(x)
    _quantize_x_kernel[(grid,)](x, qx.xq, qx.xd, qx.xs, n_groups, qx.xd if y is None else y, n, share, BG=bg,
                                MASK=n_groups % bg != 0, ZB=zb, PDL=pdl, **launch_kw(pdl), num_warps=4)
    return qx.xq, qx.xd, qx.xs


def qgemv_q8(x: "torch.Tensor | QuantizedX", w_raw: torch.Tensor, qtype, n_out: int, k_in: int, *,
             config: dict | None = None) -> torch.Tensor:
    """One token x [k_in] or [1, k_in] (bf16/f16/f32) times the GGUF matrix w_raw (uint8 [n_out,
    row_bytes]) transposed: float32 [1, n_out] (or [n_out]). x may come already in the int8
    form (a QuantizedX from the kernel that produced it, see tpruntime/qweight.py)."""
    pre = x if isinstance(x, QuantizedX) else None
    if pre is not None:
        x = pre.x
    if x.shape[-1] != k_in or x.numel() != k_in:
        raise ValueError(f"qgemv_q8: x {tuple(x.shape)} is not one token of k_in = {k_in}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"qgemv_q8: x dtype {x.dtype} is not a float type")
    grid, nb, row_bytes, kw = _plan(Q(qtype), n_out, k_in, x.is_cuda and not interpreting(),
                                    tuple(sorted(config.items())) if config else ())
    if w_raw.dtype != torch.uint8 or w_raw.numel() != n_out * row_bytes:
        raise ValueError(f"qgemv_q8: w_raw must be uint8 with {n_out * row_bytes} bytes ({n_out} rows of {row_bytes})")
    if k_in == 0:  # nothing to sum (and nothing the kernel could load)
        return x.new_zeros(*x.shape[:-1], n_out, dtype=torch.float32)
    if pre is not None:
        if pre.xq.numel() != k_in:
            raise ValueError(f"qgemv_q8: the int8 x holds {pre.xq.numel()} values, not k_in = {k_in}")
        xq, xd, xs = pre.xq, pre.xd, pre.xs
        if grid[1] > 1 and pre.y is not None and pre.y.numel() == n_out:
            y = pre.y  # zeroed by the producer
        else:
            y = (torch.zeros if grid[1] > 1 else torch.empty)(n_out, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(n_out, dtype=torch.float32, device=x.device)
        # The quantize step zeroes y for split-K's atomics, unless that would give its programs
        # huge tiles (a forced split of a matrix with many rows and few columns): then a memset.
        zero_in_quantize = grid[1] > 1 and n_out <= 4096 * triton.cdiv(k_in // 32, 16)
        if grid[1] > 1 and not zero_in_quantize:
            y.zero_()
        xq, xd, xs = quantize_x(x.reshape(k_in).contiguous(), y if zero_in_quantize else None)
    if n_out:
        pdl = use_pdl(x)
        _q4k_kernel[grid](xq, xd, xs, w_raw, y, n_out, nb, row_bytes, PDL=pdl, **launch_kw(pdl), **kw)
    return y.reshape(*x.shape[:-1], n_out)


__all__ = ["SUPPORTED", "X_DTYPES", "qgemv_q8", "quantize_x", "default_config", "quantize_store", "zero_share",
           "zero_config", "producer_args", "new_quantized", "split_k"]
