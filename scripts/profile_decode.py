"""Where a decode step's GPU time goes: torch.profiler over eager decode steps (kernel time
by op), and the wall time per step with CUDA graphs, on one GPU.

    python scripts/profile_decode.py MODEL.gguf [--dtype bf16] [--depth 512] [--steps 20] [--no-profile]
"""

from __future__ import annotations

import argparse
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
    a = ap.parse_args()
    lm = load_model(a.model, n_ctx=a.depth + 2 * a.steps + 8, device="cuda", dtype=a.dtype, progress=False)
    prompt = torch.randint(0, lm.cfg.n_vocab, (a.depth,)).tolist()
    prefill(lm, prompt, 2048)
    tok = torch.tensor([1])
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


if __name__ == "__main__":
    main()
