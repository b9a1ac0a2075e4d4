"""The first-call cost of a new prompt length in torch's SDPA on a CUDA device: the causal
attention of a depth-0 prompt chunk (qwen3-32b per-rank heads: 64 query / 8 KV, head_dim 128,
bf16), through SDPA's own choice of kernel (cuDNN on Hopper, which builds an execution plan per
new shape) and through the FA2 flash kernel (no plan).

For each prompt length T, in this order: ms of the first call at that T, and the median ms of 10
calls after it (each call synchronized, so a call's time includes its launch).

    python3 scripts/bench_sdpa_first_call.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

LENGTHS = [37, 53, 101, 517, 1000, 2048, 2049]


def ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| T | SDPA first | SDPA warm | FA2 first | FA2 warm |")
    print("|---|---|---|---|---|")
    hq, hkv, d = 64, 8, 128
    for T in LENGTHS:
        q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16).transpose(0, 1)[None]
        k = torch.randn(hkv, T, d, device="cuda", dtype=torch.bfloat16)[None]
        v = torch.randn(hkv, T, d, device="cuda", dtype=torch.bfloat16)[None]

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def fa2():
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)[0]

        row = [f"{T}"]
        for fn in (sdpa, fa2):
            first = ms(fn)
            warm = statistics.median(ms(fn) for _ in range(10))
            row += [f"{first:.2f}", f"{warm:.3f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
