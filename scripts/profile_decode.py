"""Where a decode step's GPU time goes: torch.profiler over eager decode steps (kernel time
by op), and the wall time per step with CUDA graphs, on one GPU. With --prefill UB it profiles
prefill chunks of UB tokens (at depth 0 and at --depth) instead.

    python scripts/profile_decode.py MODEL.gguf [--dtype bf16] [--depth 512] [--steps 20] [--no-profile]
    python scripts/profile_decode.py MODEL.gguf --prefill 2048 --depth 2048 [--dense-prefill auto]
    ncu --profile-from-start off ... python scripts/profile_decode.py MODEL.gguf --ncu
        (one eager decode step inside a profiler range, for Nsight Compute's per-kernel sections)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tpruntime.generate import prefill
from tpruntime.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-profile", action="store_true", help="only the wall times")
    ap.add_argument("--prefill", type=int, default=0, metavar="UB", help="profile prefill chunks of UB tokens")
    ap.add_argument("--dense-prefill", default=os.environ.get("DENSE_PREFILL", "0"),
                    help="as the CLI's flag: GiB of dequantized copies, or auto (default: $DENSE_PREFILL, for envab)")
    ap.add_argument("--ncu", action="store_true",
                    help="after warm-up, one eager decode step between cudaProfilerStart/Stop (run under ncu)")
    a = ap.parse_args()
    if a.prefill:
        return profile_prefill(a)
    lm = load_model(a.model, n_ctx=a.depth + 2 * a.steps + 8, device="cuda", dtype=a.dtype, progress=False)
    prompt = torch.randint(0, lm.cfg.n_vocab, (a.depth,)).tolist()
    prefill(lm, prompt, 2048)
    tok = torch.tensor([1])
    if a.ncu:
        for i in range(3):
            lm.forward(tok, a.depth + i)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        lm.forward(tok, a.depth + 3)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    for mode in ("graphs", "eager"):
        lm.use_cuda_graphs(mode == "graphs")
        for i in range(3):
            lm.forward(tok, a.depth + i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.steps):
            lm.forward(tok, a.depth + i)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.steps
        print(f"{mode}: {dt * 1e3:.2f} ms/token ({1 / dt:.1f} t/s) at depth {a.depth}")
    if a.no_profile:
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(a.steps):
            lm.forward(tok, a.depth + i)
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()) / a.steps
    print(f"eager: GPU kernel time {total / 1e3:.2f} ms/token")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


def profile_prefill(a) -> None:
    ub = a.prefill
    lm = load_model(a.model, n_ctx=a.depth + ub + 8, device="cuda", dtype=a.dtype, progress=False,
                    dense_prefill=a.dense_prefill, n_ubatch=ub)
    lm.warm_prefill(ub)  # as the engine does: chunks of ub tokens at position 0 take SDPA's warmed plan
    print(lm.memory_report())
    chunk = torch.randint(0, lm.cfg.n_vocab, (ub,))
    for pos in (0, a.depth, 0, a.depth):  # the first two compile and warm up
        t0 = time.perf_counter()
        lm.forward(chunk, pos)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"prefill {ub} tokens at depth {pos}: {dt * 1e3:.1f} ms ({ub / dt:.0f} t/s)")
    if a.no_profile:
        return
    for pos in (0, a.depth):
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            lm.forward(chunk, pos)
            torch.cuda.synchronize()
        total = sum(e.self_device_time_total for e in prof.key_averages())
        print(f"prefill at depth {pos}: GPU kernel time {total / 1e3:.2f} ms")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
