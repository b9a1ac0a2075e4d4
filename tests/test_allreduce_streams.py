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


def ranks(dtype: torch.dtype, max_elems: int, unit: int = 1024):
    from tpruntime.kernels.allreduce import PeerBuffers
    n_buf, n_counters = PeerBuffers.sizes(max_elems, WORLD, unit)
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

    def warmup(self, *args, **kw):
        return self.kernel.warmup(*args, **kw)


def together(peers, calls, name="_one_shot_kernel"):
    """calls[r]: rank r's calls (functions of its PeerBuffers), launched one after another on its
    own stream with no synchronization between them, while the other rank's run on another:
    consecutive calls overlap as in a decode step. Each rank's kernel (allreduce.<name>) is
    compiled and loaded first: loading a module waits for the running kernels, and a rank's
    kernel runs until its peer's values arrive. Returns each rank's results."""
    from tpruntime.kernels import allreduce
    streams = [torch.cuda.Stream() for _ in peers]
    kernel = getattr(allreduce, name)
    setattr(allreduce, name, _CompileOnly(kernel))
    try:  # (every call: a message size may be a variant of its own, e.g. a size of 1)
        for p, rank_calls in zip(peers, calls):
            for call in rank_calls:
                call(p)
    finally:
        setattr(allreduce, name, kernel)
    outs = [[] for _ in peers]
    torch.cuda.synchronize()
    for p, rank_calls, s, out in zip(peers, calls, streams, outs):
        with torch.cuda.stream(s):
            for call in rank_calls:
                out.append(call(p))
    torch.cuda.synchronize()
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_streams_sum_every_size(dtype):
    from tpruntime.kernels.allreduce import one_shot_all_reduce
    big = 16 << 20  # 64 MB of f32: more chunks than the GPU holds programs
    peers = ranks(dtype, big)
    g = torch.Generator(device="cuda").manual_seed(1)
    sizes = [5120, 1, 5120, 5120, 1 << 20, big, 7, big - 3, 5120, 1000, 5120, 5120]
    # small integers: exact in either wire dtype, so a stale slot or chunk shows
    xs = [[(torch.randint(0, 50, (n,), generator=g, device="cuda") + it).float() for _ in range(WORLD)]
          for it, n in enumerate(sizes)]
    outs = together(peers, [[lambda p, x=x[r]: one_shot_all_reduce(x, p) for x in xs] for r in range(WORLD)])
    for it, x in enumerate(xs):
        for r in range(WORLD):
            assert torch.equal(outs[r][it], x[0] + x[1]), (r, sizes[it], it)
    unwritten = peers[0].unwritten
    assert all(bool((p.bits == unwritten).all()) for p in peers)  # every slot marked again


def test_two_streams_all_reduce_add_rms_norm():
    """The all-reduce ending in the residual add and the next norm (TPRUNTIME_FUSED_AR), compiled:
    every rank's residual and normed row (and its int8 form) equal the plain all-reduce followed by
    the fused add + norm kernel, over repeated calls of both slots."""
    from tpruntime.kernels import fused
    from tpruntime.kernels.allreduce import MAX_ROWS, ROW, one_shot_add_rms_norm
    from tpruntime.qweight import Int8Request
    peers = ranks(torch.float32, MAX_ROWS * ROW, ROW)
    g = torch.Generator(device="cuda").manual_seed(2)
    cases = [(1, 5120, True), (1, 4096, False), (3, 5120, False), (1, 5120, True), (1, 5120, False)]
    inputs = []
    for rows, n, q8 in cases:
        h = torch.randn(rows, n, generator=g, device="cuda") * 3
        w = 0.5 + torch.rand(n, generator=g, device="cuda")
        parts = [torch.randn(rows, n, generator=g, device="cuda") for _ in range(WORLD)]
        inputs.append((h, w, parts, [h.clone() for _ in range(WORLD)], Int8Request(7) if q8 else None))
    calls = [[lambda p, r=r, c=c: one_shot_add_rms_norm(c[3][r], c[2][r], c[1], 1e-6, p, out_dtype=torch.bfloat16,
                                                        q8=c[4]) for c in inputs] for r in range(WORLD)]
    outs = together(peers, calls, "_one_shot_add_rms_norm_kernel")
    for it, (h, w, parts, hs, req) in enumerate(inputs):
        h_ref = h.clone()
        _, ref = fused.add_rms_norm(h_ref, parts[0] + parts[1], w, 1e-6, out_dtype=torch.bfloat16, q8=req)
        for r in range(WORLD):
            h_r, out = outs[r][it]
            assert torch.equal(h_r, h_ref), (it, r, "residual")
            for k in ("x", "xq", "xd", "xs") if req is not None else ():
                assert torch.equal(getattr(out, k), getattr(ref, k)), (it, r, k)
            assert req is not None or torch.equal(out, ref), (it, r, "normed")


def test_a_rank_left_alone_traps():
    """Its peer never pushes: after TPRUNTIME_AR_TIMEOUT_S the kernel traps, and the error the
    host reads is taken for a lost peer (in a process of its own: a trap ends its CUDA context)."""
    code = """
import torch
from tpruntime import comm
from tpruntime.kernels.allreduce import one_shot_all_reduce
from test_allreduce_streams import ranks
peers = ranks(torch.float32, 5120)
try:
    one_shot_all_reduce(torch.ones(5120, device="cuda"), peers[0])
    torch.cuda.synchronize()
    print("returned")
except Exception as e:
    print(f"lost {comm.is_comm_failure(e)}: {comm.describe_comm_failure(e).splitlines()[0]}")
"""
    path = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TPRUNTIME_AR_TIMEOUT_S": "2", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "lost True: a peer sent nothing to the all-reduce for 2 s" in r.stdout, (r.stdout, r.stderr[-2000:])
