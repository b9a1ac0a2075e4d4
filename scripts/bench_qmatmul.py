"""Prefill matmuls on a CUDA device: tpruntime.kernels.qmatmul (dequantizing in the K loop) against
the dequantize-into-scratch + cuBLAS path (tpruntime.qweight with the fused kernel off) and against
cuBLAS on an already dequantized bf16 weight (the ceiling: no dequantization at all).

For each weight shape (n_out x k_in, Q4_K by default) and token count M: median ms per call
(triton.testing.do_bench, L2 flushed), TFLOP/s = 2 M n_out k_in / time and its share of the bf16
dense peak (--peak, 989 TFLOP/s for an H100/H200 SXM). With --sweep every configuration of SWEEP
is timed too, and each one is checked against the bf16 cuBLAS product on the real shape.

    python scripts/bench_qmatmul.py                       # qwen3-32b's and qwen3-8b's matrices, M 512 2048
    python scripts/bench_qmatmul.py --sweep --shapes 51200x5120 --tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import numpy as np
import torch

SHAPES = ["10240x5120", "5120x8192", "51200x5120", "5120x25600",   # qwen3-32b: qkv, o, gate|up, down
          "6144x4096", "4096x4096", "24576x4096", "4096x12288"]    # qwen3-8b
SWEEP = [dict(BM=128, BN=128, GS=1, num_warps=8, num_stages=3), dict(BM=128, BN=128, GS=2, num_warps=8, num_stages=3),
         dict(BM=128, BN=128, GS=1, num_warps=4, num_stages=3), dict(BM=64, BN=128, GS=1, num_warps=4, num_stages=3),
         dict(BM=128, BN=64, GS=1, num_warps=4, num_stages=3), dict(BM=256, BN=128, GS=1, num_warps=8, num_stages=3),
         dict(BM=128, BN=256, GS=1, num_warps=8, num_stages=3), dict(BM=64, BN=64, GS=2, num_warps=4, num_stages=4),
         dict(BM=128, BN=128, GS=1, num_warps=8, num_stages=4), dict(BM=128, BN=128, GS=1, num_warps=8, num_stages=2),
         dict(BM=256, BN=64, GS=2, num_warps=8, num_stages=3), dict(BM=64, BN=256, GS=1, num_warps=8, num_stages=3),
         dict(BM=128, BN=256, GS=2, num_warps=8, num_stages=2), dict(BM=256, BN=128, GS=2, num_warps=8, num_stages=2)]
SWEEP += [dict(c, W_LEFT=False) for c in SWEEP[:8]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--tokens", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--peak", type=float, default=989.0, help="bf16 dense TFLOP/s of the device")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep-max", type=int, default=len(SWEEP), help="time only the first N configurations of SWEEP")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds after which the sweep stops timing new configurations (0: none), so a call "
                         "with a hard time limit still writes its tables and best configuration")
    args = ap.parse_args()
    t_start = time.monotonic()

    import triton
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as Q

    from tpruntime import qweight
    from tpruntime.kernels.dequant import dequantize_rows
    from tpruntime.kernels.qmatmul import default_config, qmatmul
    from tpruntime.quants import random_blocks

    qt = Q[args.type]
    dev = torch.device("cuda")
    rows, results = [], []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        raw = torch.from_numpy(random_blocks(qt, n * k // GGML_QUANT_SIZES[qt][0],
                                             np.random.default_rng(0)).reshape(n, -1)).to(dev)
        wq = qweight.QuantWeight(raw, qt, n, k, torch.bfloat16)
        wd = dequantize_rows(raw, qt, n, k, dtype=torch.bfloat16)
        for m in args.tokens:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            flop = 2.0 * m * n * k

            def dense_mm():
                return torch.mm(x, wd.t(), out_dtype=torch.float32) if qweight.F32_OUT else (x @ wd.t()).float()

            ref = dense_mm()
            scale = float(ref.abs().max())

            def tf(ms):
                return flop / ms / 1e9

            def add(label, fn, cfg=None):
                try:
                    y = fn()
                    err = float((y - ref).abs().max()) / scale
                    ms = triton.testing.do_bench(fn, warmup=5, rep=40)
                except Exception as e:  # a config that does not compile is a row, not the end
                    traceback.print_exc()
                    rows.append(f"| {shape} | {m} | {label} | failed: {type(e).__name__} | | | |")
                    return
                ok = "ok" if err < 2e-3 else f"BAD {err:.1e}"
                rows.append(f"| {shape} | {m} | {label} | {ms:.3f} | {tf(ms):.0f} | {100 * tf(ms) / args.peak:.1f}% | {ok} |")
                results.append(dict(shape=shape, m=m, label=label, cfg=cfg, ms=ms, tflops=tf(ms), err=err))
                print(rows[-1], flush=True)

            saved = qweight.QMATMUL_MAX_TOKENS
            qweight.QMATMUL_MAX_TOKENS = 0
            add("dequant+cuBLAS", lambda: wq(x))
            qweight.QMATMUL_MAX_TOKENS = saved
            add("cuBLAS bf16 (no dequant)", dense_mm)
            add(f"qmatmul default {default_config(qt, n, k, m)}", lambda: qmatmul(x, raw, qt, n, k))
            if args.sweep:
                for cfg in SWEEP[:args.sweep_max]:
                    if args.deadline and time.monotonic() - t_start > args.deadline:
                        print(f"deadline: {shape} M={m} {cfg} and later configurations not timed", flush=True)
                        continue
                    add(f"qmatmul {cfg}", lambda cfg=cfg: qmatmul(x, raw, qt, n, k, config=cfg), cfg)
    head = "| shape | M | path | ms | TFLOP/s | % peak | check |\n|---|---|---|---|---|---|---|"
    table = "\n".join([head] + rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "qmatmul.md"), "w") as f:
        f.write(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}\n\n{table}\n")
    with open(os.path.join(args.out, "qmatmul.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table)
    # the configuration with the least time summed over the shapes at the first M (what a prefill
    # chunk of that size pays), for TPRUNTIME_QMATMUL_CONFIG in a whole-model run
    m0 = args.tokens[0]
    sums = {}
    for r in results:
        if r["cfg"] is not None and r["m"] == m0 and r["err"] < 2e-3:
            sums.setdefault(json.dumps(r["cfg"], separators=(",", ":")), []).append(r["ms"])
    full = {c: sum(v) for c, v in sums.items() if len(v) == len(args.shapes)}
    if full:
        best = min(full, key=full.get)
        with open(os.path.join(args.out, "best-config.json"), "w") as f:
            f.write(best)
        print(f"best overall at M={m0}: {best} {full[best]:.3f} ms summed over {len(args.shapes)} shapes")
    # per shape and M: the fastest qmatmul configuration against the two cuBLAS paths
    for key in dict.fromkeys((r["shape"], r["m"]) for r in results):
        rs = [r for r in results if (r["shape"], r["m"]) == key]
        base = {r["label"]: r["ms"] for r in rs if not r["label"].startswith("qmatmul")}
        fused = [r for r in rs if r["label"].startswith("qmatmul") and r["err"] < 2e-3]
        if fused:
            b = min(fused, key=lambda r: r["ms"])
            print(f"best {key[0]} M={key[1]}: qmatmul {b['ms']:.3f} ms ({b['tflops']:.0f} TFLOP/s) {b['cfg']} | "
                  f"dequant+cuBLAS {base.get('dequant+cuBLAS', 0):.3f} | cuBLAS bf16 {base.get('cuBLAS bf16 (no dequant)', 0):.3f}")


if __name__ == "__main__":
    main()
