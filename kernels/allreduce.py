"""One-shot all-reduce over peer-to-peer memory (Triton), for the ranks of one host.

Every rank owns, in memory that all its peers map (torch symmetric memory: tpruntime/comm.py),
a data buffer of two slots and an array of flags. A call on n values runs cdiv(n, BLOCK)
programs on every rank; program b of rank r, in its c-th call:

  1. copies chunk b of its input into slot c % 2 of its own buffer, in the wire dtype;
  2. tells every rank that chunk b of call c is there: flag[b, r] of each rank := c + 1 (after
     a barrier of the program's threads, with release semantics at system scope);
  3. waits until each of its own flags[b, p] is >= c + 1 (acquire);
  4. sums chunk b of every rank's slot, in rank order and in float32, so every rank holds the
     same bits afterwards (the residual stream must not drift apart), and writes it out;
  5. counts the call: counter[b] := c + 1, in its own memory.

c is the program's own count (counter[b]), so no host-side state is involved and a captured
CUDA graph replays the whole protocol. Flags only grow, so one left from an earlier call never
satisfies a later wait; a peer may already be one call ahead (it overwrote c + 1 by c + 2 after
writing its chunk for c + 1 into the *other* slot), hence >=. A rank writes slot c % 2 again
only in call c + 2, after it has seen every peer's flag for call c + 1, which each peer set in
a kernel that began after its call c, with its reads of that slot, had finished. Peers' chunks
are read with .cv loads (fetched again every time): an SM must not serve a peer's slot from
its L1 two calls later.

Why not NCCL: a decode-sized all-reduce (a token's hidden state, 8-20 KB) is latency, not
bytes, and NCCL spends ~10 us per call inside a CUDA graph on 2 H200s; torch's own one-shot op
(the library to beat) 6-7 us (docs/benchmarks.md). This kernel is one launch that also does
the copy into the shared buffer, and is launched as a programmatic dependent like the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tpruntime.kernels.common import interpreting, launch_kw, use_pdl, wait_inputs
from tpruntime.kernels.fused import MAX_TILE, add_norm_row, norm_config, norm_int8, row_view, with_int8

BLOCK = 1024  # values per program (4 KB of float32): a 16 KB message is 4 programs per rank
# The all-reduce ending in add + RMSNorm: one program per row (a decode step's token), whole
# in registers, so rows up to the norm's longest tile, and up to 8 rows (the GEMVs' batch).
ROW = MAX_TILE
MAX_ROWS = 8


@triton.jit
def _exchange(x, offs, m, b, c, own_buf, own_flags, buf_ptrs, flag_ptrs, slot_elems,
              RANK: tl.constexpr, WORLD: tl.constexpr, ALIGN: tl.constexpr):
    """Steps 1-4 for program b in its call c: x (this rank's values, at offs of a slot) in, the
    float32 sum over ranks out, in rank order. Slots start at multiples of ALIGN values."""
    slot = (c % 2) * slot_elems
    wire = own_buf.dtype.element_ty
    tl.store(own_buf + slot + offs, x.to(wire), mask=m)
    tl.debug_barrier()  # every thread's part of the chunk is written before the signal
    for p in tl.static_range(WORLD):
        peer_flags = tl.load(flag_ptrs + p).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(peer_flags + b * WORLD + RANK, c + 1, sem="release", scope="sys")
    for p in tl.static_range(WORLD):
        while tl.atomic_add(own_flags + b * WORLD + p, 0, sem="acquire", scope="sys") < c + 1:
            pass
    tl.debug_barrier()
    acc = tl.zeros(x.shape, tl.float32)
    # (buffers are 16-byte aligned allocations and slots whole blocks: vector loads)
    slot = tl.multiple_of(slot, ALIGN)
    for p in tl.static_range(WORLD):
        peer_buf = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(wire)), 16)
        acc += tl.load(peer_buf + slot + offs, mask=m, other=0.0, cache_modifier=".cv").to(tl.float32)
    return acc


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, own_buf, own_flags, buf_ptrs, flag_ptrs, counter_ptr, n, slot_elems,
                     RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    wait_inputs(PDL)  # x is the previous kernel's output
    c = tl.load(counter_ptr + b)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    acc = _exchange(x, offs, m, b, c, own_buf, own_flags, buf_ptrs, flag_ptrs, slot_elems, RANK, WORLD, BLOCK)
    tl.store(out_ptr + offs, acc, mask=m)
    tl.store(counter_ptr + b, c + 1)


@triton.jit
def _one_shot_add_rms_norm_kernel(
        x_ptr, h_ptr, pw_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_h, stride_o,
        own_buf, own_flags, buf_ptrs, flag_ptrs, counter_ptr, slot_elems,
        xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share,
        RANK: tl.constexpr, WORLD: tl.constexpr, ROW: tl.constexpr, HAS_POST: tl.constexpr,
        BLOCK: tl.constexpr, RNE: tl.constexpr, PDL: tl.constexpr, Q8: tl.constexpr, ZB: tl.constexpr):
    """The sum over ranks of the partial rows x, added to the residual rows h (in place,
    post-normed first with HAS_POST), and h's rms norm: the all-reduce and the fused add + norm
    (kernels/fused.py) in one launch. Program t owns row t whole (n <= BLOCK values, [BLOCK / 4,
    4] tiles as in the norm), at t * ROW in the slots, with the protocol above as program t."""
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
    d = _exchange(x, t * ROW + offs, m, t, c, own_buf, own_flags, buf_ptrs, flag_ptrs, slot_elems, RANK, WORLD,
                  ROW)
    add_norm_row(h, d, w, pw, h_ptr + t * stride_h, out_ptr + t * stride_o, offs, m, n, eps,
                 xq_ptr, xd_ptr, xs_ptr, y_ptr, n_zero, share, True, HAS_POST, BLOCK, RNE, Q8, ZB)
    tl.store(counter_ptr + t, c + 1)


@dataclass
class PeerBuffers:
    """One rank's view of the shared memory: its own buffer (two slots of slot_elems values in
    the wire dtype) and flags (int64, max_blocks * world, zero before first use), every rank's
    buffer and flags as int64 device addresses in rank order, and its own call counters (int64,
    max_blocks, zero: 32 bits would wrap after ~16 hours of decoding at 36k calls a second)."""

    buf: torch.Tensor
    flags: torch.Tensor
    buf_ptrs: torch.Tensor
    flag_ptrs: torch.Tensor
    counters: torch.Tensor
    rank: int
    world: int

    @property
    def slot_elems(self) -> int:
        return self.buf.numel() // 2

    @staticmethod
    def sizes(max_elems: int, world: int, unit: int = BLOCK) -> tuple[int, int]:
        """(buffer values, flags) for messages of up to max_elems values, programs of `unit`
        values each (BLOCK for the all-reduce, ROW for the one ending in a norm): a slot holds
        whole units, so every program's chunk starts aligned."""
        units = triton.cdiv(max_elems, unit)
        return 2 * units * unit, units * world


def one_shot_all_reduce(x: torch.Tensor, peers: PeerBuffers) -> torch.Tensor:
    """The sum over ranks of x (any float dtype, at most slot_elems values; every rank calls
    with the same size, in the same order of calls), as float32 of x's shape."""
    n = x.numel()
    if n > peers.slot_elems:
        raise ValueError(f"one_shot_all_reduce: {n} values exceed the buffer's {peers.slot_elems}")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    xf = x.reshape(-1)
    if not xf.is_contiguous():
        xf = xf.contiguous()
    pdl = use_pdl(x)
    _one_shot_kernel[(triton.cdiv(n, BLOCK),)](
        xf, out, peers.buf, peers.flags, peers.buf_ptrs, peers.flag_ptrs, peers.counters, n, peers.slot_elems,
        RANK=peers.rank, WORLD=peers.world, BLOCK=BLOCK, PDL=pdl, **launch_kw(pdl), num_warps=4)
    return out


def fits_add_rms_norm(peers: PeerBuffers, rows: int, n: int) -> bool:
    """Whether one_shot_add_rms_norm serves rows x n over peers (sized for it: unit ROW). A row
    of up to ROW (= the norm's MAX_TILE) values is one the norm holds whole (NCHUNK 1)."""
    return 0 < rows <= peers.slot_elems // ROW and n <= ROW


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
        peers.buf, peers.flags, peers.buf_ptrs, peers.flag_ptrs, peers.counters, peers.slot_elems, *q8_args,
        RANK=peers.rank, WORLD=peers.world, ROW=ROW, HAS_POST=post_weight is not None, BLOCK=cfg["BLOCK"],
        RNE=interpreting(), PDL=pdl, **launch_kw(pdl), **q8_kw, num_warps=cfg["num_warps"], num_stages=1)
    return h, with_int8(out, qx)


__all__ = ["BLOCK", "MAX_ROWS", "ROW", "PeerBuffers", "fits_add_rms_norm", "one_shot_add_rms_norm",
           "one_shot_all_reduce"]
