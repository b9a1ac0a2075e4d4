"""Speed of tpruntime.kernels.attention.decode_attention on a CUDA device, beside torch SDPA.

Per-rank shapes of qwen3-8b (32 query / 8 KV heads; TP2: 16/4) and qwen3-32b (64/8; TP2: 32/4),
head_dim 128, a bf16 cache of n_ctx = 32768 positions, at n_keys 512, 4096 and 32768. For each:
µs per call and GB/s of the K+V bytes that are needed (n_kv * n_keys * (d + dv) * 2), for

  split-k      decode_attention (default plan: tl.dot over the padded query-head group)
  split-k fma  decode_attention(dot=False) (broadcast f32 FMAs)
  sdpa         F.scaled_dot_product_attention over exactly the valid keys (enable_gqa, no mask)
  sdpa bucket  what layers.Attention does today in a captured step: a power-of-two bucket of keys
               (>= 256), KV heads copied out per query head, and a boolean mask

Every number is the replay of one CUDA graph holding one call per "layer", over as many layers'
caches as make > 200 MB of distinct K/V reads (so L2, 50 MB on H100, does not serve them), as a
decode step sees it. Each case is also checked against float64 attention.

    python3 scripts/bench_attention.py            # the table
    python3 scripts/bench_attention.py --sweep    # split-k at other split counts / pipeline depths

Writes attention.json and attention.md under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [("qwen3-8b", 32, 8, 128), ("qwen3-8b TP2", 16, 4, 128),
          ("qwen3-32b", 64, 8, 128), ("qwen3-32b TP2", 32, 4, 128)]
EXTRA = [("gemma3 d256", 8, 4, 256), ("mha", 16, 16, 128)]  # --all
N_KEYS = [512, 4096, 32768]
N_CTX = 32768
HBM = {"H200": 4.8e12, "H100": 3.35e12}  # spec; the %-column is of this
DISTINCT_BYTES = 200e6  # K/V bytes one replay reads from distinct layers (> 4x L2)
CACHE_BUDGET = 24e9  # bytes of caches allocated at once
DEV = "cuda"


def load_attention():
    from tpruntime.kernels import attention
    return attention


def graph_us(calls: list, reps: int) -> float:
    """Median µs per call of a CUDA graph replaying `calls` once each."""
    for c in calls:  # compile / pick kernels outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def bench_shape(A, name: str, n_head: int, n_kv: int, d: int, reps: int, variants: dict,
                baselines: bool = True) -> list[dict]:
    """variants: label -> dict(kw=decode_attention keywords, and optionally pps / stages: the
    module's PROGRAMS_PER_SM / NUM_STAGES while that variant is compiled and captured)."""
    dev = torch.device(DEV)
    dt = torch.bfloat16
    layer_bytes = n_kv * N_CTX * 2 * d * 2
    scale = d ** -0.5
    group = n_head // n_kv
    kv_of_q = torch.arange(n_head, device=dev) // group
    rows = []
    for n in N_KEYS:
        need = n_kv * n * 2 * d * 2
        n_layers = max(1, min(math.ceil(DISTINCT_BYTES / need), int(CACHE_BUDGET // layer_bytes)))
        g = torch.Generator(device=dev).manual_seed(n)
        ks = [torch.randn(n_kv, N_CTX, d, device=dev, dtype=dt, generator=g) for _ in range(n_layers)]
        vs = [torch.randn(n_kv, N_CTX, d, device=dev, dtype=dt, generator=g) for _ in range(n_layers)]
        q = (2 * torch.randn(n_head, d, device=dev, generator=g)).to(dt)
        n_keys = torch.tensor([n], device=dev, dtype=torch.int64)
        ref = A.decode_attention_reference(q, ks[0], vs[0], n, scale)
        row = dict(shape=name, n_head=n_head, n_kv=n_kv, head_dim=d, n_keys=n, layers=n_layers, need_bytes=need)

        for label, var in variants.items():
            base = A.PROGRAMS_PER_SM, A.NUM_STAGES
            A.PROGRAMS_PER_SM, A.NUM_STAGES = var.get("pps", base[0]), var.get("stages", base[1])
            kw = var.get("kw", {})
            try:
                err = rel_err(A.decode_attention(q, ks[0], vs[0], n_keys, scale, **kw), ref)
                us = graph_us([lambda k=k, v=v: A.decode_attention(q, k, v, n_keys, scale, **kw)
                               for k, v in zip(ks, vs)], reps)
                row[label] = dict(us=us, err=err)
            except Exception as e:  # keep the other columns
                row[label] = dict(error=f"{type(e).__name__}: {e}"[:200])
            finally:
                A.PROGRAMS_PER_SM, A.NUM_STAGES = base
        if not baselines:
            rows.append(row)
            print(f"{row['shape']:<14} n_keys {n:>6} " + " ".join(
                f"{row[c]['us']:7.1f}" if "us" in row[c] else "  error" for c in variants), flush=True)
            continue

        q4 = q.view(1, n_head, 1, d)
        try:
            out = F.scaled_dot_product_attention(q4, ks[0][None, :, :n], vs[0][None, :, :n], scale=scale,
                                                 enable_gqa=True)
            err = rel_err(out.view(n_head, d).float(), ref)
            us = graph_us([lambda k=k, v=v: F.scaled_dot_product_attention(
                q4, k[None, :, :n], v[None, :, :n], scale=scale, enable_gqa=True) for k, v in zip(ks, vs)], reps)
            row["sdpa"] = dict(us=us, err=err)
        except Exception as e:
            row["sdpa"] = dict(error=f"{type(e).__name__}: {e}"[:200])

        bucket = min(N_CTX, max(256, 1 << (n - 1).bit_length()))
        pos = torch.tensor([n - 1], device=dev)
        k_pos = torch.arange(bucket, device=dev)

        def bucketed(k, v):
            mask = (k_pos[None, :] <= pos[:, None])[None, None]
            return F.scaled_dot_product_attention(q4, k[:, :bucket][kv_of_q][None], v[:, :bucket][kv_of_q][None],
                                                  attn_mask=mask, scale=scale)
        try:
            err = rel_err(bucketed(ks[0], vs[0]).view(n_head, d).float(), ref)
            n_b = max(1, min(n_layers, math.ceil(DISTINCT_BYTES / (n_kv * bucket * 4 * d))))
            us = graph_us([lambda k=k, v=v: bucketed(k, v) for k, v in zip(ks[:n_b], vs[:n_b])], reps)
            row["sdpa bucket"] = dict(us=us, err=err, bucket=bucket)
        except Exception as e:
            row["sdpa bucket"] = dict(error=f"{type(e).__name__}: {e}"[:200])
        rows.append(row)
        del ks, vs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(fmt_row(row, list(variants) + ["sdpa", "sdpa bucket"]), flush=True)
    return rows


def peak() -> float | None:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM.items() if key in name), None)


def cell(r: dict, need: int) -> str:
    if "error" in r:
        return "error"
    s = f"{r['us']:8.1f} µs {need / r['us'] / 1e3:6.0f} GB/s"
    if (bw := peak()) is not None:
        s += f" {100 * need / (r['us'] * 1e-6) / bw:3.0f}%"
    return s + (" !" if r["err"] > 2e-2 else "")


def fmt_row(row: dict, cols: list[str]) -> str:
    head = f"{row['shape']:<14} {row['n_head']:>3}/{row['n_kv']:<2} n_keys {row['n_keys']:>6}"
    return head + "".join(f" | {cell(row[c], row['need_bytes'])}" for c in cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--all", action="store_true", help="also a head_dim-256 and an MHA shape")
    ap.add_argument("--sweep", action="store_true", help="split-k at other split counts and pipeline depths")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA device")
    A = load_attention()
    import triton
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; n_ctx {N_CTX} bf16; PROGRAMS_PER_SM {A.PROGRAMS_PER_SM}, "
          f"NUM_STAGES {A.NUM_STAGES}")
    variants = {"split-k": {}, "split-k fma": dict(kw=dict(dot=False))}
    cols = list(variants) + ["sdpa", "sdpa bucket"]
    print("columns: " + " | ".join(cols) + "   (% of spec HBM bandwidth; ! = rel err > 2e-2)")
    rows = []
    for shape in SHAPES + (EXTRA if args.all else []):
        rows += bench_shape(A, *shape, args.reps, variants)

    sweep = []
    if args.sweep:
        grid = {f"pps{pps}/st{st}": dict(pps=pps, stages=st) for pps in (2, 3, 4, 8, 16) for st in (2, 3, 4)}
        print("\nsweep (split-k, µs per call): " + " | ".join(grid))
        for shape in SHAPES:
            sweep += bench_shape(A, *shape, args.reps, grid, baselines=False)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(dict(device=props.name, rows=rows, sweep=sweep), indent=1))
    lines = ["| shape | heads | n_keys | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for r in rows:
        cells = [cell(r[c], r["need_bytes"]).replace("  ", " ").strip() for c in cols]
        lines.append(f"| {r['shape']} | {r['n_head']}/{r['n_kv']} | {r['n_keys']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    (out / "attention.md").write_text(md + "\n")
    print()
    print(md)


if __name__ == "__main__":
    main()
