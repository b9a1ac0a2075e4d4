"""Bandwidth of tpruntime.kernels.gemv.qgemv on a CUDA device, against cuBLAS bf16 GEMV.

For each quant type and weight shape (n_out x k_in): median time per call, GB/s = weight bytes /
time, % of the HBM bandwidth (H200 4.28 TB/s measured, H100 3.35 TB/s spec) and torch bf16
`x @ W.T` (cuBLAS) on the same shape. The weights rotate among buffers of > 4x L2 in total. The
main number replays a CUDA graph of >= 32 calls (kernel time, as a graph-captured decode step
sees it); `triton.testing.do_bench` (median, L2 flushed before each run) is reported beside it for
the default configs: at these sizes it also counts the host launch, which it cannot hide.
Every default configuration (and every swept one on the first shape) is checked against a
float64 reference at the real shape.

    python scripts/bench_kernels.py                  # default configs, T=1, bf16 x
    python scripts/bench_kernels.py --sweep          # tile configs per type, best one per shape
    python scripts/bench_kernels.py --tokens 1 2 4 8 --xdtype f32 --jobs 16
    python scripts/bench_kernels.py --dequant        # dequantize_rows instead (prefill path)
    python scripts/bench_kernels.py --q8 --types Q4_K --sweep   # qgemv_q8 (int8 x), T=1
    python scripts/bench_kernels.py --dequant --sweep --odtype bf16 f32 --peak 3.35

Kernels compile first in --jobs worker processes (into Triton's on-disk cache); the markdown
table comes last. Writes bench.json and bench.md under --out (default $OUT or .).

--dequant times tpruntime.kernels.dequant.dequantize_rows into one reused output buffer (as the
prefill scratch is) over the same types and shapes: GB/s = (quant bytes read + output bytes
written) / time, as % of the HBM reference (--peak overrides it) and of the measured copy
bandwidth. Each default configuration is checked bit for bit against tpruntime.quants at the
real shape. Writes dequant.json and dequant.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288), (25600, 5120), (5120, 25600)]
TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0"]
HBM = {"H200": 4.28e12, "H100": 3.35e12}
L2_ROTATE = 200e6  # bytes of distinct weight buffers to cycle through per timed case (L2: 50 MB)

# --sweep: configurations per type family, as overrides of default_config (kernels/gemv.py:
# ORD orders the tile's block / group / vector axes, BN rows per program, BB blocks per step,
# derived from the warps where not given).
SWEEP_K = [dict(BN=2), dict(ORD=1, num_warps=2), dict(BB=16), dict(num_warps=2), dict(BN=8),
           dict(ORD=1, num_warps=2, BN=2), dict(num_warps=4)]
SWEEP_6K = [dict(BN=2), dict(BN=8), dict(num_warps=2), dict(BB=8), dict(ORD=1), dict(num_warps=4)]
SWEEP_0 = [dict(BN=2), dict(ORD=1, num_warps=2), dict(BN=8), dict(num_warps=2), dict(BB=64),
           dict(BN=4, num_warps=4)]
# --q8 --sweep: overrides of kernels/gemv_q8.py default_config
SWEEP_Q8 = [dict(BN=2), dict(REP=1), dict(BN=8, REP=1), dict(BN=2, REP=4), dict(SPLIT_K=1), dict(SPLIT_K=2),
            dict(SPLIT_K=4), dict(num_warps=2, REP=1), dict(BN=8), dict(BN=2, SPLIT_K=4), dict(num_warps=2),
            dict(num_warps=4, REP=1), dict(BN=2, num_warps=2)]
SWEEP_T = [dict(BN=4, TG=2), dict(BN=2, TG=2), dict(BN=2, TG=4), dict(BN=4, TG=4)]
# --dequant --sweep: overrides of kernels/dequant.py default_config, as values per program
# (BB = VALUES / block size) and warps.
SWEEP_DEQUANT = [dict(VALUES=2048), dict(VALUES=8192), dict(VALUES=16384, num_warps=8),
                 dict(VALUES=8192, num_warps=8), dict(num_warps=2), dict(num_warps=8)]


def gemv_kernel():
    """The GEMV under test: qgemv, or qgemv_q8 with --q8 (an environment switch, so that the
    spawned compile workers take the same one)."""
    if os.environ.get("BENCH_Q8") == "1":
        from tpruntime.kernels.gemv_q8 import qgemv_q8
        return qgemv_q8
    from tpruntime.kernels.gemv import qgemv
    return qgemv


def sweep_for(qname: str) -> list[dict]:
    return SWEEP_K if qname in ("Q4_K", "Q5_K") else SWEEP_6K if qname == "Q6_K" else SWEEP_0


def parse_configs(items: list[str]) -> list[dict]:
    """["PPS=16", "BN=2,REP=1"] -> [{"PPS": 16}, {"BN": 2, "REP": 1}]"""
    out = []
    for item in items:
        try:
            out.append({k: int(v) for k, v in (kv.split("=") for kv in item.split(","))})
        except ValueError:
            raise SystemExit(f"--configs {item!r}: expected K=V[,K=V] with integer values") from None
    return out


def dtype_of(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[name]


def timed_weights(qtype, n: int, k: int, n_buf: int, dev) -> list[torch.Tensor]:
    """Random bytes with every f16 scale field set to a small finite value (content does not
    matter for time, NaN/inf scales would only make the check meaningless)."""
    from gguf.constants import GGML_QUANT_SIZES

    from tpruntime.quants import F16_FIELDS
    block, ts = GGML_QUANT_SIZES[qtype]
    nb = k // block
    out = []
    for _ in range(n_buf):
        w = torch.randint(0, 256, (n, nb, ts), dtype=torch.uint8, device=dev)
        for off in F16_FIELDS[qtype]:
            if off is not None:
                w[:, :, off:off + 2] = torch.tensor([0x00, 0x20], dtype=torch.uint8, device=dev)
        out.append(w.view(n, nb * ts))
    return out


def _compile_one(task) -> tuple:
    """Worker: run one configuration once so that its kernel lands in Triton's disk cache."""
    qname, n, k, t, xd, cfg = task
    t0 = time.perf_counter()
    try:
        from gguf.constants import GGMLQuantizationType as Q

        from tpruntime.kernels.gemv import weight_bytes
        qgemv = gemv_kernel()
        qtype = Q[qname]
        w = torch.zeros(weight_bytes(qtype, n, k), dtype=torch.uint8, device="cuda").view(n, -1)
        x = torch.zeros(t, k, dtype=dtype_of(xd), device="cuda")
        qgemv(x, w, qtype, n, k, config=cfg)
        torch.cuda.synchronize()
        return task, time.perf_counter() - t0, None
    except Exception as e:  # reported, and the main process will hit it again with a traceback
        return task, time.perf_counter() - t0, repr(e)


def precompile(tasks: list, jobs: int) -> None:
    t0 = time.perf_counter()
    uniq = list({json.dumps(tk, sort_keys=True): tk for tk in tasks}.values())
    if jobs <= 1:
        res = [_compile_one(tk) for tk in uniq]
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as ex:
            res = list(ex.map(_compile_one, uniq))
    bad = [r for r in res if r[2]]
    print(f"precompiled {len(uniq)} cases with {jobs} jobs in {time.perf_counter() - t0:.1f} s"
          f" (slowest {max((r[1] for r in res), default=0):.1f} s); {len(bad)} failed", flush=True)
    for r in bad:
        print("  compile failed:", r[0], r[2], flush=True)


def bench_time(fn, n_buf: int, reps: int = 10) -> float:
    """Median seconds per fn(i) call, from CUDA-graph replays of >= 32 calls that cycle through
    the n_buf weight buffers: no host launch cost and no idle gaps in the number (the host side
    of qgemv is timed separately)."""
    calls = n_buf * max(1, math.ceil(32 / n_buf))
    for i in range(n_buf):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(calls):
            fn(j % n_buf)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e-3 / calls)
    del g
    return float(np.median(ts))


def host_us(fn, n: int = 300) -> float:
    """Host-side microseconds per call (launch included, no sync)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def check(qtype, n: int, k: int, t: int, xd: str, cfg: dict | None, dev) -> float:
    from gguf.constants import GGML_QUANT_SIZES

    from tpruntime.quants import dequantize, random_blocks
    qgemv = gemv_kernel()
    rng = np.random.default_rng(n + k + t)
    block = GGML_QUANT_SIZES[qtype][0]
    raw = torch.from_numpy(random_blocks(qtype, n * k // block, rng)).to(dev).view(n, -1)
    x = torch.randn(t, k, device=dev).to(dtype_of(xd))
    out = qgemv(x, raw, qtype, n, k, config=cfg)
    ref = x.double() @ dequantize(raw.reshape(-1), qtype, (n, k)).double().T
    return float((out.double() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="n_out x k_in")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1])
    ap.add_argument("--xdtype", nargs="+", default=["bf16"], choices=["bf16", "f32", "f16"])
    ap.add_argument("--sweep", action="store_true", help="time sweep_for(type) configs too")
    ap.add_argument("--sweep-shapes", type=int, default=99, help="sweep only the first N shapes")
    ap.add_argument("--configs", nargs="+", default=None, metavar="K=V[,K=V]",
                    help="with --sweep: these configurations instead of the built-in list, e.g. PPS=16 BN=2,REP=1")
    ap.add_argument("--token-shapes", type=int, nargs="+", default=[1, 2],
                    help="indices of the shapes that T > 1 runs on (first x dtype only)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dequant", action="store_true", help="time dequantize_rows instead of qgemv")
    ap.add_argument("--q8", action="store_true", help="time qgemv_q8 (x rounded to int8) instead of qgemv")
    ap.add_argument("--x-int8", action="store_true",
                    help="--q8: time the GEMV kernel alone, on x already in its int8 form (as in a decode step, "
                    "where the producing kernel writes it; a split-K output is not re-zeroed, so only the time means anything)")
    ap.add_argument("--odtype", nargs="+", default=["bf16"], choices=["bf16", "f32", "f16"],
                    help="--dequant output dtypes")
    ap.add_argument("--peak", type=float, default=None,
                    help="HBM bandwidth in TB/s that the percentages refer to (default: by device name, "
                    + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in HBM.items()) + ", else 3.35)")
    args = ap.parse_args()

    from gguf.constants import GGMLQuantizationType as Q

    from tpruntime.kernels.gemv import _plan, default_config, qgemv, weight_bytes
    from tpruntime.kernels.gemv_q8 import _plan as q8_plan
    from tpruntime.kernels.gemv_q8 import default_config as q8_default
    if args.q8:
        os.environ["BENCH_Q8"] = "1"
        qgemv = gemv_kernel()  # noqa: F811 (the same call signature, one token)
        if args.tokens != [1] or any(x not in ("bf16", "f16") for x in args.xdtype):
            ap.error("--q8 times one token of bf16/f16 x")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(dev)
    hbm = args.peak * 1e12 if args.peak else next((v for key, v in HBM.items() if key in name), 3.35e12)
    print(f"device: {name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB; "
          f"HBM reference {hbm / 1e12:.2f} TB/s; torch {torch.__version__}", flush=True)

    # the copy ceiling: bytes read + written by a large device-to-device copy
    a = torch.empty(2**30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    import triton.testing
    copy_bw = 2 * a.numel() / (triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3)
    read_bw = a.numel() / (triton.testing.do_bench(lambda: a.view(torch.float32).sum(), return_mode="median") * 1e-3)
    del a, b
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write); torch sum over 1 GiB: "
          f"{read_bw / 1e9:.0f} GB/s", flush=True)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if args.dequant:
        bench_dequant(args, shapes, hbm, copy_bw, name, dev)
        return
    cases = []  # (qname, n, k, t, xd, cfg or None, label)
    for qname in args.types:
        for si, (n, k) in enumerate(shapes):
            for t in args.tokens:
                for xd in args.xdtype:
                    if t > 1 and (si not in args.token_shapes or xd != args.xdtype[0]):
                        continue
                    cases.append((qname, n, k, t, xd, None, "default"))
                    if args.sweep and si < args.sweep_shapes and xd == args.xdtype[0]:
                        dflt = (q8_default(Q[qname], n, k) if args.q8 else
                                default_config(Q[qname], n, k, t, dtype_of(xd).itemsize))
                        sweep = (parse_configs(args.configs) if args.configs else SWEEP_Q8 if args.q8
                                 else sweep_for(qname) if t == 1 else SWEEP_T)
                        for i, cfg in enumerate(sweep):
                            if any(dflt.get(key) != val for key, val in cfg.items()):
                                cases.append((qname, n, k, t, xd, cfg, f"s{i}"))
    precompile([c[:6] for c in cases], args.jobs)
    # settle clocks (and the workers' teardown) before timing anything
    wq = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        wq @ wq
        torch.cuda.synchronize()
    del wq
    hosts = {}

    rows = []
    cublas = {}
    for qname, n, k, t, xd, cfg, label in cases:
        qtype = Q[qname]
        wb = weight_bytes(qtype, n, k)
        key_cfg = tuple(sorted(cfg.items())) if cfg else ()
        if args.q8:
            kw = q8_plan(qtype, n, k, True, key_cfg)[3]
            full = {key: kw[key] for key in ("num_warps", "BN", "BB", "SPLIT_K")}
        else:
            kw = _plan(qtype, n, k, t, dtype_of(xd), True, key_cfg)[3]
            full = {key: kw[key] for key in ("ORD", "num_warps", "BN", "BB", "TG")}
        row = dict(type=qname, n_out=n, k_in=k, T=t, x=xd, label=label, req=cfg, cfg=full, weight_MB=wb / 1e6)
        try:
            if not args.no_check and ((cfg is None and (t == 1 or (n, k) == shapes[args.token_shapes[0]]))
                                      or (n, k) == shapes[0]):
                row["rel_err"] = check(qtype, n, k, t, xd, cfg, dev)
            n_buf = max(2, min(32, math.ceil(L2_ROTATE / wb)))
            ws = timed_weights(qtype, n, k, n_buf, dev)
            x = torch.randn(t, k, device=dev).to(dtype_of(xd))
            if args.q8 and args.x_int8:
                from tpruntime.kernels.gemv_q8 import quantize_x
                from tpruntime.qweight import QuantizedX
                x = QuantizedX(x, *quantize_x(x.reshape(-1)), torch.zeros(n, dtype=torch.float32, device=dev))
            sec = bench_time(lambda i: qgemv(x, ws[i], qtype, n, k, config=cfg), n_buf)
            if label == "default" and t == 1:
                row["do_bench_us"] = 1e3 * triton.testing.do_bench(
                    lambda: qgemv(x, ws[0], qtype, n, k, config=cfg), warmup=10, rep=50, return_mode="median")
            if label == "default" and (qname, t, xd) not in hosts:
                hosts[(qname, t, xd)] = host_us(lambda: qgemv(x, ws[0], qtype, n, k))
                print(f"host {qname} T={t} {xd}: {hosts[(qname, t, xd)]:.1f} us per qgemv call", flush=True)
            del ws
            row.update(us=sec * 1e6, GBps=wb / sec / 1e9, pct_hbm=100 * wb / sec / hbm, pct_copy=100 * wb / sec / copy_bw)
            if (n, k, t) not in cublas:
                nbf = max(2, min(16, math.ceil(L2_ROTATE / (2 * n * k))))
                wbf = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(nbf)]
                xb = torch.randn(t, k, device=dev, dtype=torch.bfloat16)
                cublas[(n, k, t)] = bench_time(lambda i: xb @ wbf[i].T, nbf)
                if "cublas" not in hosts:
                    hosts["cublas"] = host_us(lambda: xb @ wbf[0].T)
                    print(f"host cuBLAS: {hosts['cublas']:.1f} us per matmul call", flush=True)
                del wbf
            row["cublas_us"] = cublas[(n, k, t)] * 1e6
            row["cublas_GBps"] = 2 * n * k / cublas[(n, k, t)] / 1e9
            row["speedup"] = cublas[(n, k, t)] / sec
        except Exception:
            row["error"] = traceback.format_exc(limit=3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()

    table = report(rows, f"device: {name}; HBM {hbm / 1e12:.2f} TB/s; copy {copy_bw / 1e9:.0f} GB/s; "
                         f"read (torch sum) {read_bw / 1e9:.0f} GB/s; times are CUDA-graph replays", args.xdtype[0])
    save(args.out, "bench", table, dict(device=name, copy_GBps=copy_bw / 1e9, read_GBps=read_bw / 1e9,
                                        hbm_GBps=hbm / 1e9, host_us={str(k): v for k, v in hosts.items()}, rows=rows))


def save(out: str, stem: str, table: str, results: dict) -> None:
    """out/stem.json (every row) and out/stem.md (the table), and the table on stdout."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)


def dequant_config(qname: str, cfg: dict | None) -> dict | None:
    """A SWEEP_DEQUANT entry as a dequantize_rows config (VALUES -> BB for the type)."""
    if not cfg:
        return None
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as Q
    out = {k: v for k, v in cfg.items() if k != "VALUES"}
    if "VALUES" in cfg:
        out["BB"] = max(1, cfg["VALUES"] // GGML_QUANT_SIZES[Q[qname]][0])
    return out


def bench_dequant(args, shapes: list[tuple[int, int]], hbm: float, copy_bw: float, name: str, dev) -> None:
    """Time dequantize_rows per type, shape and output dtype (and the SWEEP_DEQUANT configs with
    --sweep) as CUDA-graph replays; the inputs rotate through > L2 of buffers, the output is one
    buffer reused, as the prefill scratch is."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as Q

    from tpruntime.kernels.dequant import _plan, dequantize_rows
    from tpruntime.kernels.gemv import weight_bytes
    from tpruntime.quants import dequantize, random_blocks
    rows, host = [], {}
    for qname in args.types:
        qtype = Q[qname]
        for n, k in shapes:
            for od in args.odtype:
                dt = dtype_of(od)
                for i, sw in enumerate([None] + (SWEEP_DEQUANT if args.sweep else [])):
                    cfg = dequant_config(qname, sw)
                    kw = _plan(qtype, n, k, dt, False, tuple(sorted(cfg.items())) if cfg else ())[3]
                    rb, wb = weight_bytes(qtype, n, k), n * k * dt.itemsize
                    row = dict(type=qname, n_out=n, k_in=k, out=od, label="default" if sw is None else f"s{i - 1}",
                               req=sw, cfg=dict(BB=kw["BB"], V=kw["V"], num_warps=kw["num_warps"]),
                               read_MB=rb / 1e6, write_MB=wb / 1e6)
                    try:
                        out = torch.empty(n * k, dtype=dt, device=dev)
                        if sw is None and not args.no_check:
                            rng = np.random.default_rng(n + k)
                            raw = torch.from_numpy(random_blocks(qtype, n * k // GGML_QUANT_SIZES[qtype][0], rng))
                            raw = raw.to(dev).view(n, -1)
                            ref = dequantize(raw.reshape(-1), qtype, (n, k)).to(dt)
                            got = dequantize_rows(raw, qtype, n, k, dtype=dt, out=out)
                            row["exact"] = bool(torch.equal(got, ref))
                            row["max_abs_err"] = float((got.float() - ref.float()).abs().max())
                            del raw, ref, got
                        n_buf = max(2, min(32, math.ceil(L2_ROTATE / rb)))
                        ws = timed_weights(qtype, n, k, n_buf, dev)
                        sec = bench_time(lambda j: dequantize_rows(ws[j], qtype, n, k, dtype=dt, out=out, config=cfg),
                                         n_buf)
                        if sw is None and (qname, od) not in host:
                            host[(qname, od)] = host_us(lambda: dequantize_rows(ws[0], qtype, n, k, dtype=dt, out=out))
                            print(f"host {qname} {od}: {host[(qname, od)]:.1f} us per dequantize_rows call", flush=True)
                        del ws, out
                        row.update(us=sec * 1e6, GBps=(rb + wb) / sec / 1e9, pct_hbm=100 * (rb + wb) / sec / hbm,
                                   pct_copy=100 * (rb + wb) / sec / copy_bw)
                    except Exception:
                        row["error"] = traceback.format_exc(limit=3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()

    lines = [f"device: {name}; HBM {hbm / 1e12:.2f} TB/s; copy {copy_bw / 1e9:.0f} GB/s; dequantize_rows, "
             "CUDA-graph replays; GB/s counts bytes read + written", "",
             "| type | n_out x k_in | out | read MB | write MB | cfg | us | GB/s | % HBM | % copy | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cfg"]
        head = (f"| {r['type']} | {r['n_out']}x{r['k_in']} | {r['out']} | {r['read_MB']:.1f} | {r['write_MB']:.1f} | "
                f"{r['label']} BB{c['BB']} V{c['V']} w{c['num_warps']} |")
        if "us" not in r:
            lines.append(f"{head} error: {r.get('error', '?').strip().splitlines()[-1]} |")
            continue
        lines.append(f"{head} {r['us']:.1f} | {r['GBps']:.0f} | {r['pct_hbm']:.0f} | {r['pct_copy']:.0f} | "
                     f"{r.get('exact', '')} |")
    save(args.out, "dequant", "\n".join(lines), dict(device=name, copy_GBps=copy_bw / 1e9, hbm_GBps=hbm / 1e9,
                                                      host_us={str(k): v for k, v in host.items()}, rows=rows))


def report(rows: list[dict], head: str, xd0: str) -> str:
    """Markdown: per case the default and the best configuration, then per type and T each
    configuration's geometric-mean time relative to the fastest, over the shapes."""
    # the best configuration per case (a sweep), else the default one
    best = {}
    for r in rows:
        key = (r["type"], r["n_out"], r["k_in"], r["T"], r["x"])
        if "us" in r and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    default = {(r["type"], r["n_out"], r["k_in"], r["T"], r["x"]): r for r in rows if r["label"] == "default"}
    lines = [head, "",
             "| type | n_out x k_in | T | x | MB | default us | GB/s | % HBM | do_bench us | best us | best GB/s | "
             "% HBM | best cfg | cuBLAS bf16 us | cuBLAS GB/s | speedup (best) | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in default.items():
        bst = best.get(key, r)
        if "us" not in r:
            lines.append(f"| {key[0]} | {key[1]}x{key[2]} | {key[3]} | {key[4]} | error: {r.get('error', '?').splitlines()[-1]} |")
            continue
        c = bst["cfg"]
        lines.append(
            f"| {key[0]} | {key[1]}x{key[2]} | {key[3]} | {key[4]} | {r['weight_MB']:.1f} | {r['us']:.1f} | "
            f"{r['GBps']:.0f} | {r['pct_hbm']:.0f} | {r.get('do_bench_us', float('nan')):.1f} | {bst['us']:.1f} | {bst['GBps']:.0f} | {bst['pct_hbm']:.0f} | "
            f"{bst['label']} {' '.join(f'{k}{v}' for k, v in c.items())} | {r['cublas_us']:.1f} | "
            f"{r['cublas_GBps']:.0f} | {bst['speedup']:.2f} | {r.get('rel_err', float('nan')):.1e} |")
    # per type and T: each configuration's time relative to the best one, geometric mean over shapes
    lines += ["", "| type | T | config (overrides) | geomean time / best, over shapes | shapes |", "|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        if "us" in r and r["x"] == xd0:
            groups.setdefault((r["type"], r["T"]), []).append(r)
    for (qn, t), rs in groups.items():
        fastest = {}
        for r in rs:
            fastest[(r["n_out"], r["k_in"])] = min(fastest.get((r["n_out"], r["k_in"]), 1e9), r["us"])
        for lab in dict.fromkeys(r["label"] for r in rs):
            mine = [r for r in rs if r["label"] == lab]
            gm = math.exp(sum(math.log(r["us"] / fastest[(r["n_out"], r["k_in"])]) for r in mine) / len(mine))
            lines.append(f"| {qn} | {t} | {lab} {json.dumps(mine[0]['req'])} | {gm:.3f} | {len(mine)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
