"""The runtime's all-reduce paths (tpruntime/comm.py) on 2 GPUs of one host: NCCL, torch's
symmetric-memory one-shot and our one-shot kernel against NCCL's own result, eagerly and over thousands of CUDA-graph
replays, and the tokens of a TP 2 run under each. Needs nvidia-h200-x2; skipped elsewhere (the
mode selection and its errors are tested on CPU ranks in test_tp.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs of one host (nvidia-h200-x2)")]

WORKER = Path(__file__).with_name("allreduce_worker.py")


def run(cmd: list[str], timeout: float = 240, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """cmd in its own process group, all of it killed at the time limit: torchrun's workers
    hold the output pipes, so killing torchrun alone would leave the test waiting on them."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env(), **(extra_env or {})},
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        err += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def env():
    # NVLink multicast stays off on these machines (HARDWARE.md)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# torch's one-shot op has no f16 kernel: --all-reduce symm-mem -grt f16 stops with one line
@pytest.mark.parametrize("mode,reduce_type", [(m, t) for m in ("nccl", "symm-mem", "one-shot")
                                              for t in ("f32", "bf16", "f16") if (m, t) != ("symm-mem", "f16")])
def test_all_reduce_equals_nccl(mode, reduce_type):
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(WORKER), mode, reduce_type])
    assert r.returncode == 0 and r.stdout.count("ok rank") == 2, (r.stdout[-2000:], r.stderr[-3000:])


def test_a_silent_peer_ends_the_wait():
    """A rank whose peer never joins the all-reduce (dead or stuck elsewhere) does not wait
    forever on the GPU: the kernel gives up after the timeout, and the host reads a lost peer."""
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(WORKER), "silent-peer"], extra_env={"TPRUNTIME_AR_TIMEOUT_S": "3"}, timeout=120)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "rank 0: lost peer True: a peer sent nothing to the all-reduce for 3 s" in r.stdout, r.stdout[-2000:]


def test_all_reduce_ending_in_the_norm_equals_the_two_kernels():
    """TPRUNTIME_FUSED_AR=1: the worker also checks comm.reduce_add_rms_norm (all-reduce, add
    and norm in one kernel) against the all-reduce followed by the fused add + norm."""
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(WORKER), "one-shot", "f32"], extra_env={"TPRUNTIME_FUSED_AR": "1"})
    assert r.returncode == 0 and r.stdout.count("all-reduce + add + norm ok") == 2, (r.stdout[-2000:],
                                                                                     r.stderr[-3000:])


def test_tp2_tokens_under_each_all_reduce(tiny_models):
    ids = {}
    for mode in ("nccl", "symm-mem", "one-shot", "auto", "fused"):
        r = run([sys.executable, "-m", "tpruntime", "launch", "--nproc-per-node", "2", "generate",
                 "-m", str(tiny_models["tiny-qwen3"]), "-p", "the quick brown fox", "-n", "24",
                 "--temp", "0", "-c", "96", "--device", "cuda", "--dtype", "f32", "--print-ids",
                 "--all-reduce", "one-shot" if mode == "fused" else mode],
                extra_env={"TPRUNTIME_FUSED_AR": "1"} if mode == "fused" else None)
        assert r.returncode == 0, r.stderr[-3000:]
        ids[mode] = next(ln for ln in r.stderr.splitlines() if ln.startswith("ids: "))
    assert ids["symm-mem"] == ids["one-shot"] == ids["nccl"] == ids["auto"] == ids["fused"]
