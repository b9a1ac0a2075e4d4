"""sweep-bench: llama-sweep-bench's rows and formats, on one rank and under launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def tp(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tpruntime", *map(str, args)], capture_output=True,
                          text=True, timeout=240, env=env)


def test_markdown_rows_follow_sweep_bench(tiny_models):
    r = tp("sweep-bench", "-m", tiny_models["tiny-qwen3"], "-c", 64, "-ub", 16, "-n", 4, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split("|")[1:-1] == [" PP ".rjust(7), " TG ".rjust(8), " N_KV ".rjust(8), "   T_PP s ",
                                        " S_PP t/s ", "   T_TG s ", " S_TG t/s "]
    rows = [ln.split("|")[1:-1] for ln in lines[2:]]
    assert [int(r[2]) for r in rows] == [0, 16, 32, 48]  # N_KV = 0, ub, 2ub, ... while N_KV + ub <= c
    assert all(int(r[0]) == 16 and int(r[1]) == 4 and float(r[4]) > 0 and float(r[6]) > 0 for r in rows)


@pytest.mark.parametrize("ranks", [1, 2])
def test_json_and_csv(tiny_models, ranks):
    args = ["sweep-bench", "-m", tiny_models["tiny-gemma3"], "-c", 48, "-ub", 16, "-n", 3, "--device", "cpu"]
    r = tp(*args, "--output", "json") if ranks == 1 else tp("launch", "--nproc-per-node", 2, *args, "--output", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ranks"] == ranks and [row["N_KV"] for row in out["rows"]] == [0, 16, 32]
    assert out["prefill_copy_bytes"] == 0 and out["dense_prefill"] == "0"  # (copies only where matrices stay quantized)
    assert all(abs(row["S_TG"] * row["T_TG"] - 3) < 1e-6 for row in out["rows"])
    r = tp(*args, "--output", "csv")
    assert r.stdout.splitlines()[0] == "PP,TG,N_KV,T_PP,S_PP,T_TG,S_TG" and len(r.stdout.splitlines()) == 4


def test_bad_sweep_arguments(tiny_models):
    r = tp("sweep-bench", "-m", tiny_models["tiny-qwen3"], "-c", 8, "-ub", 16, "--device", "cpu")
    assert r.returncode == 2 and "-ub 16 is larger than the context" in r.stderr
    r = tp("sweep-bench", "-m", tiny_models["tiny-qwen3"], "-b", 8, "-ub", 16, "--device", "cpu")
    assert r.returncode == 2 and "-b 8 must be >= -ub 16" in r.stderr
