"""Prefill matmul straight from GGUF blocks (Triton): out[m, n] = sum_k x[m, k] * W[n, k].

The other prefill path (tpruntime.qweight) dequantizes a weight into a bf16 scratch and hands it
to cuBLAS: for qwen3-32b at ub 512 that is 18 GB of quant bytes read, 64 GB of bf16 written and
read again per chunk, a third of the chunk's time on an H100 (docs/benchmarks.md, tenth session).
Here each program dequantizes its weight tile in registers inside the K loop and feeds it to the
tensor cores as the register operand of the MMA, so the weights cross HBM once, as quant bytes.
No library does this for GGUF's block layouts (cuBLAS and torch take dense or their own packed
int4 formats; llama.cpp's MMQ is CUDA C++ inside ggml), hence this kernel.

Tile: a program owns BN weight rows x BM tokens, accumulates acc[BN, BM] in f32 and writes its
transpose. A step of the K loop takes GS groups of a K-quant block (Q4_K/Q5_K: 64 values each,
Q6_K: 32) or GS whole blocks of a 32-value type: the low-half and high-half values that one run
of quant bytes gives are two tiles [BN, GS * J], each multiplied by the x tile of the columns it
covers (gathered with the same index map the GEMV uses, kernels.gemv._x_offsets). The decoders
are the GEMV's: F = a float made from the quant bits, w = a * F - b per sub-block (Q8_0: a * F).
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from tpruntime.errors import TpError
from tpruntime.kernels import QUANT_KERNEL_TYPES
from tpruntime.kernels.common import interpreting
from tpruntime.kernels.gemv import _TYPE, _use_asm, _x_offsets, decode

SUPPORTED = QUANT_KERNEL_TYPES
X_DTYPES = (torch.bfloat16, torch.float16)
_DEFAULT = dict(BM=128, BN=128, GS=1, num_warps=8, num_stages=3, W_LEFT=True)
# The fastest single tile over qwen3-32b's four Q4_K matrices, per batch size, from the sweep
# on an H100 (docs/benchmarks.md, twelfth session): (largest M, tile); the same tile won at 128
# and 512 tokens; larger batches are untimed and keep _DEFAULT.
_TUNED = ((64, dict(BM=64, BN=64, GS=2, num_warps=4, num_stages=4)),
          (512, dict(BM=128, BN=64, GS=1, num_warps=4, num_stages=3)))


def parse_config(text: str) -> dict:
    """TPRUNTIME_QMATMUL_CONFIG: a JSON object of default_config keys, e.g. {"BM":64} ("" for none)."""
    try:
        cfg = json.loads(text or "{}")
        if not isinstance(cfg, dict):
            raise ValueError
    except ValueError:
        raise TpError(f"TPRUNTIME_QMATMUL_CONFIG: {text!r} is not a JSON object such as {{\"BM\":64}}") from None
    unknown = sorted(set(cfg) - set(_DEFAULT))
    if unknown:
        raise TpError(f"TPRUNTIME_QMATMUL_CONFIG: unknown keys {unknown} (known: {', '.join(_DEFAULT)})")
    return cfg


_ENV_CONFIG = parse_config(os.environ.get("TPRUNTIME_QMATMUL_CONFIG", ""))


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, out_ptr, M, N, NB, row_bytes, stride_x, stride_o, n_m, n_steps,
                QT: tl.constexpr, TS: tl.constexpr, G: tl.constexpr, J: tl.constexpr, GS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, MASK_K: tl.constexpr, I64: tl.constexpr,
                ASM: tl.constexpr, F32_DOT: tl.constexpr, W_LEFT: tl.constexpr):
    KQ: tl.constexpr = G > 1  # a K-quant: GS of the block's G groups per step; else GS blocks
    KS: tl.constexpr = GS * J  # values per half tile of a step
    pid = tl.program_id(0)
    # Programs of one weight tile run side by side (the token tiles, n_m of them, vary fastest),
    # so its bytes come from HBM once and from L2 for the others; x (M x K x 2 bytes) stays in L2.
    pid_m = pid % n_m
    pid_n = pid // n_m
    rn = pid_n * BN + tl.arange(0, BN)
    row = tl.minimum(rn, N - 1)  # tail rows repeat the last row; their results are not stored
    rm = pid_m * BM + tl.arange(0, BM)
    if I64:
        row = row.to(tl.int64)
        rm = rm.to(tl.int64)
    rbase = (row * row_bytes)[:, None, None]
    g3 = tl.arange(0, GS)[None, :, None]
    j3 = tl.arange(0, J)[None, None, :]
    kk = tl.arange(0, KS)
    g1 = kk // J
    j1 = kk % J
    mmask = (rm < M)[None, :]
    xrow = x_ptr + rm[None, :] * stride_x
    mcol = (rm < M)[:, None]
    xcol = x_ptr + rm[:, None] * stride_x
    if W_LEFT:
        acc = tl.zeros([BN, BM], tl.float32)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
    for s in range(0, n_steps):
        if KQ:
            kb3 = s // (G // GS)
            gi3 = (s % (G // GS)) * GS + g3
            kb1 = kb3
            gi1 = (s % (G // GS)) * GS + g1
        else:
            kb3 = s * GS + g3
            gi3 = g3
            kb1 = s * GS + g1
            gi1 = g1
        blk = rbase + kb3 * TS
        m3 = kb3 < NB
        fl, fh, a_lo, a_hi, b_lo, b_hi = decode(w_ptr, blk, gi3, j3, m3, MASK_K, ASM, QT)
        if QT == 8:
            wl = fl * a_lo
            wh = fh * a_hi
        else:
            wl = fl * a_lo - b_lo
            wh = fh * a_hi - b_hi
        # Past the last block (a 32-value type whose row is not a whole number of steps) the
        # masked loads gave zero quants, which still decode to -b: zero the weights there.
        if MASK_K:
            wl = tl.where(m3, wl, 0.0)
            wh = tl.where(m3, wh, 0.0)
        wl = tl.reshape(wl.to(x_ptr.dtype.element_ty), [BN, KS])
        wh = tl.reshape(wh.to(x_ptr.dtype.element_ty), [BN, KS])
        xo, XH = _x_offsets(kb1, gi1, j1, QT)
        if W_LEFT:
            # acc[BN, BM] += W x^T: the dequantized tile is the MMA's register operand
            km = (kb1 < NB)[:, None] & mmask if MASK_K else mmask
            xl = tl.load(xrow + xo[:, None], mask=km, other=0.0)
            xh = tl.load(xrow + (xo + XH)[:, None], mask=km, other=0.0)
        else:
            # acc[BM, BN] += x W^T: the dequantized tile goes to shared memory as the B operand
            km = (kb1 < NB)[None, :] & mcol if MASK_K else mcol
            xl = tl.load(xcol + xo[None, :], mask=km, other=0.0)
            xh = tl.load(xcol + (xo + XH)[None, :], mask=km, other=0.0)
            wl = tl.trans(wl)
            wh = tl.trans(wh)
        if F32_DOT:
            # Triton's interpreter multiplies bf16 tiles as their bit patterns: widen first
            # (the tiles keep their 16-bit rounding, so the sums match the compiled kernel's)
            wl, wh, xl, xh = wl.to(tl.float32), wh.to(tl.float32), xl.to(tl.float32), xh.to(tl.float32)
        if W_LEFT:
            acc = tl.dot(wl, xl, acc)
            acc = tl.dot(wh, xh, acc)
        else:
            acc = tl.dot(xl, wl, acc)
            acc = tl.dot(xh, wh, acc)
    if W_LEFT:
        tl.store(out_ptr + rm[None, :] * stride_o + rn[:, None], acc, mask=(rn < N)[:, None] & mmask)
    else:
        tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], acc, mask=(rn < N)[None, :] & mcol)


def default_config(qtype: Q, n_out: int, k_in: int, m: int) -> dict:
    """BN weight rows x BM tokens per program, GS groups (or blocks) per K step, warps and
    pipeline stages, and which MMA operand the weights are (W_LEFT: the register one).
    The sweep's best by batch size (scripts/bench_qmatmul.py, Q4_K; the other types take the
    same tiles untimed). TPRUNTIME_QMATMUL_CONFIG (JSON, e.g. {"BM":64}) overrides it
    everywhere, for timing a whole prefill with another tile."""
    cfg = dict(_DEFAULT)
    cfg.update(next((t for top, t in _TUNED if m <= top), {}))
    cfg.update(_ENV_CONFIG)
    return cfg


@functools.lru_cache(maxsize=4096)
def _plan(qtype: Q, n_out: int, k_in: int, m: int, asm: bool, config: tuple) -> tuple:
    if qtype not in SUPPORTED:
        raise ValueError(f"qmatmul: {qtype.name} is not supported ({', '.join(t.name for t in SUPPORTED)})")
    block, ts = GGML_QUANT_SIZES[qtype]
    if k_in % block:
        raise ValueError(f"qmatmul: k_in {k_in} is not a multiple of the {qtype.name} block size {block}")
    cfg = default_config(qtype, n_out, k_in, m)
    if set(dict(config)) - set(cfg):
        raise ValueError(f"qmatmul: unknown config keys {sorted(set(dict(config)) - set(cfg))}")
    cfg.update(config)
    g, j = _TYPE[qtype]
    nb, row_bytes = k_in // block, k_in // block * ts
    gs = cfg["GS"]
    if g > 1:
        gs = min(gs, g)
        if g % gs:
            raise ValueError(f"qmatmul: GS {gs} does not divide the {g} groups of a {qtype.name} block")
        n_steps = nb * (g // gs)
    else:
        n_steps = triton.cdiv(nb, gs)
    # Q5_0's asm decoder takes the bit position of all four values it packs from the first, so it
    # needs a thread's four values consecutive along the block (the GEMV's layouts). Its 22-byte
    # blocks only align loads to 2 bytes, so Triton's layout here gives a thread 2 consecutive values
    # and the asm packs two such pairs from different rows (sizePerThread [1, 1, 2] in the TTGIR;
    # wrong sums on an H100). The plain decoder is layout-free.
    asm = asm and qtype != Q.Q5_0
    bm = max(16, min(cfg["BM"], triton.next_power_of_2(m)))
    n_m = triton.cdiv(m, bm)
    kw = dict(QT=int(qtype), TS=ts, G=g, J=j, GS=gs, BM=bm, BN=cfg["BN"], MASK_K=g == 1 and nb % gs != 0,
              I64=n_out * row_bytes >= 2**31 or m * max(k_in, n_out) >= 2**31, ASM=asm, F32_DOT=interpreting(),
              W_LEFT=bool(cfg["W_LEFT"]),
              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (n_m * triton.cdiv(n_out, cfg["BN"]),), (nb, row_bytes, n_m, n_steps), n_out * row_bytes, kw


def qmatmul(x: torch.Tensor, w_raw: torch.Tensor, qtype, n_out: int, k_in: int, *,
            out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, k_in] (bf16 / f16, unit stride along k) times the GGUF matrix w_raw (uint8
    [n_out, row_bytes]) transposed: float32 [M, n_out], written into `out` when given (float32,
    [M, n_out], unit column stride: a column slice of a wider output is fine). No host syncs."""
    qtype = Q(qtype)
    n_out, k_in = int(n_out), int(k_in)
    if x.dim() != 2 or x.shape[1] != k_in or x.dtype not in X_DTYPES:
        raise ValueError(f"qmatmul: x must be bf16/f16 [M, {k_in}], got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    grid, (nb, row_bytes, n_m, n_steps), w_numel, kw = _plan(
        qtype, n_out, k_in, max(m, 1), _use_asm(x), tuple(sorted(config.items())) if config else ())
    if w_raw.dtype != torch.uint8 or w_raw.numel() != w_numel:
        raise ValueError(f"qmatmul: w_raw must be uint8 with {w_numel} bytes ({n_out} rows of {row_bytes})")
    if out is None:
        out = torch.empty((m, n_out), dtype=torch.float32, device=x.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (m, n_out) or (n_out > 1 and out.stride(1) != 1):
        raise ValueError(f"qmatmul: out must be float32 [{m}, {n_out}] with unit column stride")
    if m == 0 or n_out == 0:
        return out
    if k_in == 0:
        return out.zero_()
    if not w_raw.is_contiguous() or w_raw.data_ptr() % 4:
        # the block headers are read as 32-bit words
        w_raw = w_raw.contiguous() if not w_raw.is_contiguous() else w_raw.clone()
    if not x.is_cuda and not interpreting():
        raise ValueError("qmatmul: needs a CUDA tensor (or TRITON_INTERPRET=1)")
    _qmm_kernel[grid](x, w_raw, out, m, n_out, nb, row_bytes, x.stride(0), out.stride(0), n_m, n_steps, **kw)
    return out


__all__ = ["SUPPORTED", "X_DTYPES", "qmatmul", "default_config", "parse_config"]
