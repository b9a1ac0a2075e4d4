"""GGUF quant blocks to bf16 / f16 / f32 matrices (Triton), for the prefill matmuls.

    out[n, k] = dequantize(W)[n, k]

`w_raw` is uint8 [n_out, row_bytes] in the file layout (tpruntime.quants describes the blocks).
Prefill dequantizes one weight (or a slice of one) into a reused scratch buffer right before its
cuBLAS matmul, so this is a pure streaming kernel: quant bytes in, 2 (or 4) bytes per value out,
the writes being ~80% of the traffic. The design is for bandwidth:
- rows are whole blocks and both tensors are contiguous, so the matrix is one flat run of blocks:
  a program takes BB consecutive blocks (4096 values by default) and its stores cover one
  contiguous span of the output;
- a thread owns V consecutive values (one 16-byte store) of each of the two value runs that
  one run of quant bytes feeds (low and high nibbles; Q6_K's qh bit pairs), so every quant byte
  is loaded once, and a warp's stores write whole 32-byte sectors;
- the tile is 2-D so that the loads, the math and the stores get one register layout, compiled
  by Triton 3.6 as by 3.9 (see _kernel): no shared memory, no barriers;
- a quant becomes a float by writing it into the mantissa of 2^23 and subtracting (an OR and
  an FADD) instead of an I2F per value.
Compiled for sm_90 (Triton 3.6 and 3.9, bf16 out) that is, per thread and 32 values: 4 STG.128,
LDG.64 quant loads for Q4_K/Q5_K (16-byte aligned blocks) and LDG.U16 for the others (2-byte
aligned blocks), 7-14 instructions per value. Not yet timed on a GPU: scripts/bench_kernels.py
--dequant [--sweep].

Bit-exact with tpruntime.quants.dequantize(...).to(dtype) (itself bit-identical to gguf's numpy
reference): the same f32 operations in the same order. Compiled, the contraction of Q4_K/Q5_K's
`q * (d * sc) - dmin * m` into an FMA cannot change a bit either: d is an f16 (11 significant
bits), sc < 64 and q < 32, so q * (d * sc) is exact in f32 and only the subtraction rounds, with
or without the FMA. Every other type's value is a single exact product (Q6_K: 6 x 8 x 11 bits).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from tpruntime.kernels import QUANT_KERNEL_TYPES
from tpruntime.kernels.common import interpreting, masked_load
from tpruntime.quants import dequantize

SUPPORTED = QUANT_KERNEL_TYPES
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _st(ptr, val, mask, MASK: tl.constexpr):
    if MASK:
        tl.store(ptr, val, mask=mask)
    else:
        tl.store(ptr, val)


@triton.jit
def _q_float(q, OFFSET: tl.constexpr):
    """q - OFFSET as f32, exact, for int32 q in [0, 2^23): 2^23 + q is a float with q in its
    mantissa, and subtracting 2^23 + OFFSET (also exact) rounds nothing."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _f16(ptr, mask, MASK: tl.constexpr):
    return masked_load(ptr.to(tl.pointer_type(tl.float16)), mask, MASK).to(tl.float32)


@triton.jit
def _u16(ptr, mask, MASK: tl.constexpr):
    # 16 bits at an even byte offset, zero-extended
    return masked_load(ptr.to(tl.pointer_type(tl.uint16)), mask, MASK).to(tl.int32)


@triton.jit
def _scale_min_k4(w_d, w_m, w_md, g, HI: tl.constexpr):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block s = 2g + HI. The 12 scale bytes are three
    runs of 4 (d, m, md); sub-blocks s and s + 4 both use byte s % 4 of each run, so the pair
    (2g, 2g + 1) is one 16-bit word per run (w_*, read at 2 * (g % 2))."""
    b_d = (w_d >> (8 * HI)) & 0xFF
    b_m = (w_m >> (8 * HI)) & 0xFF
    b_md = (w_md >> (8 * HI)) & 0xFF
    sc = tl.where(g < 2, b_d & 63, (b_md & 15) | ((b_d >> 2) & 48))
    mn = tl.where(g < 2, b_m & 63, (b_md >> 4) | ((b_m >> 2) & 48))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _out(val, RNE_BF16: tl.constexpr, dtype: tl.constexpr):
    if RNE_BF16:
        # f32 -> bf16 to nearest even, NaN -> 0x7FC0, as torch does it on the CPU; only for the
        # interpreter, whose own f32 -> bf16 cast truncates (compiled code uses cvt.rn)
        b = val.to(tl.int32, bitcast=True)
        r = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
        r = tl.where(val != val, 0x7FC0, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return val.to(dtype)


@triton.jit
def _kernel(w_ptr, out_ptr, n_blocks,
            QT: tl.constexpr, TS: tl.constexpr, QK: tl.constexpr, V: tl.constexpr, BB: tl.constexpr,
            MASK: tl.constexpr, I64: tl.constexpr, RNE_BF16: tl.constexpr):
    # The tile is 2-D, [N, V]: row n is chunk r = n % R of block n // R, V consecutive values of
    # the block's first ("lo") half-pattern; the "hi" values that the same quant bytes give
    # (high nibbles, Q6_K's upper qh pairs) are a second tile of the same shape, stored at a
    # fixed distance. With two axes only one layout makes sense for Triton's coalescing (V in
    # the thread, lanes and warps over rows; Triton 3.6 and 3.9 order tied axes differently,
    # so more axes would not be portable): the store, the quant loads (same shape and order,
    # hence vectorized alike even where the blocks are only 2-byte aligned) and the [N, 1]
    # per-chunk fields (the same thread owns the same rows) need no shared-memory conversion.
    R: tl.constexpr = QK // 2 // V
    N: tl.constexpr = BB * R
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    n = tl.arange(0, N)[:, None]
    ki = tl.arange(0, V)[None, :]
    ri = n % R
    blk = pid * BB + n // R
    m = blk < n_blocks
    src = w_ptr + blk * TS
    dst = out_ptr + blk * QK + ki
    dt: tl.constexpr = out_ptr.dtype.element_ty

    if QT == 12 or QT == 13:
        # Q4_K 144 B: d, dmin f16 | 12 B scales | qs 128 B. Q5_K 176 B: the same, qh 32 B before
        # qs. Value 64g + 32h + j (sub-block s = 2g + h) is nibble h of qs[32g + j], plus
        # (Q5_K) 16 * bit s of qh[j]; it is q * (d * sc[s]) - dmin * mn[s].
        C: tl.constexpr = 32 // V
        g = ri // C
        j0 = V * (ri % C)
        QS: tl.constexpr = 48 if QT == 13 else 16
        qs = masked_load(src + (QS + 32 * g + j0) + ki, m, MASK).to(tl.int32)
        q_lo = qs & 15
        q_hi = qs >> 4
        if QT == 13:
            qh = masked_load(src + (16 + j0) + ki, m, MASK).to(tl.int32) >> (2 * g)
            q_lo = q_lo | ((qh & 1) << 4)
            q_hi = q_hi | ((qh & 2) << 3)
        w_d = _u16(src + (4 + 2 * (g % 2)), m, MASK)
        w_m = _u16(src + (8 + 2 * (g % 2)), m, MASK)
        w_md = _u16(src + (12 + 2 * (g % 2)), m, MASK)
        sc_lo, mn_lo = _scale_min_k4(w_d, w_m, w_md, g, 0)
        sc_hi, mn_hi = _scale_min_k4(w_d, w_m, w_md, g, 1)
        d = _f16(src, m, MASK)
        dmin = _f16(src + 2, m, MASK)
        lo = _q_float(q_lo, 0) * (d * sc_lo) - dmin * mn_lo
        hi = _q_float(q_hi, 0) * (d * sc_hi) - dmin * mn_hi
        e_lo = 64 * g + j0
        HALF: tl.constexpr = 32
    elif QT == 14:
        # Q6_K 210 B: ql 128 | qh 64 | 16 int8 scales | d f16. Value 128a + 64h + i (i < 64) is
        # nibble h of ql[64a + i] | bits 2(2h + i // 32) of qh[32a + i % 32] << 4, minus 32,
        # times d * scales[(128a + 64h + i) // 16].
        # (i0 = V * c: the offsets are written from c so that Triton sees them as multiples of V)
        C: tl.constexpr = 64 // V
        a = ri // C
        c = ri % C
        ql = masked_load(src + (64 * a + V * c) + ki, m, MASK).to(tl.int32)
        qh = masked_load(src + (128 + 32 * a + V * (c % (32 // V))) + ki, m, MASK).to(tl.int32)
        qh = qh >> (2 * (c // (32 // V)))
        q_lo = (ql & 15) | ((qh & 3) << 4)
        q_hi = (ql >> 4) | (qh & 0x30)
        scp = (src + (192 + 8 * a + c // (16 // V))).to(tl.pointer_type(tl.int8))
        d = _f16(src + 208, m, MASK)
        lo = _q_float(q_lo, 32) * (d * masked_load(scp, m, MASK).to(tl.float32))
        hi = _q_float(q_hi, 32) * (d * masked_load(scp + 4, m, MASK).to(tl.float32))
        e_lo = 128 * a + V * c
        HALF: tl.constexpr = 64
    elif QT == 8:
        # Q8_0 34 B: d f16 | 32 int8, as halves of 16. b ^ 0x80 = q + 128.
        j0 = V * ri
        d = _f16(src, m, MASK)
        lo = _q_float(masked_load(src + (2 + j0) + ki, m, MASK).to(tl.int32) ^ 0x80, 128) * d
        hi = _q_float(masked_load(src + (18 + j0) + ki, m, MASK).to(tl.int32) ^ 0x80, 128) * d
        e_lo = j0
        HALF: tl.constexpr = 16
    else:
        # Q4_0 18 B: d f16 | qs 16 B. Q5_0 22 B: d | qh 4 B | qs. Value 16h + j is nibble h of
        # qs[j], plus (Q5_0) 16 * bit 16h + j of the little-endian qh word; minus 8 (16), times d.
        j0 = V * ri
        QS: tl.constexpr = 6 if QT == 6 else 2
        qs = masked_load(src + (QS + j0) + ki, m, MASK).to(tl.int32)
        q_lo = qs & 15
        q_hi = qs >> 4
        d = _f16(src, m, MASK)
        if QT == 6:
            q_lo = q_lo | (((_u16(src + 2, m, MASK) >> (j0 + ki)) & 1) << 4)
            q_hi = q_hi | (((_u16(src + 4, m, MASK) >> (j0 + ki)) & 1) << 4)
            lo = _q_float(q_lo, 16) * d
            hi = _q_float(q_hi, 16) * d
        else:
            lo = _q_float(q_lo, 8) * d
            hi = _q_float(q_hi, 8) * d
        e_lo = j0
        HALF: tl.constexpr = 16

    _st(dst + e_lo, _out(lo, RNE_BF16, dt), m, MASK)
    _st(dst + (e_lo + HALF), _out(hi, RNE_BF16, dt), m, MASK)


def default_config(qtype: Q, dtype: torch.dtype) -> dict:
    """BB blocks per program (4096 values: enough bytes per program that its index math and
    scale decode are noise, still tens of thousands of programs per weight), 4 warps, V values
    per thread = one 16-byte store. Not yet tuned on a GPU (scripts/bench_kernels.py --dequant
    --sweep times the alternatives)."""
    return dict(BB=4096 // GGML_QUANT_SIZES[qtype][0], num_warps=4, V=16 // dtype.itemsize)


@functools.lru_cache(maxsize=4096)
def _plan(qtype: Q, n_out: int, k_in: int, dtype: torch.dtype, interp: bool, config: tuple) -> tuple:
    """(grid, n_blocks, row_bytes, kernel keywords) for a call signature; cached because prefill
    calls every weight with the same signature every step."""
    if qtype not in SUPPORTED:
        raise ValueError(f"dequantize_rows: {qtype.name} is not supported "
                         f"({', '.join(t.name for t in sorted(SUPPORTED, key=int))})")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_rows: output dtype {dtype} is not one of {OUT_DTYPES}")
    qk, ts = GGML_QUANT_SIZES[qtype]
    if k_in % qk:
        raise ValueError(f"dequantize_rows: k_in {k_in} is not a multiple of the {qtype.name} block size {qk}")
    cfg = default_config(qtype, dtype)
    if set(dict(config)) - set(cfg):
        raise ValueError(f"dequantize_rows: unknown config keys {sorted(set(dict(config)) - set(cfg))}")
    cfg.update(config)
    bb, v = cfg["BB"], cfg["V"]
    if bb < 1 or bb & (bb - 1) or v not in (2, 4, 8, 16):
        raise ValueError(f"dequantize_rows: BB must be a power of 2 and V one of 2, 4, 8, 16 ({cfg})")
    # A thread owns V values of both halves: more warps than BB * R / 32 would only repeat work.
    nw = max(1, min(cfg["num_warps"], bb * (qk // 2 // v) // 32))
    nb = k_in // qk
    n_blocks = n_out * nb
    kw = dict(QT=int(qtype), TS=ts, QK=qk, V=v, BB=bb, MASK=n_blocks % bb != 0,
              I64=max(n_blocks * qk, n_blocks * ts) + bb * qk >= 2**31,
              RNE_BF16=interp and dtype == torch.bfloat16, num_warps=nw, num_stages=1)
    return (triton.cdiv(n_blocks, bb),), n_blocks, nb * ts, kw


def dequantize_rows(w_raw: torch.Tensor, qtype, n_out: int, k_in: int, *, dtype: torch.dtype = torch.bfloat16,
                    out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """w_raw: uint8 [n_out, row_bytes], GGUF rows of k_in values each (a row slice of a larger
    matrix is fine; other non-contiguous views are copied first). Returns `dtype` [n_out, k_in],
    equal to tpruntime.quants.dequantize(...).to(dtype). With `out` (contiguous, at least
    n_out * k_in elements of `dtype`) the values go into its first n_out * k_in elements, viewed
    as [n_out, k_in] and returned. No host syncs: capturable in a CUDA graph. `config` overrides
    default_config (tuning)."""
    qtype = Q(qtype)
    n_out, k_in = int(n_out), int(k_in)
    grid, n_blocks, row_bytes, kw = _plan(qtype, n_out, k_in, dtype, interpreting(),
                                          tuple(sorted(config.items())) if config else ())
    if w_raw.dtype != torch.uint8 or w_raw.numel() != n_out * row_bytes:
        raise ValueError(f"dequantize_rows: w_raw must be uint8 with {n_out * row_bytes} bytes "
                         f"({n_out} rows of {row_bytes}), got {w_raw.dtype} with {w_raw.numel()}")
    n = n_out * k_in
    if out is None:
        res = torch.empty((n_out, k_in), dtype=dtype, device=w_raw.device)
    else:
        if out.dtype != dtype or out.device != w_raw.device or not out.is_contiguous() or out.numel() < n:
            raise ValueError(f"dequantize_rows: out must be a contiguous {dtype} tensor on {w_raw.device} "
                             f"with at least {n} elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
        res = out.view(-1)[:n].view(n_out, k_in)
    if n == 0:
        return res
    if not w_raw.is_cuda and not interpreting():
        # A CPU tensor outside the interpreter: the torch reference gives the same values.
        res.copy_(dequantize(w_raw.reshape(-1), qtype, (n_out, k_in)))
        return res
    # Contiguous rows are one flat run of blocks; the f16 and 16-bit fields are read as such,
    # which needs an even address (a row slice always has one: all row sizes are even).
    if not w_raw.is_contiguous() or w_raw.data_ptr() % 2:
        w_raw = w_raw.contiguous() if not w_raw.is_contiguous() else w_raw.clone()
    _kernel[grid](w_raw, res, n_blocks, **kw)
    return res


__all__ = ["SUPPORTED", "OUT_DTYPES", "dequantize_rows", "default_config"]
