"""kernels/allreduce.py's protocol (flags, call counts, the two buffer slots) on the CPU: each
rank is a process running the kernel in Triton's interpreter over host tensors in shared memory
that stand for the GPUs' symmetric memory (each process sees them at its own addresses, as with
CUDA IPC), so a program really waits for its peers' flags. What this cannot check is the GPU's
memory ordering across NVLink: tests/test_allreduce.py runs the kernel on 2 GPUs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import CUDA

pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")
pytestmark = pytest.mark.skipif(CUDA, reason="CPU interpreter check; the GPU runs tests/test_allreduce.py")

from tpruntime.kernels.allreduce import BLOCK, PeerBuffers, one_shot_all_reduce  # noqa: E402

SIZES = [1, 700, BLOCK, 2 * BLOCK + 5, 700, 1, 3 * BLOCK, 2 * BLOCK + 5]


def ints(n: int, call: int, rank: int) -> torch.Tensor:
    # small integers: exact in every wire dtype, so a stale chunk or slot shows
    return ((torch.arange(n) % 5) + 3 * call + rank).float()


def _rank(r: int, world: int, bufs, flags, inputs, results) -> None:
    """One rank: the same calls as every other, inputs[i][r] in, results[i][r] out."""
    os.environ["TRITON_INTERPRET"] = "1"
    peers = PeerBuffers(bufs[r], flags[r], torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64),
                        torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64),
                        torch.zeros(flags[r].numel() // world, dtype=torch.int64), r, world)
    for i, x in enumerate(inputs):
        out = one_shot_all_reduce(x[r], peers)
        results[i][r].copy_(out)


def run_ranks(world: int, inputs: list[torch.Tensor], dtype=torch.float32) -> list[torch.Tensor]:
    """inputs[i]: [world, ...], rank r's input of call i; returns results[i], [world, ...]."""
    n_buf, n_flags = PeerBuffers.sizes(max(x[0].numel() for x in inputs), world)
    bufs = [torch.full((n_buf,), float("nan"), dtype=dtype).share_memory_() for _ in range(world)]
    flags = [torch.zeros(n_flags, dtype=torch.int64).share_memory_() for _ in range(world)]
    inputs = [x.share_memory_() for x in inputs]
    results = [torch.full(x.shape, float("nan")).share_memory_() for x in inputs]
    ctx = mp.start_processes(_rank, args=(world, bufs, flags, inputs, results), nprocs=world, join=False,
                             start_method="spawn")
    # a rank left waiting for a flag would hang the test: give up after a bound instead
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # (True once every rank has exited; raises if one failed)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("a rank is still waiting for a flag after 240 s")
    return results


@pytest.mark.parametrize("world,dtype", [(2, torch.float32), (3, torch.bfloat16)])
def test_sums_over_repeated_calls(world, dtype):
    """Calls of several sizes (one program, several, a partial last block), repeated so both
    slots are reused and flags of earlier calls are present: every rank gets the exact sum."""
    inputs = [torch.stack([ints(n, i, r) for r in range(world)]) for i, n in enumerate(SIZES)]
    results = run_ranks(world, inputs, dtype)
    for i, n in enumerate(SIZES):
        want = inputs[i].sum(0)
        for r in range(world):
            assert torch.equal(results[i][r], want), (r, i, n)


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


def test_rejects_a_message_larger_than_the_buffer():
    n_buf, n_flags = PeerBuffers.sizes(BLOCK, 2)
    peers = PeerBuffers(torch.zeros(n_buf), torch.zeros(n_flags, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                        torch.zeros(2, dtype=torch.int64), torch.zeros(n_flags // 2, dtype=torch.int64), 0, 2)
    with pytest.raises(ValueError, match="exceed the buffer"):
        one_shot_all_reduce(torch.zeros(BLOCK + 1), peers)
