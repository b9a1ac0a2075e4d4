"""One-shot all-reduce over peer-to-peer memory (Triton), for the ranks of one host.

Every rank owns, in memory that all its peers map (torch symmetric memory: tpruntime/comm.py),
a buffer of two slots, each with a region per peer (its peers in rank order, itself left out),
filled with a bit pattern that no value on the wire takes (UNWRITTEN: the sign bit alone, -0.0,
which travels as +0.0). A call on n values cuts it into chunks of BLOCK values; chunk b is
served by program b % G of every rank (G at most the programs the GPU holds at once), which in
the chunk's c-th call:

  1. rounds the chunk of its input to the wire dtype and stores it straight into its region of
     slot c % 2 of every peer's buffer (remote stores over NVLink, posted: nothing waits for
     them); a program does this for all its chunks before it waits for any;
  2. reads the peers' regions of slot c % 2 of its *own* buffer until no value there is
     UNWRITTEN: each value says itself whether it has arrived (no flag, no fence, no remote
     read, so one trip over NVLink instead of a flag's and then the pull's);
  3. writes UNWRITTEN back over what it read, so the slot is ready for call c + 2;
  4. sums the chunks in rank order, in float32 (its own from registers), so every rank holds
     the same bits afterwards (the residual stream must not drift apart);
  5. counts the call: counter[b] := c + 1, in its own memory.

c is the chunk's own count, so no host-side state is involved and a captured CUDA graph
replays the whole protocol. Why the slots cannot be mixed up: a peer stores into slot c % 2 of
this rank again only in its call c + 2, which needs this rank's data of call c + 1, pushed by a
later kernel after its wait_inputs, i.e. after this one (with its reads and its clearing of slot
c % 2) had ended: every kernel between them waits for its predecessor the same way (a dependent
launch may be placed early, but touches nothing before its wait), so the order is transitive.
Until then a peer can be at most one call ahead, in the other slot. Why no program waits
forever on a live peer: every chunk a program waits for is pushed by a program that is already
running (all G are resident) and pushes before it waits; a grid of a program per chunk would
rely on the GPU placing programs in order once a large message's chunks outnumber its slots.
Every value is stored and read as a whole aligned word (4 or 2 bytes), so a value half arrived
is never taken. The polls are volatile loads: an SM must not serve its own buffer from L1.

This is the push, flag-free one-shot (TensorRT-LLM calls its kernel of this kind "Lamport");
the first version of this kernel pulled each chunk from the peer after a flag said it was
there, a round trip more (docs/benchmarks.md has both).

Why not NCCL: a decode-sized all-reduce (a token's hidden state, 8-20 KB) is latency, not
bytes, and NCCL spends ~10 us per call inside a CUDA graph on 2 H200s; torch's own one-shot op
(the library to beat) 6-7 us (docs/benchmarks.md). This kernel is one launch that also does
the copy into the shared buffers, and is launched as a programmatic dependent like the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tpruntime.kernels.common import interpreting, launch_kw, sm_count, use_pdl, wait_inputs
from tpruntime.kernels.fused import MAX_TILE, add_norm_row, norm_config, norm_int8, row_view, with_int8

BLOCK = 1024  # values per chunk (4 KB of float32): a 16 KB message is 4 programs per rank
# Programs per SM at most: 4-warp programs with a few registers each, so 4 fit beside whatever
# kernel is still finishing on the SM (PDL), and they keep enough stores in flight to fill NVLink.
PROGRAMS_PER_SM = 4
# A peer that pushes nothing for this long has died or stopped short of this call (a rank
# compiling kernels on first use may lag its peers by seconds, never by a minute; the ranks
# start decoding after a barrier and then step together). TPRUNTIME_AR_TIMEOUT_S overrides it.
TIMEOUT_S = 60.0
# The all-reduce ending in add + RMSNorm: one program per row (a decode step's token), whole
# in registers, so rows up to the norm's longest tile, and up to 8 rows (the GEMVs' batch).
ROW = MAX_TILE
MAX_ROWS = 8


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _give_up(gave_up_addr):
    """Tell the host (a flag in its pinned memory, fenced at system scope) and end the kernel."""
    tl.inline_asm_elementwise("st.volatile.global.u32 [$1], 1;\n\tmembar.sys;\n\ttrap;", "=r,l", [gave_up_addr],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wire_bits(x, own_buf, own_bits, UNWRITTEN: tl.constexpr):
    """x rounded to the wire dtype, as integers of its width; -0.0 travels as +0.0."""
    mine = x.to(own_buf.dtype.element_ty).to(own_bits.dtype.element_ty, bitcast=True)
    return tl.where(mine == UNWRITTEN, 0, mine)


@triton.jit
def _region(c, OWNER: tl.constexpr, SENDER: tl.constexpr, region, WORLD: tl.constexpr, ALIGN: tl.constexpr):
    """Where, in OWNER's buffer, SENDER's values of call c go: slot c % 2, then the region of
    SENDER among OWNER's peers in rank order (OWNER itself left out)."""
    return tl.multiple_of(((c % 2) * (WORLD - 1) + (SENDER - 1 if SENDER > OWNER else SENDER)) * region, ALIGN)


@triton.jit
def _chunk(b, x_ptr, counter_ptr, n, own_buf, own_bits, UNWRITTEN: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk b of the message: its offsets, mask, call count, and this rank's values on the wire."""
    offs = b * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = tl.load(counter_ptr + b)
    return offs, m, c, _wire_bits(tl.load(x_ptr + offs, mask=m, other=0.0), own_buf, own_bits, UNWRITTEN)


@triton.jit
def _push(mine, offs, m, c, own_bits, buf_ptrs, region, RANK: tl.constexpr, WORLD: tl.constexpr,
          ALIGN: tl.constexpr):
    """Step 1 for a chunk in its call c: this rank's wire values stored into every peer's buffer,
    in slot c % 2, in the region that peer keeps for this rank (its peers in rank order, itself
    left out: a rank never sends to itself)."""
    bits_ty = own_bits.dtype.element_ty
    for p in tl.static_range(WORLD):
        if p != RANK:
            peer = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(bits_ty)), 16)
            tl.store(peer + _region(c, p, RANK, region, WORLD, ALIGN) + offs, mine, mask=m)


@triton.jit
def _gather(mine, offs, m, c, own_buf, own_bits, region, gave_up_addr, RANK: tl.constexpr, WORLD: tl.constexpr,
            UNWRITTEN: tl.constexpr, ALIGN: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """Steps 2-4 for a chunk in its call c: the float32 sum over ranks, in rank order, of the
    peers' values arrived in this rank's buffer and its own (mine). With TIMEOUT_NS a peer that
    sends nothing for that long (dead, or stopped short of this call) ends the kernel with a trap
    instead of a wait forever, after setting the host's flag at gave_up_addr: the host sees a
    failed launch at its next synchronization and the flag says why (see gave_up)."""
    wire = own_buf.dtype.element_ty
    acc = tl.zeros(mine.shape, tl.float32)
    for p in tl.static_range(WORLD):
        v = mine
        if p != RANK:
            src = own_bits + _region(c, RANK, p, region, WORLD, ALIGN) + offs
            v = tl.load(src, mask=m, other=0, volatile=True)
            if TIMEOUT_NS > 0:
                t0 = _globaltimer()
            while tl.max(tl.where(v == UNWRITTEN, 1, 0)) > 0:  # (masked lanes read as 0)
                v = tl.load(src, mask=m, other=0, volatile=True)
                if TIMEOUT_NS > 0:
                    if _globaltimer() - t0 > TIMEOUT_NS:
                        _give_up(gave_up_addr)
            tl.store(src, tl.full(mine.shape, UNWRITTEN, own_bits.dtype.element_ty), mask=m)
        acc += v.to(wire, bitcast=True).to(tl.float32)
    return acc


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, own_buf, own_bits, buf_ptrs, counter_ptr, n, region, n_chunks, gave_up_addr,
                     RANK: tl.constexpr, WORLD: tl.constexpr, UNWRITTEN: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """Chunk b of the message (BLOCK values) is program b % G's, for G programs, which first
    pushes all its chunks and only then waits for its peers' (so no program waits for a chunk that
    a program not yet running would send: G is at most what the GPU holds at once)."""
    pid, G = tl.program_id(0), tl.num_programs(0)
    wait_inputs(PDL)  # x is the previous kernel's output
    for b in range(pid, n_chunks, G):
        offs, m, c, mine = _chunk(b, x_ptr, counter_ptr, n, own_buf, own_bits, UNWRITTEN, BLOCK)
        _push(mine, offs, m, c, own_bits, buf_ptrs, region, RANK, WORLD, BLOCK)
    for b in range(pid, n_chunks, G):  # (the chunk again: registers cannot hold all of a program's)
        offs, m, c, mine = _chunk(b, x_ptr, counter_ptr, n, own_buf, own_bits, UNWRITTEN, BLOCK)
        acc = _gather(mine, offs, m, c, own_buf, own_bits, region, gave_up_addr, RANK, WORLD, UNWRITTEN, BLOCK,
                      TIMEOUT_NS)
        tl.store(out_ptr + offs, acc, mask=m)
        tl.store(counter_ptr + b, c + 1)


@triton.jit
def _one_shot_add_rms_norm_kernel(
        x_ptr, h_ptr, pw_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_h, stride_o,
        own_buf, own_bits, buf_ptrs, counter_ptr, region, gave_up_addr,
        xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
        RANK: tl.constexpr, WORLD: tl.constexpr, UNWRITTEN: tl.constexpr, ROW: tl.constexpr,
        HAS_POST: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr, PDL: tl.constexpr, Q8: tl.constexpr,
        ZB: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """The sum over ranks of the partial rows x, added to the residual rows h (in place,
    post-normed first with HAS_POST), and h's rms norm: the all-reduce and the fused add + norm
    (kernels/fused.py) in one launch. Program t owns row t whole (n <= BLOCK values, [BLOCK / 4,
    4] tiles as in the norm), at t * ROW in the regions, with the protocol above as program t."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    m = offs < n
    # the norm weights are constant: loaded while the previous kernel finishes
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    pw = w
    if HAS_POST:
        pw = tl.load(pw_ptr + offs, mask=m, other=0.0).to(tl.float32)
    wait_inputs(PDL)
    c = tl.load(counter_ptr + t)
    x = tl.load(x_ptr + t * stride_x + offs, mask=m, other=0.0)
    h = tl.load(h_ptr + t * stride_h + offs, mask=m, other=0.0)
    mine = _wire_bits(x, own_buf, own_bits, UNWRITTEN)
    _push(mine, t * ROW + offs, m, c, own_bits, buf_ptrs, region, RANK, WORLD, ROW)
    d = _gather(mine, t * ROW + offs, m, c, own_buf, own_bits, region, gave_up_addr, RANK, WORLD, UNWRITTEN, ROW,
                TIMEOUT_NS)
    add_norm_row(h, d, w, pw, h_ptr + t * stride_h, out_ptr + t * stride_o, offs, m, n, eps,
                 xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share, True, HAS_POST, BLOCK, RNE, Q8, ZB)
    tl.store(counter_ptr + t, c + 1)


# The wire dtypes as integers of their width, and the pattern that marks a value not yet arrived.
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_UNWRITTEN = {torch.int32: -2**31, torch.int16: -2**15}


@dataclass
class PeerBuffers:
    """One rank's view of the shared memory: its own buffer (2 slots x (world - 1) regions of
    `region` values in the wire dtype, all UNWRITTEN before first use: see fill_unwritten),
    every rank's buffer as int64 device addresses in rank order, and its own call counters
    (int64, one per chunk of the largest message, zero: 32 bits would wrap after ~16 hours of
    decoding at 36k calls a second)."""

    buf: torch.Tensor
    buf_ptrs: torch.Tensor
    counters: torch.Tensor
    rank: int
    world: int

    @property
    def region(self) -> int:
        """The most values a message may have."""
        return self.buf.numel() // (2 * (self.world - 1))

    @property
    def bits(self) -> torch.Tensor:
        return self.buf.view(_BITS[self.buf.dtype])

    @property
    def unwritten(self) -> int:
        return _UNWRITTEN[_BITS[self.buf.dtype]]

    @staticmethod
    def sizes(max_elems: int, world: int, unit: int = BLOCK) -> tuple[int, int]:
        """(buffer values, counters) for messages of up to max_elems values, programs of `unit`
        values each (BLOCK for the all-reduce, ROW for the one ending in a norm): a region holds
        whole units, so every program's chunk starts aligned."""
        units = triton.cdiv(max_elems, unit)
        if world < 2:
            raise ValueError("one-shot all-reduce: needs 2 ranks or more")
        return 2 * (world - 1) * units * unit, units

    @staticmethod
    def fill_unwritten(buf: torch.Tensor) -> torch.Tensor:
        """Mark every value of a new buffer as not yet arrived (every rank before any call)."""
        if buf.dtype not in _BITS:
            raise ValueError(f"one-shot all-reduce: no wire format for {buf.dtype}")
        buf.view(_BITS[buf.dtype]).fill_(_UNWRITTEN[_BITS[buf.dtype]])
        return buf


def timeout_s() -> float:
    """TPRUNTIME_AR_TIMEOUT_S, or TIMEOUT_S: the seconds a program waits for a peer's values
    before it gives up (0: forever)."""
    raw = os.environ.get("TPRUNTIME_AR_TIMEOUT_S")
    if raw is None:
        return TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise ValueError(f"TPRUNTIME_AR_TIMEOUT_S={raw!r}: expected seconds >= 0 (0: wait forever)")
    return value


def _timeout_ns() -> int:
    """(0, no limit, in the interpreter, which has no clock and no trap)"""
    return 0 if interpreting() else int(timeout_s() * 1e9)


# Pinned host memory a kernel sets to 1 before it traps on a silent peer: still readable once the
# trap has ended the CUDA context, it tells the host that the launch failure it reads is a peer's
# silence and not a fault of its own.
_GAVE_UP: torch.Tensor | None = None


def gave_up_address(device: torch.device) -> int:
    """The flag's address (the same on the device: pinned memory is mapped), made on first use:
    call it before any graph capture."""
    global _GAVE_UP
    if device.type != "cuda" or interpreting():
        return 0
    if _GAVE_UP is None:
        _GAVE_UP = torch.zeros(1, dtype=torch.int32).pin_memory()
    return _GAVE_UP.data_ptr()


def gave_up() -> bool:
    """Whether an all-reduce kernel of this process gave up waiting for a peer."""
    return _GAVE_UP is not None and bool(_GAVE_UP[0])


# Programs per SM that one compiled all-reduce kernel may run, by (device, the kernel's key).
_RESIDENT: dict = {}


def _resident_per_sm(kernel, args: tuple, kw: dict, device: torch.device) -> int:
    """PROGRAMS_PER_SM, or fewer where the compiled kernel's registers or shared memory would
    not let that many stay on an SM at once (the forward-progress argument above needs every
    program resident). Compiled and checked once per variant, before its first launch."""
    key = (device, kw["RANK"], kw["WORLD"], kw["UNWRITTEN"], kw["PDL"], kw["TIMEOUT_NS"], args[2].dtype)
    if key not in _RESIDENT:
        per_sm = PROGRAMS_PER_SM
        compiled = kernel.warmup(*args, grid=(1,), **kw)
        init = getattr(compiled, "_init_handles", None)  # (loads it: registers are known then)
        if init is not None:
            init()
            props = torch.cuda.get_device_properties(device)
            threads = 32 * kw["num_warps"]
            regs = max(1, getattr(compiled, "n_regs", 0) or 0) * threads
            smem = getattr(compiled.metadata, "shared", 0) or 0
            per_sm = min(per_sm, props.max_threads_per_multi_processor // threads,
                         getattr(props, "regs_per_multiprocessor", 65536) // regs,
                         props.shared_memory_per_multiprocessor // smem if smem else per_sm)
        if per_sm < 1:
            raise RuntimeError("one-shot all-reduce: its kernel does not fit an SM")
        _RESIDENT[key] = per_sm
    return _RESIDENT[key]


def one_shot_all_reduce(x: torch.Tensor, peers: PeerBuffers, max_programs: int = 0) -> torch.Tensor:
    """The sum over ranks of x (any float dtype, at most peers.region values; every rank calls
    with the same size, in the same order of calls), as float32 of x's shape. max_programs: the
    grid's cap (default: what the GPU holds at once; tests lower it to make programs loop)."""
    n = x.numel()
    if n > peers.region:
        raise ValueError(f"one_shot_all_reduce: {n} values exceed the buffer's {peers.region}")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    xf = x.reshape(-1)
    if not xf.is_contiguous():
        xf = xf.contiguous()
    pdl = use_pdl(x)
    n_chunks = triton.cdiv(n, BLOCK)
    args = (xf, out, peers.buf, peers.bits, peers.buf_ptrs, peers.counters, n, peers.region, n_chunks,
            gave_up_address(x.device))
    kw = dict(RANK=peers.rank, WORLD=peers.world, UNWRITTEN=peers.unwritten, BLOCK=BLOCK, PDL=pdl,
              TIMEOUT_NS=_timeout_ns(), num_warps=4, **launch_kw(pdl))
    if not max_programs:
        per_sm = _resident_per_sm(_one_shot_kernel, args, kw, x.device) if x.is_cuda and not interpreting() \
            else PROGRAMS_PER_SM
        max_programs = per_sm * sm_count(x.device)
    _one_shot_kernel[(min(n_chunks, max_programs),)](*args, **kw)
    return out


def fits_add_rms_norm(peers: PeerBuffers, rows: int, n: int) -> bool:
    """Whether one_shot_add_rms_norm serves rows x n over peers (sized for it: unit ROW). A row
    of up to ROW (= the norm's MAX_TILE) values is one the norm holds whole (NCHUNK 1)."""
    return 0 < rows <= peers.region // ROW and n <= ROW


def one_shot_add_rms_norm(h: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor, eps: float,
                          peers: PeerBuffers, *, post_weight: torch.Tensor | None = None,
                          out_dtype: torch.dtype = torch.bfloat16, q8=None):
    """fused.add_rms_norm(h, (sum over ranks of partial), ...) in one launch: h (float32,
    contiguous, [rows, n]) += the sum (post-normed first when post_weight is given), in place;
    returns (h, rms_norm(h) * weight as out_dtype, with its int8 form where q8 asks and it can).
    Every rank calls with the same shapes in the same order; peers is a PeerBuffers of its own
    (unit ROW), not the plain all-reduce's: each protocol counts its own calls."""
    if h.dtype != torch.float32 or not h.is_contiguous():
        raise ValueError("one_shot_add_rms_norm: h must be a contiguous float32 tensor (it is updated in place)")
    if partial.shape != h.shape:
        raise ValueError(f"one_shot_add_rms_norm: partial {tuple(partial.shape)} != h {tuple(h.shape)}")
    n = weight.numel()
    h2, x2 = row_view(h, n, "one_shot_add_rms_norm"), row_view(partial, n, "one_shot_add_rms_norm")
    rows = h2.shape[0]
    if not fits_add_rms_norm(peers, rows, n):
        raise ValueError(f"one_shot_add_rms_norm: {rows} rows of {n} exceed the buffer's rows of {ROW}")
    out = torch.empty(h.shape, dtype=out_dtype, device=h.device)
    out2 = out.view(-1, n)
    cfg = norm_config(n, MAX_TILE)
    qx, q8_args, q8_kw = norm_int8(out2, q8, cfg, h2)
    pw = post_weight.contiguous() if post_weight is not None else h2
    pdl = use_pdl(h)
    _one_shot_add_rms_norm_kernel[(rows,)](
        x2, h2, pw, weight.contiguous(), out2, n, float(eps), x2.stride(0), h2.stride(0), out2.stride(0),
        peers.buf, peers.bits, peers.buf_ptrs, peers.counters, peers.region, gave_up_address(h.device), *q8_args,
        RANK=peers.rank, WORLD=peers.world, UNWRITTEN=peers.unwritten, ROW=ROW, HAS_POST=post_weight is not None, BLOCK=cfg["BLOCK"],
        RNE=interpreting(), PDL=pdl, TIMEOUT_NS=_timeout_ns(), **launch_kw(pdl), **q8_kw,
        num_warps=cfg["num_warps"], num_stages=1)
    return h, with_int8(out, qx)


__all__ = ["BLOCK", "MAX_ROWS", "ROW", "TIMEOUT_S", "PeerBuffers", "fits_add_rms_norm", "gave_up", "gave_up_address",
           "one_shot_add_rms_norm", "one_shot_all_reduce", "timeout_s"]
