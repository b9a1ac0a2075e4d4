"""The runtime's all-reduce paths (tpruntime/comm.py) on 2 GPUs of one host: NCCL, torch's
symmetric-memory one-shot and our one-shot kernel against NCCL's own result, eagerly and over thousands of CUDA-graph
replays, and the tokens of a TP 2 run under each. Needs nvidia-h200-x2; skipped elsewhere (the
mode selection and its errors are tested on CPU ranks in test_tp.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs of one host (nvidia-h200-x2)")]

WORKER = Path(__file__).with_name("allreduce_worker.py")


def env():
    # NVLink multicast stays off on these machines (HARDWARE.md)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("mode", ["nccl", "symm-mem", "one-shot"])
@pytest.mark.parametrize("reduce_type", ["f32", "bf16"])
def test_all_reduce_equals_nccl(mode, reduce_type):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(WORKER), mode, reduce_type], capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0 and r.stdout.count("ok rank") == 2, (r.stdout[-2000:], r.stderr[-3000:])


def test_tp2_tokens_under_each_all_reduce(tiny_models):
    ids = {}
    for mode in ("nccl", "symm-mem", "one-shot", "auto"):
        r = subprocess.run([sys.executable, "-m", "tpruntime", "launch", "--nproc-per-node", "2", "generate",
                            "-m", str(tiny_models["tiny-qwen3"]), "-p", "the quick brown fox", "-n", "24",
                            "--temp", "0", "-c", "96", "--device", "cuda", "--dtype", "f32", "--print-ids",
                            "--all-reduce", mode], capture_output=True, text=True, timeout=300, env=env())
        assert r.returncode == 0, r.stderr[-3000:]
        ids[mode] = next(ln for ln in r.stderr.splitlines() if ln.startswith("ids: "))
    assert ids["symm-mem"] == ids["one-shot"] == ids["nccl"] == ids["auto"]
