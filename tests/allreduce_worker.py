"""One rank of tests/test_allreduce.py (2+ GPUs of one host): the runtime's all-reduce in mode
argv[1] and wire dtype argv[2] against NCCL's own all-reduce, eagerly on random data from 1
element to 64 MB (with a prompt chunk's largest message set to 64 MB of f32, as the engine sets
it from -ub: on 2 ranks such a message has more chunks than the GPU holds programs, so each
program pushes and gathers several), then replayed in a CUDA graph with fresh inputs every time,
decode-sized messages around a largest one."""

from __future__ import annotations

import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist

from tpruntime.comm import ONE_SHOT_MAX_BYTES, REDUCE_DTYPES, DistComm
from tpruntime.model import resolve_device

MAX_MESSAGE = 16 << 20
SIZES = [1, 7, 1000, 4096, 5120, 65536, ONE_SHOT_MAX_BYTES // 4, ONE_SHOT_MAX_BYTES // 2 + 3, MAX_MESSAGE,
         MAX_MESSAGE + 1]
REPLAYS = 2000


def silent_peer() -> None:
    """Rank 1 sets the path up and then never joins an all-reduce: rank 0's kernel must give up
    after TPRUNTIME_AR_TIMEOUT_S and the host see it as a lost peer, not wait forever."""
    from tpruntime.comm import describe_comm_failure, is_comm_failure
    dev = resolve_device("cuda", int(os.environ["LOCAL_RANK"]))
    comm = DistComm(dev, "f32", all_reduce="one-shot")
    print(f"rank {comm.rank}: path set up", flush=True)
    if comm.rank != 0:
        time.sleep(float(os.environ["TPRUNTIME_AR_TIMEOUT_S"]) + 20)
        os._exit(0)
    try:
        comm.all_reduce(torch.ones(5120, device=dev))
        torch.cuda.synchronize()
        print("rank 0: the all-reduce returned without its peer", flush=True)
        os._exit(1)
    except Exception as e:  # a CUDA context that trapped: exit without destructors
        print(f"rank 0: lost peer {is_comm_failure(e)}: {describe_comm_failure(e).splitlines()[0]}", flush=True)
        os._exit(0)


def main() -> None:
    if sys.argv[1] == "silent-peer":
        return silent_peer()
    mode, reduce_type = sys.argv[1], sys.argv[2]
    # a hang (a value that never arrives, a collective never joined) ends with every thread's
    # stack on stderr and a failure, not a test run that stops at its time limit
    faulthandler.dump_traceback_later(float(os.environ.get("AR_WORKER_TIMEOUT", "150")), exit=True)
    print(f"start {mode} {reduce_type}", flush=True)
    dev = resolve_device("cuda", int(os.environ["LOCAL_RANK"]))
    comm = DistComm(dev, reduce_type, all_reduce=mode, max_message=MAX_MESSAGE)
    assert (comm.one_shot is not None) == (mode != "nccl"), "the mode's path was not taken"
    wire = REDUCE_DTYPES[reduce_type]
    g = torch.Generator(device=dev).manual_seed(100 + comm.rank)
    print(f"rank {comm.rank}: path set up", flush=True)
    for n in SIZES:  # on 2 ranks, all but the last one-shot; on more, those above 1 MB go to NCCL
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
    # small integers, so every wire dtype sums them exactly, and a value of an earlier call or
    # a slot mixed up shows as a wrong value.
    n = 5120
    static = torch.zeros(8, n, device=dev)
    big = torch.zeros(MAX_MESSAGE, device=dev)
    comm.all_reduce(static[0])  # warm both paths outside the capture
    comm.all_reduce(big)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [comm.all_reduce(static[i]) for i in range(4)]
        big_out = comm.all_reduce(big)
        outs += [comm.all_reduce(static[i]) for i in range(4, 8)]
    base = (torch.arange(8 * n, device=dev) % 5).reshape(8, n).float()
    big_base = (torch.arange(MAX_MESSAGE, device=dev) % 3).float()
    ranks = sum(range(comm.world_size))
    for it in range(REPLAYS):
        static.copy_(base + (it % 97) + comm.rank)
        big.copy_(big_base + (it % 89) + comm.rank)
        graph.replay()
        want = comm.world_size * (base + (it % 97)) + ranks
        if not all(torch.equal(o, w) for o, w in zip(outs, want)):
            raise AssertionError(f"replay {it}: wrong sum")
        if not torch.equal(big_out, comm.world_size * (big_base + (it % 89)) + ranks):
            raise AssertionError(f"replay {it}: wrong sum of the largest message")
    torch.cuda.synchronize()
    print(f"rank {comm.rank}: {REPLAYS} replays ok", flush=True)
    if getattr(comm.one_shot, "norm_peers", None) is not None:
        check_reduce_add_rms_norm(comm, dev)
        print(f"rank {comm.rank}: all-reduce + add + norm ok", flush=True)
    dist.barrier()
    print(f"ok rank {comm.rank}", flush=True)
    del graph, outs  # a graph holding NCCL kernels blocks destroy_process_group (pytorch#115388)
    comm.close()
    faulthandler.cancel_dump_traceback_later()


def check_reduce_add_rms_norm(comm: DistComm, dev: torch.device) -> None:
    """The all-reduce that ends in the residual add and the next norm (one kernel) against the
    all-reduce followed by the fused add + norm kernel: the same bits, eagerly on decode shapes
    (with the int8 form, with Gemma's post-norm), then over graph replays with fresh inputs."""
    from tpruntime.ops import TritonOps
    from tpruntime.qweight import Int8Request
    ops, eps = TritonOps(), 1e-6
    same = torch.Generator(device=dev).manual_seed(5)  # the residual stream is the same on every rank
    own = torch.Generator(device=dev).manual_seed(200 + comm.rank)
    for rows, n, post, q8 in [(1, 4096, False, True), (1, 5120, True, True), (3, 5120, False, False),
                              (8, 2560, False, False), (1, 100, False, False), (1, 8192, False, True)]:
        h = torch.randn(rows, n, generator=same, device=dev) * 3
        w = 0.5 + torch.rand(n, generator=same, device=dev)
        pw = 0.5 + torch.rand(n, generator=same, device=dev) if post else None
        partial = torch.randn(rows, n, generator=own, device=dev)
        h_ref = h.clone()
        _, ref = ops.add_rms_norm(h_ref, comm.all_reduce(partial), w, eps, post_weight=pw,
                                  out_dtype=torch.bfloat16, q8=Int8Request(7) if q8 else None)
        _, got = comm.reduce_add_rms_norm(ops, h, partial, w, eps, post_weight=pw, out_dtype=torch.bfloat16,
                                          q8=Int8Request(7) if q8 else None)
        assert torch.equal(h, h_ref), (rows, n, "residual")
        for k in ("x", "xq", "xd", "xs") if q8 else ():
            assert torch.equal(getattr(got, k), getattr(ref, k)), (rows, n, k)
        assert q8 or torch.equal(got, ref), (rows, n, "normed")
        assert not q8 or not got.y.any()
    # 8 in a row in one graph, as in a decode step; small integers: exact sums, so a value of an
    # earlier call or a slot mixed up shows
    n = 5120
    w = 0.5 + torch.rand(n, generator=same, device=dev)
    h = torch.zeros(1, n, device=dev)
    parts = torch.zeros(8, 1, n, device=dev)
    comm.reduce_add_rms_norm(ops, h, parts[0], w, eps)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [comm.reduce_add_rms_norm(ops, h, parts[i], w, eps, out_dtype=torch.bfloat16)[1] for i in range(8)]
    base = (torch.arange(8 * n, device=dev) % 5).reshape(8, 1, n).float()
    for it in range(500):
        h.fill_(float(it % 13))
        parts.copy_(base + (it % 97) + comm.rank)
        graph.replay()
        want = (it % 13) + (comm.world_size * (base + (it % 97)) + sum(range(comm.world_size))).sum(0)
        if not torch.equal(h, want):
            raise AssertionError(f"replay {it}: wrong residual")
        if not torch.equal(outs[-1], ops.rms_norm(h, w, eps, torch.bfloat16)):
            raise AssertionError(f"replay {it}: wrong norm")
    torch.cuda.synchronize()
    del graph


if __name__ == "__main__":
    main()
