"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


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
