"""kernels/allreduce.py compiled and run on one GPU: two ranks as two CUDA streams of one
process, each with its own buffer in device memory, so the kernels of both run at once and wait
for each other's values as on two GPUs (without NVLink: the 2-GPU tests in test_allreduce.py
check that). Large messages make the programs loop over chunks; a rank left alone must end
its wait with a trap after the timeout. Runs on any CUDA machine; skipped on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

WORLD = 2


def ranks(dtype: torch.dtype, max_elems: int):
    from tpruntime.kernels.allreduce import PeerBuffers
    n_buf, n_counters = PeerBuffers.sizes(max_elems, WORLD)
    bufs = [PeerBuffers.fill_unwritten(torch.empty(n_buf, dtype=dtype, device="cuda")) for _ in range(WORLD)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device="cuda")
    return [PeerBuffers(bufs[r], ptrs, torch.zeros(n_counters, dtype=torch.int64, device="cuda"), r, WORLD)
            for r in range(WORLD)]


class _CompileOnly:
    """Stands for the kernel so that a call compiles it and loads it without launching it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel.warmup(*args, grid=grid, **kw)._init_handles()


def together(peers, xs):
    """Both ranks' calls launched at once, each on its own stream. Each rank's kernel is compiled
    and loaded first: loading a module waits for the running kernels, and a rank's kernel runs
    until its peer's arrives."""
    from tpruntime.kernels import allreduce
    streams = [torch.cuda.Stream() for _ in peers]
    kernel = allreduce._one_shot_kernel
    allreduce._one_shot_kernel = _CompileOnly(kernel)
    try:
        for p, x in zip(peers, xs):
            allreduce.one_shot_all_reduce(x, p)
    finally:
        allreduce._one_shot_kernel = kernel
    outs = []
    torch.cuda.synchronize()
    for p, x, s in zip(peers, xs, streams):
        with torch.cuda.stream(s):
            outs.append(allreduce.one_shot_all_reduce(x, p))
    torch.cuda.synchronize()
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_streams_sum_every_size(dtype):
    big = 16 << 20  # 64 MB of f32: more chunks than the GPU holds programs
    peers = ranks(dtype, big)
    g = torch.Generator(device="cuda").manual_seed(1)
    for it, n in enumerate([1, 5120, 5120, 1 << 20, big, 7, big - 3, 5120, 1000]):
        # small integers: exact in either wire dtype, so a stale slot or chunk shows
        xs = [(torch.randint(0, 50, (n,), generator=g, device="cuda") + it).float() for _ in range(WORLD)]
        outs = together(peers, xs)
        want = xs[0] + xs[1]
        for r, out in enumerate(outs):
            assert torch.equal(out, want), (r, n, it)
    unwritten = peers[0].unwritten
    assert all(bool((p.bits == unwritten).all()) for p in peers)  # every slot marked again


def test_a_rank_left_alone_traps():
    """Its peer never pushes: after TPRUNTIME_AR_TIMEOUT_S the kernel traps, and the error the
    host reads is taken for a lost peer (in a process of its own: a trap ends its CUDA context)."""
    code = """
import torch
from tpruntime import comm
from tpruntime.kernels.allreduce import one_shot_all_reduce
from test_allreduce_streams import ranks
comm._P2P_IN_USE = True
peers = ranks(torch.float32, 5120)
try:
    one_shot_all_reduce(torch.ones(5120, device="cuda"), peers[0])
    torch.cuda.synchronize()
    print("returned")
except Exception as e:
    print("lost", comm.is_comm_failure(e), comm.describe_comm_failure(e).splitlines()[0])
"""
    path = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TPRUNTIME_AR_TIMEOUT_S": "2", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "lost True: a peer sent nothing to the all-reduce for 2 s" in r.stdout, (r.stdout, r.stderr[-2000:])
