"""All-reduce latency for decode-sized messages: the runtime's own paths (tpruntime.comm:
NCCL on CUDA, gloo on the CPU; on CUDA also `--all-reduce symm-mem`, torch's one-shot, and
`--all-reduce one-shot`, our kernel, casts and copies included) and torch's bare
symmetric-memory one-shot op on a prepared buffer (the library to beat, issue 13), per message
size and reduce dtype.

    torchrun --nproc-per-node 2 scripts/bench_allreduce.py [--sizes 4K 16K 64K 256K 1M]
        [--reduce-type f32 bf16] [--iters 200] [--out DIR]

On CUDA each case is timed as replays of a CUDA graph of back-to-back all-reduces (what a
graph-captured decode step pays per collective, launch cost excluded; scripts/bench_kernels.py's
bench_time); on the CPU as a plain loop of --iters calls (gloo: only a smoke test of the harness). Every result is checked against the exact sum
first (rank r fills its buffer with r + 1 plus a ramp). Rank 0 prints a markdown table and
writes allreduce.json / allreduce.md under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from bench_kernels import bench_time, save  # this folder: the other benchmarks' timing and files


def parse_size(s: str) -> int:
    """Bytes: 4096, 4K, 1M."""
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def fill(n: int, rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # small integers: exact in every reduce dtype, so the check is exact
    return ((torch.arange(n, device=device) % 7) + rank + 1).to(dtype)


def expected(n: int, world: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return sum(fill(n, r, torch.float32, device) for r in range(world)).to(dtype)


def time_per_call(fn, iters: int, device: torch.device) -> float:
    """Seconds per fn() call: on CUDA bench_kernels' replayed graph of back-to-back calls
    (median of its replays), else a timed loop of `iters` calls."""
    if device.type == "cuda":
        return bench_time(lambda i: fn(), 1)
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def symm_mem_one_shot(n: int, dtype: torch.dtype, device: torch.device, src: torch.Tensor):
    """torch's one-shot all-reduce over a symmetric-memory buffer, or the reason it is not
    available here."""
    try:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD
        buf = symm_mem.empty(n, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, group.group_name)
        buf.copy_(src)
        out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
        return lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name), out
    except Exception as e:  # reported in the table: an unsupported build, no P2P, ...
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def norm_table(comm, device: torch.device, args) -> None:
    """A decode step's all-reduce and the residual add + RMSNorm after it, one token of each
    hidden size: NCCL then the fused add + norm kernel, our one-shot then that kernel, and the
    one kernel doing all of it (TPRUNTIME_FUSED_AR's path), per wire dtype."""
    import torch.distributed as dist

    from tpruntime.comm import REDUCE_DTYPES, P2POneShot
    from tpruntime.ops import TritonOps
    ops, rows = TritonOps(), []
    for rt in args.reduce_type:
        dtype = comm.reduce_dtype = REDUCE_DTYPES[rt]
        one = P2POneShot(dist.group.WORLD, device, dtype, fused_norm=True)
        for n in args.norm_widths:
            h = torch.zeros(1, n, device=device)
            p = fill(n, comm.rank, torch.float32, device).reshape(1, n)
            w = torch.ones(n, device=device)
            cases = {"nccl": lambda: ops.add_rms_norm(h, comm.all_reduce(p), w, 1e-6, out_dtype=torch.bfloat16),
                     "one_shot": lambda: ops.add_rms_norm(h, one(p), w, 1e-6, out_dtype=torch.bfloat16),
                     "fused": lambda: one.add_rms_norm(h, p, w, 1e-6, out_dtype=torch.bfloat16)}
            row = dict(n=n, bytes=n * 4, reduce=rt, ranks=comm.world_size)
            for key, fn in cases.items():
                row[key + "_us"] = 1e6 * time_per_call(fn, args.iters, device)
            rows.append(row)
    if comm.rank == 0:
        lines = [f"all-reduce + residual add + RMSNorm of one token, {comm.world_size} ranks; µs per step "
                 "(CUDA-graph replays; the normed output in bf16)", "",
                 "| hidden | f32 bytes | wire | NCCL + add_rms_norm | one-shot + add_rms_norm | one kernel |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['n']} | {r['bytes']} | {r['reduce']} | {r['nccl_us']:.1f} | {r['one_shot_us']:.1f} "
                         f"| {r['fused_us']:.1f} |")
        save(args.out, "allreduce_norm", "\n".join(lines), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["4K", "16K", "64K", "256K", "1M"], help="message bytes")
    ap.add_argument("--reduce-type", nargs="+", default=["f32", "bf16"], choices=["f32", "f16", "bf16"])
    ap.add_argument("--iters", type=int, default=200, help="calls per timing on the CPU")
    ap.add_argument("--norm-widths", nargs="*", type=int, default=[4096, 5120],
                    help="hidden sizes for the all-reduce + add + RMSNorm table (CUDA; none: skip it)")
    ap.add_argument("--one-shot-max", default="1M", help="the one-shot paths' buffer size (message bytes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import torch.distributed as dist

    from tpruntime.comm import REDUCE_DTYPES, DistComm, P2POneShot, TorchOneShot
    paths = {"symm_mem_path": TorchOneShot, "p2p": P2POneShot}  # the runtime's --all-reduce symm-mem / one-shot
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # one process group for the run; the reduce dtype is an attribute of the comm object; its own
    # all-reduce is NCCL's (gloo's) column, the one-shot paths are made apart
    comm = DistComm(device, reduce_type=args.reduce_type[0], all_reduce="nccl")
    one_shots = {}  # (path, wire dtype) -> the runtime's one-shot paths
    rows = []
    for rt in args.reduce_type:
        dtype = comm.reduce_dtype = REDUCE_DTYPES[rt]
        for s in args.sizes:
            nbytes = parse_size(s)
            n = max(1, nbytes // dtype.itemsize)
            x = fill(n, comm.rank, dtype, device)
            want = expected(n, comm.world_size, dtype, device)
            row = dict(size=s, bytes=n * dtype.itemsize, reduce=rt, ranks=comm.world_size, device=str(device))
            got = comm.all_reduce(x)  # float32 out, as the runtime uses it
            row["runtime_exact"] = bool(torch.equal(got.to(dtype), want))
            row["runtime_us"] = 1e6 * time_per_call(lambda: comm.all_reduce(x), args.iters, device)
            if device.type == "cuda":
                for key, kind in paths.items():
                    try:
                        if (key, dtype) not in one_shots:
                            one_shots[key, dtype] = kind(dist.group.WORLD, device, dtype,
                                                         max_bytes=parse_size(args.one_shot_max))
                        path = one_shots[key, dtype]
                        row[key + "_exact"] = bool(torch.equal(path(fill(n, comm.rank, dtype, device)).to(dtype), want))
                        row[key + "_us"] = 1e6 * time_per_call(lambda: path(x), args.iters, device)
                    except Exception as e:  # reported in the table
                        row[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                # fresh data: the runtime's all-reduce sums in place when no cast is needed, so x
                # now holds the sum (the 2-GPU run of 2026-11-23 reported "not exact" from that)
                fn, res = symm_mem_one_shot(n, dtype, device, fill(n, comm.rank, dtype, device))
                if fn is None:
                    row["symm_mem"] = res
                else:
                    row["symm_mem_exact"] = bool(torch.equal(res, want))
                    row["symm_mem_us"] = 1e6 * time_per_call(fn, args.iters, device)
            rows.append(row)
            if comm.rank == 0:
                print(json.dumps(row), flush=True)
    if comm.rank == 0:
        lines = [f"all-reduce, {comm.world_size} ranks, {device.type}; µs per call "
                 f"({'CUDA-graph replays' if device.type == 'cuda' else f'eager loop of {args.iters}'})", "",
                 "| bytes | reduce | NCCL/gloo µs | exact | --all-reduce symm-mem µs | exact "
                 "| --all-reduce one-shot µs | exact | torch's op alone µs | exact |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [f"{r['bytes']}", r["reduce"], f"{r['runtime_us']:.1f}", f"{r['runtime_exact']}"]
            for key in ("symm_mem_path", "p2p", "symm_mem"):
                cells += ([f"{r[key + '_us']:.1f}", f"{r[key + '_exact']}"] if key + "_us" in r
                          else [r.get(key, "not on CPU"), "–"])
            lines.append("| " + " | ".join(cells) + " |")
        save(args.out, "allreduce", "\n".join(lines), rows)
    if device.type == "cuda" and args.norm_widths:
        norm_table(comm, device, args)
    comm.barrier()
    comm.close()


if __name__ == "__main__":
    main()
