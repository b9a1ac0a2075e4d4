"""Decode matrix-vector products straight from GGUF quant blocks (Triton).

    y[t, n] = sum_k x[t, k] * W[n, k]

W stays in its file layout: `w_raw` is uint8 [n_out, row_bytes], each row k_in / block_size
blocks of the type's bytes (layouts as in tpruntime.quants). x is f32, bf16 or f16 [..., k_in];
the result is always float32 [..., n_out]: accumulation is f32 and the caller picks the cast, so
a bf16 model pays no extra rounding before its residual add.

At 1..8 tokens the weight bytes are the whole memory traffic, and on an H100 a byte leaves time
for only ~10 instructions of its decode, so the design counts instructions:
- a program owns BN output rows and streams over K, BB blocks per step. Rows and tokens are
  unrolled loops, not tensor axes, so every weight tile and x tile has one shape and Triton
  gives them one register layout: no shared-memory layout conversion, x loaded once per step
  and reused by all BN rows in registers, and nothing crosses threads until after the K loop;
- no convert per weight: a quant is written into a float's mantissa (one PRMT, see below) and
  the affine map (scales, mins, offsets) is applied per sub-block through sum(x);
- the products are summed as one FMA chain (CHAIN), not tl.sum's tree of FMUL/FFMA/FADD.
Tail rows are clamped (only the store is masked); blocks past a row end are masked only when BB
does not divide the row. Speed: scripts/bench_kernels.py (H100: 36-77% of 3.35 TB/s at T=1).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from tpruntime.kernels import QUANT_KERNEL_TYPES
from tpruntime.kernels.common import (interpreting, k4_header, launch_kw, masked_load, row_offsets, use_pdl,
                                      wait_inputs)
from tpruntime.quants import dequantize

SUPPORTED = QUANT_KERNEL_TYPES
MAX_T = 8  # tokens per launch; more are done in slices of 8 (prefill wants a real matmul)


# --- quants to floats ----------------------------------------------------------------------
# A b-bit quant q (b <= 6) placed at bits 23-b..22 of the word 0x40000000 (the top of byte 2)
# is the float F = 2 + q / 2^(b-1) (4-bit: 2 + q/8). The decoders return F and fold the affine
# map into per-sub-block factors, sum(w * x) = a * sum(F * x) - b * sum(x), with sum(x) shared by
# all rows. The rounding of F * x (2^-24 of ~4|x|) against the q term (q|x| / 2^(b-1)) costs
# ~1e-7 relative. One PRMT per quant builds F from four packed bytes (inline PTX, pack=4, where
# I2F would run at a quarter rate); the interpreter (CPU tests) makes the same bits with integer
# ops. Q8_0's 8 bits do not fit below the exponent: F = 2^23 + 128 + q, exact after one FADD.

_PRMT4 = ("mov.b32 m, 0x40000000; prmt.b32 $0, t, m, 0x7054; prmt.b32 $1, t, m, 0x7154; "
          "prmt.b32 $2, t, m, 0x7254; prmt.b32 $3, t, m, 0x7354; }")


def _asm(body: str, prmt: str = _PRMT4) -> tl.constexpr:
    return tl.constexpr("{ .reg .b32 t, h, m, s; " + body + " " + prmt)


# $4 = 4 packed quant bytes, $5 = 4 packed high-bit bytes (or the Q5_0 word), $6.. = shift
_ASM_Q4_LO = _asm("shl.b32 t, $4, 3; and.b32 t, t, 0x78787878;")
_ASM_Q4_HI = _asm("shr.b32 t, $4, 1; and.b32 t, t, 0x78787878;")
_ASM_Q5K_LO = _asm("shl.b32 t, $4, 2; and.b32 t, t, 0x3C3C3C3C; shr.b32 h, $5, $6; "
                   "and.b32 h, h, 0x01010101; shl.b32 h, h, 6; or.b32 t, t, h;")
_ASM_Q5K_HI = _asm("shr.b32 t, $4, 2; and.b32 t, t, 0x3C3C3C3C; shr.b32 h, $5, $6; "
                   "and.b32 h, h, 0x02020202; shl.b32 h, h, 5; or.b32 t, t, h;")
_ASM_Q6K_LO = _asm("shl.b32 t, $4, 1; and.b32 t, t, 0x1E1E1E1E; shr.b32 h, $5, $6; "
                   "and.b32 h, h, 0x03030303; shl.b32 h, h, 5; or.b32 t, t, h;")
_ASM_Q6K_HI = _asm("shr.b32 t, $4, 3; and.b32 t, t, 0x1E1E1E1E; shr.b32 h, $5, $6; "
                   "and.b32 h, h, 0x30303030; shl.b32 h, h, 1; or.b32 t, t, h;")
# Q5_0: bits j0..j0+3 of the 32-bit qh word ($5, $9 = j0) spread to bit 6 of each byte.
_ASM_Q50_LO = _asm("shl.b32 t, $4, 2; and.b32 t, t, 0x3C3C3C3C; shr.b32 h, $5, $9; and.b32 h, h, 15; "
                   "mul.lo.u32 h, h, 0x204081; and.b32 h, h, 0x01010101; shl.b32 h, h, 6; or.b32 t, t, h;")
_ASM_Q50_HI = _asm("shr.b32 t, $4, 2; and.b32 t, t, 0x3C3C3C3C; add.u32 s, $9, 16; shr.b32 h, $5, s; "
                   "and.b32 h, h, 15; mul.lo.u32 h, h, 0x204081; and.b32 h, h, 0x01010101; shl.b32 h, h, 6; "
                   "or.b32 t, t, h;")
# Q8_0: (b ^ 0x80) = q + 128 as the low byte of 2^23.
_ASM_Q8 = _asm("xor.b32 t, $4, 0x80808080;",
               "mov.b32 m, 0x4B000000; prmt.b32 $0, t, m, 0x7650; prmt.b32 $1, t, m, 0x7651; "
               "prmt.b32 $2, t, m, 0x7652; prmt.b32 $3, t, m, 0x7653; }")
_C1 = tl.constexpr("=r,=r,=r,=r,r")
_C3 = tl.constexpr("=r,=r,=r,=r,r,r,r,r,r,r")
_C50 = tl.constexpr("=r,=r,=r,=r,r,r,r,r,r,r,r,r,r")


@triton.jit
def _f_bits(v, BITS: tl.constexpr):
    # v: int32 quant in [0, 2^BITS), BITS <= 7: the float 2 + v / 2^(BITS - 1)
    return (0x40000000 | (v << (23 - BITS))).to(tl.float32, bitcast=True)


@triton.jit
def _f16(ptr, mask, MASK: tl.constexpr):
    return masked_load(ptr.to(tl.pointer_type(tl.float16)), mask, MASK).to(tl.float32)


# Decoders. Tiles are 4-D: BB blocks, G groups of J = C * V values in each half block, V values
# per thread (one vector load); the kernel's ORD orders the first three axes.
# `blk` is the byte offset of one row's blocks (broadcast along the block axis), `gi` the group
# index, `jj` = V * c + v the index within a group, `m` the block mask. They return F for the
# low and high half tiles and the factors a_lo, a_hi, b_lo, b_hi per (block, group).

@triton.jit
def _nibbles(q, ASM: tl.constexpr):
    """Low and high nibble of every byte of q as floats (the 4-bit types' plain case)."""
    if ASM:
        fl = tl.inline_asm_elementwise(_ASM_Q4_LO, _C1, [q], tl.float32, True, 4)
        fh = tl.inline_asm_elementwise(_ASM_Q4_HI, _C1, [q], tl.float32, True, 4)
    else:
        fl = _f_bits(q.to(tl.int32) & 15, 4)
        fh = _f_bits(q.to(tl.int32) >> 4, 4)
    return fl, fh


@triton.jit
def _dec_q45_k(w_ptr, blk, gi, jj, m, MASK: tl.constexpr, ASM: tl.constexpr, Q5: tl.constexpr):
    # Q4_K 144 B: d, dmin f16 | 12 B of 6-bit scales and mins | qs 128 B. Q5_K 176 B: the same
    # with qh 32 B before qs. Value 64g + 32h + j (sub-block 2g + h) is nibble h of qs[32g + j]
    # (Q5_K: plus 16 * bit 2g+h of qh[j]); weight = d*sc*q - dmin*mn.
    hp = (w_ptr + blk).to(tl.pointer_type(tl.int32))
    h0 = masked_load(hp, m, MASK)
    h1 = masked_load(hp + 1, m, MASK)
    h2 = masked_load(hp + 2, m, MASK)
    h3 = masked_load(hp + 3, m, MASK)
    d, dmin, sc, mn = k4_header(h0, h1, h2, h3, gi)
    sh = (gi % 2) * 16
    QS: tl.constexpr = 48 if Q5 else 16
    q = masked_load(w_ptr + blk + (QS + 32 * gi + jj), m, MASK)
    if Q5:
        # read once per g (from L1) so that the tile has the qs tile's shape, hence its layout
        qh = masked_load(w_ptr + blk + (16 + 0 * gi + jj), m, MASK)
        if ASM:
            s = tl.broadcast_to(2 * gi, q.shape)
            fl = tl.inline_asm_elementwise(_ASM_Q5K_LO, _C3, [q, qh, s], tl.float32, True, 4)
            fh = tl.inline_asm_elementwise(_ASM_Q5K_HI, _C3, [q, qh, s], tl.float32, True, 4)
        else:
            qi = q.to(tl.int32)
            hb = qh.to(tl.int32) >> (2 * gi)
            fl = _f_bits((qi & 15) | ((hb & 1) << 4), 5)
            fh = _f_bits((qi >> 4) | ((hb & 2) << 3), 5)
        A: tl.constexpr = 16.0
    else:
        fl, fh = _nibbles(q, ASM)
        A: tl.constexpr = 8.0
    a_lo = (A * d) * ((sc >> sh) & 63).to(tl.float32)
    a_hi = (A * d) * ((sc >> (sh + 8)) & 63).to(tl.float32)
    return (fl, fh, a_lo, a_hi, 2.0 * a_lo + dmin * ((mn >> sh) & 63).to(tl.float32),
            2.0 * a_hi + dmin * ((mn >> (sh + 8)) & 63).to(tl.float32))


@triton.jit
def _dec_q6_k(w_ptr, blk, gi, jj, m, MASK: tl.constexpr, ASM: tl.constexpr):
    # 210 B: ql 128 | qh 64 | 16 int8 scales | d f16. Value 128a + 64h + 32c + 16e + i is nibble
    # h of ql[64a + 32c + 16e + i] | (bits 2(2h + c) of qh[32a + 16e + i]) << 4, minus 32. The
    # groups are u = 4a + 2c + e (ql contiguous); the sub-block of 16 is u + 4 * (u // 4) + 4h.
    ql = masked_load(w_ptr + blk + (16 * gi + jj), m, MASK)
    qh = masked_load(w_ptr + blk + (128 + 32 * (gi // 4) + 16 * (gi % 2) + jj), m, MASK)
    c2 = 2 * ((gi // 2) % 2)
    if ASM:
        s = tl.broadcast_to(c2, ql.shape)
        fl = tl.inline_asm_elementwise(_ASM_Q6K_LO, _C3, [ql, qh, s], tl.float32, True, 4)
        fh = tl.inline_asm_elementwise(_ASM_Q6K_HI, _C3, [ql, qh, s], tl.float32, True, 4)
    else:
        qli = ql.to(tl.int32)
        qhi = qh.to(tl.int32) >> c2
        fl = _f_bits((qli & 15) | ((qhi & 3) << 4), 6)
        fh = _f_bits((qli >> 4) | (qhi & 0x30), 6)
    scp = (w_ptr + blk + (192 + gi + 4 * (gi // 4))).to(tl.pointer_type(tl.int8))
    d = 32.0 * _f16(w_ptr + blk + 208, m, MASK)
    a_lo = d * masked_load(scp, m, MASK).to(tl.float32)
    a_hi = d * masked_load(scp + 4, m, MASK).to(tl.float32)
    return fl, fh, a_lo, a_hi, 3.0 * a_lo, 3.0 * a_hi


@triton.jit
def _dec_q8_0(w_ptr, blk, gi, jj, m, MASK: tl.constexpr, ASM: tl.constexpr):
    # 34 B: d f16 | 32 int8, as halves of 16.
    lo = masked_load(w_ptr + blk + (2 + jj), m, MASK)
    hi = masked_load(w_ptr + blk + (18 + jj), m, MASK)
    if ASM:
        fl = tl.inline_asm_elementwise(_ASM_Q8, _C1, [lo], tl.float32, True, 4) - 8388736.0
        fh = tl.inline_asm_elementwise(_ASM_Q8, _C1, [hi], tl.float32, True, 4) - 8388736.0
    else:
        fl = lo.to(tl.int8, bitcast=True).to(tl.float32)
        fh = hi.to(tl.int8, bitcast=True).to(tl.float32)
    d = _f16(w_ptr + blk, m, MASK)
    return fl, fh, d, d, d, d


@triton.jit
def _dec_q45_0(w_ptr, blk, gi, jj, m, MASK: tl.constexpr, ASM: tl.constexpr, Q5: tl.constexpr):
    # Q4_0 18 B: d f16 | qs 16 B. Q5_0 22 B: d | qh u32 | qs. Value j < 16 is the low nibble of
    # qs[j], 16 + j the high one; Q5_0 adds 16 * bit j (16 + j) of qh; minus 8 (16).
    QS: tl.constexpr = 6 if Q5 else 2
    q = masked_load(w_ptr + blk + (QS + jj), m, MASK)
    if Q5:
        hp = (w_ptr + blk + 2).to(tl.pointer_type(tl.int16))
        qh = tl.broadcast_to((masked_load(hp, m, MASK).to(tl.int32) & 0xFFFF)
                             | (masked_load(hp + 1, m, MASK).to(tl.int32) << 16), q.shape)
        if ASM:
            j = tl.broadcast_to(jj, q.shape)
            fl = tl.inline_asm_elementwise(_ASM_Q50_LO, _C50, [q, qh, j], tl.float32, True, 4)
            fh = tl.inline_asm_elementwise(_ASM_Q50_HI, _C50, [q, qh, j], tl.float32, True, 4)
        else:
            qi = q.to(tl.int32)
            fl = _f_bits((qi & 15) | (((qh >> jj) & 1) << 4), 5)
            fh = _f_bits((qi >> 4) | (((qh >> (jj + 16)) & 1) << 4), 5)
        A: tl.constexpr = 16.0
    else:
        fl, fh = _nibbles(q, ASM)
        A: tl.constexpr = 8.0
    a = A * _f16(w_ptr + blk, m, MASK)
    return fl, fh, a, a, 3.0 * a, 3.0 * a


@triton.jit
def decode(w_ptr, blk, gi, jj, m, MASK: tl.constexpr, ASM: tl.constexpr, QT: tl.constexpr):
    """The decoder of GGML type QT (its integer value), as (fl, fh, a_lo, a_hi, b_lo, b_hi)."""
    if QT == 12:
        fl, fh, a_lo, a_hi, b_lo, b_hi = _dec_q45_k(w_ptr, blk, gi, jj, m, MASK, ASM, False)
    elif QT == 13:
        fl, fh, a_lo, a_hi, b_lo, b_hi = _dec_q45_k(w_ptr, blk, gi, jj, m, MASK, ASM, True)
    elif QT == 14:
        fl, fh, a_lo, a_hi, b_lo, b_hi = _dec_q6_k(w_ptr, blk, gi, jj, m, MASK, ASM)
    elif QT == 8:
        fl, fh, a_lo, a_hi, b_lo, b_hi = _dec_q8_0(w_ptr, blk, gi, jj, m, MASK, ASM)
    elif QT == 2:
        fl, fh, a_lo, a_hi, b_lo, b_hi = _dec_q45_0(w_ptr, blk, gi, jj, m, MASK, ASM, False)
    else:
        fl, fh, a_lo, a_hi, b_lo, b_hi = _dec_q45_0(w_ptr, blk, gi, jj, m, MASK, ASM, True)
    return fl, fh, a_lo, a_hi, b_lo, b_hi


@triton.jit
def _x_offsets(kb, gi, jj, QT: tl.constexpr):
    """x index of the low-half values of a tile, and the distance to the high half."""
    if QT == 12 or QT == 13:
        return kb * 256 + 64 * gi + jj, 32
    elif QT == 14:
        return kb * 256 + 16 * (gi + 4 * (gi // 4)) + jj, 64
    else:
        return kb * 32 + jj, 16


@triton.jit
def _leaves(t, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, V: tl.constexpr, LV: tl.constexpr):
    # The V in-thread values of the last axis as V tensors [D0, D1, D2, 1] (register moves only).
    out = (t,)
    for lvl in tl.static_range(LV):
        new = ()
        for i in tl.static_range(1 << lvl):
            a, b = tl.split(tl.reshape(out[i], [D0, D1, D2, V >> (lvl + 1), 2]))
            new = new + (a, b)
        out = new
    return out


@triton.jit
def _dot(f, xs, t: tl.constexpr, CHAIN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
         D2: tl.constexpr, V: tl.constexpr, LV: tl.constexpr):
    """sum(f * x) over the last axis (kept). tl.sum of products can compile to a tree (V/2 FMUL,
    V/2 FFMA, V/2 - 1 FADD: seen for Q8_0); CHAIN is one FMUL and V - 1 FFMA, on x split up once
    per step (token t's values are xs[t * V:(t + 1) * V]); else xs[t] is token t's x tile."""
    if CHAIN:
        fs = _leaves(f, D0, D1, D2, V, LV)
        acc = fs[0] * xs[t * V]
        for i in tl.static_range(1, V):
            acc = acc + fs[i] * xs[t * V + i]
        return acc
    else:
        return tl.sum(f * xs[t], axis=3, keep_dims=True)


@triton.jit
def _tuple_add(acc, k: tl.constexpr, p, R: tl.constexpr):
    new = ()
    for i in tl.static_range(R):
        if i == k:
            new = new + (acc[i] + p,)
        else:
            new = new + (acc[i],)
    return new


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, y_ptr, T, N, NB, row_bytes, stride_x, n_iter,
                  QT: tl.constexpr, TS: tl.constexpr, G: tl.constexpr, J: tl.constexpr,
                  V: tl.constexpr, ORD: tl.constexpr, T_PAD: tl.constexpr, TG: tl.constexpr,
                  BN: tl.constexpr, BB: tl.constexpr, SPLIT_K: tl.constexpr, MASK: tl.constexpr,
                  I64: tl.constexpr, ASM: tl.constexpr, CHAIN: tl.constexpr, PDL: tl.constexpr):
    HAS_B: tl.constexpr = QT != 8  # every type but Q8_0 has the sum(x) term
    R: tl.constexpr = T_PAD * BN
    C: tl.constexpr = J // V
    pid = tl.program_id(0)
    # Triton gives each thread V contiguous values and spreads the threads over the other axes
    # in axis order, wrapping (in-thread repeats) over what is left: ORD picks the order, i.e.
    # between well-coalesced warps (groups first) and scales reused over more values (blocks
    # first, a thread then owns several vectors of one block).
    D0: tl.constexpr = BB if ORD == 2 else G
    D1: tl.constexpr = C if ORD == 0 else (BB if ORD == 1 else G)
    D2: tl.constexpr = BB if ORD == 0 else C
    LV: tl.constexpr = 4 if V == 16 else (3 if V == 8 else 2)
    if ORD == 0:
        gi = tl.arange(0, G)[:, None, None, None]
        ci = tl.arange(0, C)[None, :, None, None]
        bi = tl.arange(0, BB)[None, None, :, None]
    elif ORD == 1:
        gi = tl.arange(0, G)[:, None, None, None]
        bi = tl.arange(0, BB)[None, :, None, None]
        ci = tl.arange(0, C)[None, None, :, None]
    else:
        bi = tl.arange(0, BB)[:, None, None, None]
        gi = tl.arange(0, G)[None, :, None, None]
        ci = tl.arange(0, C)[None, None, :, None]
    acc0 = tl.zeros([D0, D1, D2, 1], tl.float32)
    jj = V * ci + tl.arange(0, V)[None, None, None, :]
    rows = row_offsets(pid, N, row_bytes, BN, I64)
    xs = ()
    for t in tl.static_range(T_PAD):
        xs = xs + (x_ptr + tl.minimum(t, T - 1) * stride_x,)
    it0 = 0
    it1 = n_iter
    if SPLIT_K > 1:
        it0 = tl.program_id(1) * n_iter // SPLIT_K
        it1 = (tl.program_id(1) + 1) * n_iter // SPLIT_K
    # One accumulator per (token, row), index t * BN + r, summed up after the loop: nothing
    # crosses threads inside the loop.
    acc = ()
    for i in tl.static_range(R):
        acc = acc + (acc0,)
    wait_inputs(PDL)  # x is the previous kernel's output (see use_pdl)
    for it in range(it0, it1):
        kb = it * BB + bi
        m = kb < NB
        xo, XH = _x_offsets(kb, gi, jj, QT)
        for t0 in tl.static_range(0, T_PAD, TG):
            xl = ()
            xh = ()
            sxl = ()
            sxh = ()
            for t in tl.static_range(t0, t0 + TG):
                xa = masked_load(xs[t] + xo, m, MASK).to(tl.float32)
                xb = masked_load(xs[t] + (xo + XH), m, MASK).to(tl.float32)
                if CHAIN:
                    xl = xl + _leaves(xa, D0, D1, D2, V, LV)
                    xh = xh + _leaves(xb, D0, D1, D2, V, LV)
                else:
                    xl = xl + (xa,)
                    xh = xh + (xb,)
                if HAS_B:
                    sxl = sxl + (tl.sum(xa, axis=3, keep_dims=True),)
                    sxh = sxh + (tl.sum(xb, axis=3, keep_dims=True),)
            for r in tl.static_range(BN):
                blk = rows[r] + kb * TS
                fl, fh, a_lo, a_hi, b_lo, b_hi = decode(w_ptr, blk, gi, jj, m, MASK, ASM, QT)
                for t in tl.static_range(TG):
                    pl = _dot(fl, xl, t, CHAIN, D0, D1, D2, V, LV)
                    ph = _dot(fh, xh, t, CHAIN, D0, D1, D2, V, LV)
                    if HAS_B:
                        p = pl * a_lo - sxl[t] * b_lo + ph * a_hi - sxh[t] * b_hi
                    else:
                        p = (pl + ph) * a_lo
                    acc = _tuple_add(acc, (t0 + t) * BN + r, p, R)
    for i in tl.static_range(R):
        n = pid * BN + i % BN
        if i // BN < T and n < N:
            out = tl.sum(tl.sum(tl.sum(tl.sum(acc[i], axis=3), axis=2), axis=1), axis=0)
            if SPLIT_K > 1:
                tl.atomic_add(y_ptr + (i // BN) * N + n, out, sem="relaxed")
            else:
                tl.store(y_ptr + (i // BN) * N + n, out)


# (G, J): a tile row is G groups of J values per half block (see the decoders).
_TYPE = {Q.Q4_K: (4, 32), Q.Q5_K: (4, 32), Q.Q6_K: (8, 16), Q.Q8_0: (1, 16), Q.Q4_0: (1, 16), Q.Q5_0: (1, 16)}


def _vec(qtype: Q, x_bytes: int) -> int:
    # Values per thread along a tile row: the widest load among the tiles, which Triton gives
    # all of them (16 bytes of a 16-aligned uint8 tile, else one 16-byte vector of x).
    return 16 if qtype in (Q.Q4_K, Q.Q5_K) else 16 // x_bytes


def _blocks_per_warp(qtype: Q, v: int, order: int) -> int:
    # Blocks of a step that one warp's 32 threads cover exactly (threads go to the tile axes in
    # the kernel's ORD order); fewer would leave threads replicating loads.
    g, j = _TYPE[qtype]
    return 32 * v // (g * j) if order == 0 else 32 // g if order == 1 else 32


def default_config(qtype: Q, n_out: int, k_in: int, t: int, x_bytes: int = 4) -> dict:
    """Tile configuration (see _qgemv_kernel): BN rows per program, tile axis order, warps
    (fewer where BB, the blocks per step, would not divide the row; BB=None derives BB from
    them), split-K, TG tokens per weight decode. From an H100 sweep (scripts/bench_kernels.py
    --sweep, bf16 x): per type and T, within 1.5-7% (geometric mean over the benchmark shapes)
    of the best swept configuration per shape; f32 x keeps the 4-warp tiles it was timed with."""
    cfg = dict(BN=4, ORD=0, num_warps=4, BB=None, SPLIT_K=1, TG=min(t, 2), CHAIN=True)
    if t == 1 and x_bytes == 2 and qtype == Q.Q8_0:
        cfg.update(BN=2)
    elif t == 1 and x_bytes == 2:
        cfg.update(num_warps=2)
    elif t > 2 and qtype not in (Q.Q4_K, Q.Q5_K):
        cfg.update(BN=2, TG=4)  # the K-quants' 16-wide x tiles would need too many registers
    return cfg


def _use_asm(x: torch.Tensor) -> bool:
    # Inline PTX only where it is compiled; the Triton interpreter (CPU tests) takes the
    # integer-op path that yields the same bits.
    return x.is_cuda and not interpreting()


@functools.lru_cache(maxsize=4096)
def _plan(qtype: Q, n_out: int, k_in: int, n_tok: int, x_dtype: torch.dtype, asm: bool, config: tuple) -> tuple:
    """Launch grid and kernel arguments for a call signature (cached: a decode step calls each
    weight with the same signature every token)."""
    if qtype not in SUPPORTED:
        raise ValueError(f"qgemv: {qtype.name} is not supported ({', '.join(t.name for t in SUPPORTED)})")
    block, ts = GGML_QUANT_SIZES[qtype]
    if k_in % block:
        raise ValueError(f"qgemv: k_in {k_in} is not a multiple of the {qtype.name} block size {block}")
    x_bytes = x_dtype.itemsize
    cfg = dict(default_config(qtype, n_out, k_in, n_tok, x_bytes), **dict(config))
    nb, row_bytes = k_in // block, k_in // block * ts
    g, j = _TYPE[qtype]
    v = _vec(qtype, x_bytes)
    bpw = _blocks_per_warp(qtype, v, cfg["ORD"])
    nw = cfg["num_warps"]
    if cfg["BB"] is None:
        while nw > 1 and nb % (bpw * nw):
            nw //= 2
        bb = bpw * nw  # masked tail only if even one warp's blocks do not divide the row
    else:
        bb = cfg["BB"]
        nw = max(1, min(nw, bb // bpw))
    n_iter = triton.cdiv(nb, bb)
    split = max(1, min(cfg["SPLIT_K"], n_iter))
    t_pad = triton.next_power_of_2(max(n_tok, 1))
    kw = dict(QT=int(qtype), TS=ts, G=g, J=j, V=v, ORD=cfg["ORD"], T_PAD=t_pad,
              TG=min(t_pad, triton.next_power_of_2(cfg["TG"])), BN=cfg["BN"], BB=bb, SPLIT_K=split,
              MASK=nb % bb != 0, I64=n_out * row_bytes >= 2**31, ASM=asm, CHAIN=cfg["CHAIN"],
              num_warps=nw, num_stages=1)  # no loop pipelining: the loads feed registers, not dots
    return (triton.cdiv(n_out, cfg["BN"]), split), (nb, row_bytes, n_iter), n_out * row_bytes, kw


def qgemv(x: torch.Tensor, w_raw: torch.Tensor, qtype, n_out: int, k_in: int, *,
          config: dict | None = None) -> torch.Tensor:
    """x [..., k_in] (f32/bf16/f16) times the GGUF matrix w_raw (uint8 [n_out, row_bytes], rows of
    k_in values) transposed: float32 [..., n_out]. `config` overrides default_config (tuning)."""
    if x.shape[-1] != k_in:
        raise ValueError(f"qgemv: x {tuple(x.shape)} does not end in k_in = {k_in}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_tok = x2.shape[0]
    if n_tok > MAX_T:
        return torch.cat([qgemv(x2[i:i + MAX_T], w_raw, qtype, n_out, k_in, config=config)
                          for i in range(0, n_tok, MAX_T)]).reshape(*lead, n_out)
    grid, (nb, row_bytes, n_iter), w_numel, kw = _plan(
        Q(qtype), n_out, k_in, n_tok, x2.dtype, _use_asm(x2), tuple(sorted(config.items())) if config else ())
    if w_raw.dtype != torch.uint8 or w_raw.numel() != w_numel:
        raise ValueError(f"qgemv: w_raw must be uint8 with {w_numel} bytes ({n_out} rows of {row_bytes})")
    y = (torch.zeros if grid[1] > 1 else torch.empty)((n_tok, n_out), dtype=torch.float32, device=x.device)
    if n_tok and n_out:
        pdl = use_pdl(x2)
        _qgemv_kernel[grid](x2, w_raw, y, n_tok, n_out, nb, row_bytes, x2.stride(0), n_iter, PDL=pdl,
                            **launch_kw(pdl), **kw)
    return y.reshape(*lead, n_out)


def qgemv_reference(x: torch.Tensor, w_raw: torch.Tensor, qtype, n_out: int, k_in: int) -> torch.Tensor:
    """x @ dequantize(W).T in float32, with tpruntime.quants' bit-exact dequantizer."""
    w = dequantize(w_raw.reshape(-1), Q(qtype), (n_out, k_in))
    return torch.matmul(x.float(), w.T)


def weight_bytes(qtype, n_out: int, k_in: int) -> int:
    block, ts = GGML_QUANT_SIZES[Q(qtype)]
    return n_out * (k_in // block) * ts


__all__ = ["SUPPORTED", "MAX_T", "qgemv", "qgemv_reference", "default_config", "weight_bytes"]
