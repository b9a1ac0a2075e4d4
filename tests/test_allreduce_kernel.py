"""kernels/allreduce.py's protocol (values pushed into the peers' buffers, the UNWRITTEN marks,
call counts, the two buffer slots) on the CPU: each rank is a process running the kernel in
Triton's interpreter over host tensors in shared memory that stand for the GPUs' symmetric
memory (each process sees them at its own addresses, as with CUDA IPC), so a program really
waits for its peers' values. What this cannot check is the GPU's memory ordering across NVLink:
tests/test_allreduce.py runs the kernel on 2 GPUs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
import triton

from conftest import CUDA

pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")
pytestmark = pytest.mark.skipif(CUDA, reason="CPU interpreter check; the GPU runs tests/test_allreduce.py")

from tpruntime.kernels import fused  # noqa: E402
from tpruntime.kernels.allreduce import (BLOCK, ROW, PeerBuffers, fits_add_rms_norm, one_shot_add_rms_norm,  # noqa: E402
                                         one_shot_all_reduce)
from tpruntime.qweight import Int8Request  # noqa: E402

SIZES = [1, 700, BLOCK, 2 * BLOCK + 5, 700, 1, 3 * BLOCK, 2 * BLOCK + 5]


def ints(n: int, call: int, rank: int) -> torch.Tensor:
    # small integers: exact in every wire dtype, so a stale chunk or slot shows
    return ((torch.arange(n) % 5) + 3 * call + rank).float()


def peer_view(r: int, world: int, bufs, unit: int = BLOCK) -> PeerBuffers:
    """Rank r's view of the shared buffers, each at this process's own addresses."""
    return PeerBuffers(bufs[r], torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64),
                       torch.zeros(bufs[r].numel() // (2 * (world - 1) * unit), dtype=torch.int64), r, world)


def shared(world: int, max_elems: int, dtype, unit: int = BLOCK):
    """Every rank's buffer, all UNWRITTEN."""
    n_buf, _ = PeerBuffers.sizes(max_elems, world, unit)
    return [PeerBuffers.fill_unwritten(torch.empty(n_buf, dtype=dtype)).share_memory_() for _ in range(world)]


def all_unwritten(buf: torch.Tensor) -> bool:
    """Whether every value of a buffer is marked as not arrived (as after a full exchange)."""
    return bool((buf.view(torch.int32 if buf.dtype == torch.float32 else torch.int16)
                 == (-2**31 if buf.dtype == torch.float32 else -2**15)).all())


def join_ranks(fn, args, world: int) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    # a rank left waiting for a peer's values would hang the test: give up after a bound instead
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # (True once every rank has exited; raises if one failed)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("a rank is still waiting for its peers after 240 s")


def _rank(r: int, world: int, bufs, inputs, results, max_programs: list[int]) -> None:
    """One rank: the same calls as every other, inputs[i][r] in, results[i][r] out."""
    os.environ["TRITON_INTERPRET"] = "1"
    peers = peer_view(r, world, bufs)
    for i, x in enumerate(inputs):
        out = one_shot_all_reduce(x[r], peers, max_programs=max_programs[r])
        results[i][r].copy_(out)


def run_ranks(world: int, inputs: list[torch.Tensor], dtype=torch.float32,
              max_programs: "int | list[int]" = 0) -> list[torch.Tensor]:
    """inputs[i]: [world, ...], rank r's input of call i; returns results[i], [world, ...].
    max_programs: the grid's cap, or each rank's (0: a program per chunk, as on a GPU for these
    sizes)."""
    if isinstance(max_programs, int):
        max_programs = [max_programs] * world
    bufs = shared(world, max(x[0].numel() for x in inputs), dtype)
    inputs = [x.share_memory_() for x in inputs]
    results = [torch.full(x.shape, float("nan")).share_memory_() for x in inputs]
    join_ranks(_rank, (world, bufs, inputs, results, max_programs), world)
    # every value a rank received it marked again after reading: nothing is left for a later call
    assert all(all_unwritten(b) for b in bufs)
    return results


@pytest.mark.parametrize("world,dtype,max_programs", [(2, torch.float32, 0), (3, torch.bfloat16, 0),
                                                      (2, torch.float32, 2), (3, torch.float32, 1),
                                                      (2, torch.float32, [1, 3])])
def test_sums_over_repeated_calls(world, dtype, max_programs):
    """Calls of several sizes (one program, several, a partial last block), repeated so both
    slots are reused: every rank gets the exact sum. With the grid capped below the chunks (as
    for a large message on a GPU), each program pushes several chunks and then gathers them; with
    caps that differ between ranks (GPUs of different SM counts) a chunk's pusher and gatherer
    are different programs, so a program that waited before pushing all its chunks would wait
    for a peer program that waits for it."""
    inputs = [torch.stack([ints(n, i, r) for r in range(world)]) for i, n in enumerate(SIZES)]
    results = run_ranks(world, inputs, dtype, max_programs)
    for i, n in enumerate(SIZES):
        want = inputs[i].sum(0)
        for r in range(world):
            assert torch.equal(results[i][r], want), (r, i, n)


def test_four_ranks():
    """4 ranks (issue 15's world, which no GPU kind lent so far has): every rank's region in every
    peer's buffer, grids capped so programs loop."""
    sizes = [700, 3 * BLOCK, 5, 2 * BLOCK + 1, 700]
    inputs = [torch.stack([ints(n, i, r) for r in range(4)]) for i, n in enumerate(sizes)]
    results = run_ranks(4, inputs, max_programs=2)
    for i in range(len(sizes)):
        assert torch.equal(results[i], inputs[i].sum(0).expand(4, -1)), i


def test_every_rank_gets_the_same_bits():
    """Random floats: summed in rank order in float32, so the ranks agree bit for bit (the
    residual stream must not drift apart) and equal a float32 sum in that order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 1000, generator=g).expand(3, 3, 1000) * torch.tensor([1.0, -3.0, 7.0])[:, None, None]
    x = x + torch.randn(3, 3, 1000, generator=g)
    (res,) = run_ranks(3, [x.contiguous()])
    want = (x[0] + x[1]) + x[2]
    for r in range(3):
        assert torch.equal(res[r], want)


def test_negative_zero_is_summed_as_zero():
    """-0.0 is the wire's "not arrived" mark, so it travels as +0.0: a message of zeros of
    either sign does not leave its peers waiting, and sums to zero."""
    x = torch.tensor([[-0.0, 0.0, -0.0, 1.0], [-0.0, -0.0, 2.0, -0.0]])
    (res,) = run_ranks(2, [x])
    assert torch.equal(res, torch.tensor([0.0, 0.0, 2.0, 1.0]).expand(2, 4))


def test_buffers_hold_a_region_per_peer():
    """A rank's buffer: 2 slots x a region per peer (it never sends to itself), each holding the
    largest message in whole chunks."""
    assert PeerBuffers.sizes(BLOCK + 1, 2) == (2 * 1 * 2 * BLOCK, 2)
    assert PeerBuffers.sizes(5120, 4, ROW) == (2 * 3 * triton.cdiv(5120, ROW) * ROW, triton.cdiv(5120, ROW))
    assert peer_view(1, 3, shared(3, 700, torch.float32)).region == BLOCK
    with pytest.raises(ValueError, match="2 ranks"):
        PeerBuffers.sizes(BLOCK, 1)


def test_rejects_a_message_larger_than_the_buffer():
    peers = peer_view(0, 2, shared(2, BLOCK, torch.float32))
    with pytest.raises(ValueError, match="exceed the buffer"):
        one_shot_all_reduce(torch.zeros(BLOCK + 1), peers)
    with pytest.raises(ValueError, match="no wire format"):
        PeerBuffers.fill_unwritten(torch.zeros(4, dtype=torch.float64))


# --- the all-reduce that ends in the residual add and the next RMSNorm -------------------------

EPS = 1e-6
# (rows, n, post-norm, output dtype, int8 form for the next GEMV): one decode token with its int8
# form (Gemma's post-norm and not), several rows, a masked row tail; each case twice, between
# plain all-reduces on their own buffers, so both slots and both protocols are in play.
NORM_CASES = [(1, 96, False, torch.bfloat16, True), (3, 200, True, torch.float32, False),
              (1, 96, True, torch.bfloat16, True), (2, 64, False, torch.bfloat16, False)] * 2


def norm_inputs(world: int):
    g = torch.Generator().manual_seed(7)
    out = []
    for rows, n, post, _, _ in NORM_CASES:
        out.append(dict(h=(torch.randn(rows, n, generator=g) * 2).share_memory_(),  # the same on every rank
                        # bf16 values: the interpreter truncates a cast to bf16 where the GPU
                        # rounds, so the wire carries them exactly on both
                        partial=torch.randn(world, rows, n, generator=g).bfloat16().float().share_memory_(),
                        w=(0.5 + torch.rand(n, generator=g)).share_memory_(),
                        pw=(0.5 + torch.rand(n, generator=g)).share_memory_() if post else None,
                        plain=torch.stack([ints(700, len(out), r) for r in range(world)]).share_memory_()))
    return out


def _norm_rank(r: int, world: int, bufs, nbufs, cases, results) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    peers, npeers = peer_view(r, world, bufs), peer_view(r, world, nbufs, ROW)
    for (rows, n, _, out_dtype, q8), case, res in zip(NORM_CASES, cases, results):
        res["plain"][r].copy_(one_shot_all_reduce(case["plain"][r], peers))
        h = case["h"].clone()
        h2, out = one_shot_add_rms_norm(h, case["partial"][r], case["w"], EPS, npeers, post_weight=case["pw"],
                                        out_dtype=out_dtype, q8=Int8Request(5) if q8 else None)
        assert h2.data_ptr() == h.data_ptr()  # in place
        res["h"][r].copy_(h)
        if q8:
            res["out"][r].copy_(out.x.float())
            for k in ("xq", "xd", "xs", "y"):
                res[k][r].copy_(getattr(out, k).float())
        else:
            res["out"][r].copy_(out.float())


@pytest.mark.parametrize("world,wire", [(2, torch.float32), (3, torch.float32), (2, torch.bfloat16)])
def test_all_reduce_add_rms_norm_equals_the_two_kernels(world, wire):
    """Every rank's residual, normed output and int8 form equal, bit for bit, what the plain
    all-reduce followed by the fused add + norm kernel produce (the sum in rank order, in the wire
    dtype's values), and the plain all-reduces interleaved on their own buffers stay exact."""
    cases = norm_inputs(world)
    bufs = shared(world, 700, wire)
    nbufs = shared(world, 3 * ROW, wire, unit=ROW)
    results = []
    for (rows, n, _, _, q8), case in zip(NORM_CASES, cases):
        res = {k: torch.full((world, rows, n), float("nan")).share_memory_() for k in ("h", "out")}
        res["plain"] = torch.full((world, 700), float("nan")).share_memory_()
        if q8:
            for k, size in (("xq", n), ("xd", n // 32), ("xs", n // 16), ("y", 5)):
                res[k] = torch.full((world, size), float("nan")).share_memory_()
        results.append(res)
    join_ranks(_norm_rank, (world, bufs, nbufs, cases, results), world)
    assert all(all_unwritten(b) for b in bufs + nbufs)
    for (rows, n, _, out_dtype, q8), case, res in zip(NORM_CASES, cases, results):
        assert torch.equal(res["plain"], case["plain"].sum(0).expand(world, -1))
        total = torch.zeros(rows, n)
        for r in range(world):
            total = total + case["partial"][r]
        h_ref = case["h"].clone()
        _, ref = fused.add_rms_norm(h_ref, total, case["w"], EPS, post_weight=case["pw"], out_dtype=out_dtype,
                                    q8=Int8Request(5) if q8 else None)
        for r in range(world):
            assert torch.equal(res["h"][r], h_ref), (r, rows, n)
            assert torch.equal(res["out"][r], (ref.x if q8 else ref).float()), (r, rows, n)
            if q8:
                for k in ("xq", "xd", "xs"):
                    assert torch.equal(res[k][r], getattr(ref, k).float()), (r, k)
                assert not res["y"][r].any()  # the next GEMV's split-K output, zeroed


def test_all_reduce_add_rms_norm_limits():
    """Rows beyond the buffer's, or a row the norm cannot hold whole, are not taken (the caller
    falls back to the all-reduce and the separate norm); asked anyway, it refuses."""
    peers = peer_view(0, 2, shared(2, 2 * ROW, torch.float32, ROW), ROW)
    assert fits_add_rms_norm(peers, 2, ROW) and fits_add_rms_norm(peers, 1, 5120)
    assert not fits_add_rms_norm(peers, 3, 64) and not fits_add_rms_norm(peers, 1, ROW + 1)
    assert not fits_add_rms_norm(peers, 0, 64)
    with pytest.raises(ValueError, match="exceed the buffer"):
        one_shot_add_rms_norm(torch.zeros(3, 64), torch.zeros(3, 64), torch.ones(64), EPS, peers)


def test_all_reduce_add_rms_norm_rows_have_places_of_their_own():
    """Each row's program pushes its row to its own place in the peer's region (row t at t *
    ROW) and reads the peer's rows from theirs: on a GPU the rows' programs run at once, so rows
    sharing a place would overwrite each other (the interpreter runs programs one after another
    and could not show it by the sums). Rank 0 runs alone here, its peer's rows already pushed."""
    os.environ["TRITON_INTERPRET"] = "1"
    world, rows, n = 2, 3, 96
    bufs = shared(world, rows * ROW, torch.float32, unit=ROW)
    partial = torch.randn(world, rows, n, generator=torch.Generator().manual_seed(3))
    for t in range(rows):  # rank 1's rows, as its call 0 would have pushed them: slot 0, its region (0)
        bufs[0][t * ROW:t * ROW + n] = partial[1][t]
    h = torch.zeros(rows, n)
    one_shot_add_rms_norm(h, partial[0], torch.ones(n), EPS, peer_view(0, world, bufs, ROW), out_dtype=torch.float32)
    assert torch.equal(h, partial[0] + partial[1])
    for t in range(rows):  # rank 0's rows in rank 1's buffer: slot 0, its region (0), row t at t * ROW
        assert torch.equal(bufs[1][t * ROW:t * ROW + n], partial[0][t]), t
    assert all_unwritten(bufs[0])  # what rank 0 read, it marked again
