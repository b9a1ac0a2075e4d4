"""Small Triton helpers shared by the kernels."""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): there inline PTX
    does not run and bf16 casts truncate, so the kernels take their integer-op equivalents."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def masked_load(ptr, mask, MASK: tl.constexpr):
    """tl.load, masked (zeros outside) only where the caller's tile can run past its data: an
    unmasked load is what lets Triton vectorize without proving the mask uniform."""
    if MASK:
        return tl.load(ptr, mask=mask, other=0)
    return tl.load(ptr)


@triton.jit
def row_offsets(pid, N, row_bytes, BN: tl.constexpr, I64: tl.constexpr):
    """Byte offsets of a GEMV program's BN weight rows. Tail rows redo the last row (their
    results are dropped at the store), so no load needs a row mask."""
    rows = ()
    for r in tl.static_range(BN):
        row = tl.minimum(pid * BN + r, N - 1)
        if I64:
            row = row.to(tl.int64)
        rows = rows + (row * row_bytes,)
    return rows


@triton.jit
def k4_header(h0, h1, h2, h3, gi):
    """Q4_K / Q5_K block header, read as its four little-endian words h0..h3 (d, dmin f16 |
    12 bytes of 6-bit scales and mins), for group gi (sub-blocks 2gi and 2gi + 1): d, dmin as
    f32, and the words whose byte 2 * (gi % 2) (+1) holds those sub-blocks' scale (min) in
    its low 6 bits. Sub-blocks 4..7 take their low 4 bits from h3 and their top 2 from the
    top of h1 / h2 (the & -0x0F0F0F10 keeps bits 4..7 of each byte; the caller's & 63 drops
    the neighbour's bits that the shift brought in)."""
    d = (h0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (h0 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    sc = tl.where(gi < 2, h1, (h3 & 0x0F0F0F0F) | ((h1 >> 2) & -0x0F0F0F10))
    mn = tl.where(gi < 2, h2, ((h3 >> 4) & 0x0F0F0F0F) | ((h2 >> 2) & -0x0F0F0F10))
    return d, dmin, sc, mn
