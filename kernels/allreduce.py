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

from tpruntime.kernels.common import launch_kw, use_pdl, wait_inputs

BLOCK = 1024  # values per program (4 KB of float32): a 16 KB message is 4 programs per rank


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, own_buf, own_flags, buf_ptrs, flag_ptrs, counter_ptr, n, slot_elems,
                     RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    wait_inputs(PDL)  # x is the previous kernel's output
    c = tl.load(counter_ptr + b)
    slot = (c % 2) * slot_elems
    wire = own_buf.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    tl.store(own_buf + slot + offs, x.to(wire), mask=m)
    tl.debug_barrier()  # every thread's part of the chunk is written before the signal
    for p in tl.static_range(WORLD):
        peer_flags = tl.load(flag_ptrs + p).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(peer_flags + b * WORLD + RANK, c + 1, sem="release", scope="sys")
    for p in tl.static_range(WORLD):
        while tl.atomic_add(own_flags + b * WORLD + p, 0, sem="acquire", scope="sys") < c + 1:
            pass
    tl.debug_barrier()
    acc = tl.zeros([BLOCK], tl.float32)
    # (buffers are 16-byte aligned allocations and slots whole blocks: vector loads)
    slot = tl.multiple_of(slot, BLOCK)
    for p in tl.static_range(WORLD):
        peer_buf = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(wire)), 16)
        acc += tl.load(peer_buf + slot + offs, mask=m, other=0.0, cache_modifier=".cv").to(tl.float32)
    tl.store(out_ptr + offs, acc, mask=m)
    tl.store(counter_ptr + b, c + 1)


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
    def sizes(max_elems: int, world: int) -> tuple[int, int]:
        """(buffer values, flags) for messages of up to max_elems values (a slot holds whole
        blocks, so every program's chunk starts aligned)."""
        blocks = triton.cdiv(max_elems, BLOCK)
        return 2 * blocks * BLOCK, blocks * world


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


__all__ = ["BLOCK", "PeerBuffers", "one_shot_all_reduce"]
