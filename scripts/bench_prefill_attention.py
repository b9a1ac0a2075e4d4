"""Prefill attention of a later prompt chunk on a CUDA device: T queries over the cache's first
S = depth + T keys, causal aligned to the bottom right (query i sees keys <= depth + i).

  flash br     what tpruntime.layers does today: torch's flash kernel (FA2), bottom-right causal
  cudnn split  cuDNN twice (the depth-key prefix without a mask, the T x T chunk causal, each
               with its log-sum-exp) and the two partial results merged by their log-sum-exps
               (tpruntime.kernels.prefill_attention), on the grouped KV heads as they are
  ... kv copied the same on KV heads copied out one per query head (the copy timed apart)
  merge only   the merge kernel alone
  cudnn causal for scale: cuDNN on the T x T chunk alone (what depth 0 costs)

Per-rank shapes of qwen3-32b (64 query / 8 KV heads) and qwen3-8b (32 / 8), head_dim 128, bf16.
Median µs of 20 calls after warm-up, TFLOP/s of the attention the causal mask keeps
(4 d H per kept query-key pair), and the largest difference from flash br (bf16 outputs).

    python3 scripts/bench_prefill_attention.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from tpruntime.kernels.prefill_attention import _cudnn, merge_partials, prefix_chunk_attention

CASES = [(64, 8, 2048, 2048), (64, 8, 2048, 6144), (64, 8, 512, 512), (64, 8, 512, 4096), (32, 8, 2048, 2048)]


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| Hq/Hkv | T | depth | variant | µs | TFLOP/s | max |diff| |")
    print("|---|---|---|---|---|---|---|")
    for hq, hkv, T, depth in CASES:
        d, S = 128, depth + T
        scale = d ** -0.5
        # [1, H, L, d] views of [L, H, d] memory, as layers.Attention hands them over
        q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16).transpose(0, 1)[None]
        k = torch.randn(hkv, S, d, device="cuda", dtype=torch.bfloat16)[None]
        v = torch.randn(hkv, S, d, device="cuda", dtype=torch.bfloat16)[None]
        kept = T * depth + T * (T + 1) / 2

        def flash():
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]

        def split():
            return prefix_chunk_attention(q, k, v, depth, scale)

        kx, vx = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)

        def split_x():
            return prefix_chunk_attention(q, kx, vx, depth, scale)

        def copy_kv():
            return k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)

        parts = [_cudnn(q, kx[:, :, :depth], vx[:, :, :depth], False, scale),
                 _cudnn(q, kx[:, :, depth:], vx[:, :, depth:], True, scale)]

        def merge():
            return merge_partials(*parts[0], *parts[1])

        def chunk():
            return F.scaled_dot_product_attention(q, k[:, :, depth:], v[:, :, depth:], is_causal=True, scale=scale,
                                                  enable_gqa=True)

        ref = flash().transpose(1, 2).reshape(T, hq * d)  # [1, H, T, d] -> [T, H * d]
        variants = (("flash br", flash, kept), ("cudnn split", split, kept), ("cudnn split, kv copied", split_x, kept),
                    ("kv copy", copy_kv, 0), ("merge only", merge, 0), ("cudnn causal (chunk only)", chunk, T * (T + 1) / 2))
        for name, fn, pairs in variants:
            try:
                us = timed(fn)
                out = fn()
                diff = float("nan")
                if name.startswith(("flash", "cudnn split")):
                    out = out if out.dim() == 2 else out.transpose(1, 2).reshape(T, hq * d)
                    diff = float((out.float() - ref.float()).abs().max())
                tf = f"{4 * d * hq * pairs / us / 1e6:.0f}" if pairs else ""
                print(f"| {hq}/{hkv} | {T} | {depth} | {name} | {us:.1f} | {tf} | {diff:.2e} |", flush=True)
            except Exception as e:  # a backend that refuses a shape: say which, go on
                print(f"| {hq}/{hkv} | {T} | {depth} | {name} | failed: {str(e).splitlines()[0][:150]} | | |", flush=True)

if __name__ == "__main__":
    main()
