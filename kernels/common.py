"""Small Triton helpers shared by the kernels."""

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4 (griddepcontrol); without it kernels launch the ordinary way (launch_kw)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - old Triton
    gdc_launch_dependents = gdc_wait = None

# Programmatic dependent launch (see use_pdl); TPRUNTIME_PDL=0 switches it off (A/B timing).
PDL = os.environ.get("TPRUNTIME_PDL", "1") != "0"


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): there inline PTX
    does not run and bf16 casts truncate, so the kernels take their integer-op equivalents."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (an H100 SXM's 132 for the interpreter on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def hopper(t: torch.Tensor) -> bool:
    """Whether t is on an NVIDIA sm_90 or newer GPU (ROCm reports its own capabilities) and
    kernels are compiled (not interpreted)."""
    return t.is_cuda and torch.version.hip is None and not interpreting() and _sm90(
        t.device.index if t.device.index is not None else torch.cuda.current_device())


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch as programmatic dependents (Hopper's PDL). A decode
    step is ~12 small kernels per layer, and between two of them an ordinary launch leaves the
    GPU draining the first one's last programs and then ramping the next one up; a dependent
    launch lets the next kernel's programs be placed while the previous kernel finishes, and the
    GEMVs issue their first weight loads (bytes that no kernel writes) before they wait. Each
    kernel launched so calls `wait_inputs` before it touches anything an earlier kernel wrote or
    reads. Captured CUDA graphs keep these edges. Off in the interpreter, before sm_90, and with
    TPRUNTIME_PDL=0.

    Measured on an H200 (docs/benchmarks.md): qwen3-32b decode 7.77 -> 7.36 ms/token, qwen3-8b
    2.51 -> 2.26. Two variants were slower and are not kept: letting the next kernel be placed
    before the wait (8.97 / 2.36 ms: chains of waiting programs crowd the SMs), and GEMVs that
    bulk-prefetch their rows into L2 before the wait (8.37 / 2.49 ms)."""
    return PDL and gdc_wait is not None and hopper(t)


def launch_kw(pdl: bool) -> dict:
    """The launch keyword for a dependent launch, only when asked: a Triton without PDL (older
    than 3.4, or ROCm's) rejects the keyword even as False."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def wait_inputs(PDL: tl.constexpr):
    """In a kernel launched with launch_pdl: wait until the previous kernel has finished and its
    writes are visible (everything before this may read only constant data: weights, tables),
    then let the next kernel be placed. Each kernel waits for the end of the one before it,
    which itself waited, so the stream's order holds for every read and write after the wait;
    and the next kernel's programs are placed only once all of this one's are running past
    their wait, so no waiting program holds an SM that an unfinished kernel needs."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


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
