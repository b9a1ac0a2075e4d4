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
