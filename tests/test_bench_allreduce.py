"""scripts/bench_allreduce.py (the all-reduce latency harness for issue 13) on two gloo ranks:
it runs under torchrun, checks every sum exactly and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_cpu_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "scripts" / "bench_allreduce.py"), "--device", "cpu", "--sizes", "4", "1K",
                        "--reduce-type", "f32", "bf16", "--iters", "3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "allreduce.json").read_text())
    assert [(x["bytes"], x["reduce"]) for x in rows] == [(4, "f32"), (1024, "f32"), (4, "bf16"), (1024, "bf16")]
    assert all(x["runtime_exact"] and x["ranks"] == 2 and x["runtime_us"] > 0 for x in rows)
    assert "| 1024 | bf16 |" in (tmp_path / "allreduce.md").read_text()
