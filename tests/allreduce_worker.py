"""One rank of tests/test_allreduce.py (2+ GPUs of one host): the runtime's all-reduce in mode
argv[1] and wire dtype argv[2] against NCCL's own all-reduce, eagerly on random data from 1
element to 4 MB, then replayed in a CUDA graph with fresh inputs every time."""

from __future__ import annotations

import faulthandler
import os
import sys

import torch
import torch.distributed as dist

from tpruntime.comm import ONE_SHOT_MAX_BYTES, REDUCE_DTYPES, DistComm
from tpruntime.model import resolve_device

SIZES = [1, 7, 1000, 4096, 5120, 65536, ONE_SHOT_MAX_BYTES // 4, ONE_SHOT_MAX_BYTES // 2 + 3, 1 << 20]
REPLAYS = 2000


def main() -> None:
    mode, reduce_type = sys.argv[1], sys.argv[2]
    # a hang (a stale flag never met, a collective never joined) ends with every thread's
    # stack on stderr and a failure, not a test run that stops at its time limit
    faulthandler.dump_traceback_later(float(os.environ.get("AR_WORKER_TIMEOUT", "150")), exit=True)
    print(f"start {mode} {reduce_type}", flush=True)
    dev = resolve_device("cuda", int(os.environ["LOCAL_RANK"]))
    comm = DistComm(dev, reduce_type, all_reduce=mode)
    assert (comm.one_shot is not None) == (mode != "nccl"), "the mode's path was not taken"
    wire = REDUCE_DTYPES[reduce_type]
    g = torch.Generator(device=dev).manual_seed(100 + comm.rank)
    print(f"rank {comm.rank}: path set up", flush=True)
    for n in SIZES:  # up to 4 MB of f32: the largest ones go through NCCL in every mode
        x = torch.randn(n, generator=g, device=dev)
        got = comm.all_reduce(x.clone())
        ref = x.to(wire)
        dist.all_reduce(ref)
        if wire == torch.float32 and comm.world_size == 2:  # a + b: one rounding either way
            assert torch.equal(got, ref.float()), (n, (got - ref.float()).abs().max().item())
        else:  # NCCL may add in another order, or in the wire dtype
            tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[wire]
            torch.testing.assert_close(got, ref.float(), rtol=tol, atol=tol * comm.world_size)

    print(f"rank {comm.rank}: eager sizes ok", flush=True)
    # Decode-sized messages, 8 per replay as in a step, inputs changed before every replay:
    # small integers, so every wire dtype sums them exactly, and a stale flag or a read of a
    # peer's buffer before it was written shows as a wrong value.
    n = 5120
    static = torch.zeros(8, n, device=dev)
    comm.all_reduce(static[0])  # warm both paths outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [comm.all_reduce(static[i]) for i in range(8)]
    base = (torch.arange(8 * n, device=dev) % 5).reshape(8, n).float()
    ranks = sum(range(comm.world_size))
    for it in range(REPLAYS):
        static.copy_(base + (it % 97) + comm.rank)
        graph.replay()
        want = comm.world_size * (base + (it % 97)) + ranks
        if not all(torch.equal(o, w) for o, w in zip(outs, want)):
            raise AssertionError(f"replay {it}: wrong sum")
    torch.cuda.synchronize()
    print(f"rank {comm.rank}: {REPLAYS} replays ok", flush=True)
    dist.barrier()
    print(f"ok rank {comm.rank}", flush=True)
    del graph, outs  # a graph holding NCCL kernels blocks destroy_process_group (pytorch#115388)
    comm.close()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
