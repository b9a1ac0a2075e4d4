"""sweep-bench: prompt-processing and generation speed against context depth, with the
semantics of ik_llama.cpp's llama-sweep-bench so the tables compare line for line.

For N_KV = 0, ub, 2·ub, … while N_KV + ub <= c: decode `n` random tokens at positions
N_KV … (timed, then forgotten), then process `ub` random tokens at N_KV (timed and kept,
so the cache is ub deeper for the next row).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass

import torch

from .errors import TpError
from .generate import sync


@dataclass
class SweepRow:
    PP: int
    TG: int
    N_KV: int
    T_PP: float
    S_PP: float
    T_TG: float
    S_TG: float


def sweep_bench(engine, *, n_ctx: int, n_ubatch: int, n_tg: int, warmup_batch: bool = False,
                seed: int = 0, on_row=None) -> list[SweepRow]:
    """Runs on rank 0 (the engine broadcasts each step to the other ranks)."""
    if n_ubatch > n_ctx:
        raise TpError(f"-ub {n_ubatch} is larger than the context -c {n_ctx}")
    if n_tg < 0:
        raise TpError(f"-n {n_tg}: must be >= 0")
    n_vocab = engine.model.cfg.n_vocab
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> torch.Tensor:
        return torch.randint(0, n_vocab, (n,), generator=gen)

    # Warm-up (kernels, allocator): one token, and optionally one full batch. A decode step
    # in every key-length bucket captures its CUDA graph now rather than inside a timed row.
    graphs = engine.model.graphs
    for pos in ([b - 1 for b in graphs.buckets()] if graphs is not None else [0]):
        engine.forward(rand(1), pos)
    if warmup_batch:
        engine.forward(rand(n_ubatch), 0)
    sync(engine.device)

    rows = []
    for n_kv in range(0, n_ctx - n_ubatch + 1, n_ubatch):
        t0 = time.perf_counter()
        for i in range(n_tg):
            if n_kv + i >= n_ctx:
                break
            engine.forward(rand(1), n_kv + i)
        sync(engine.device)
        t_tg = time.perf_counter() - t0

        t0 = time.perf_counter()
        engine.forward(rand(n_ubatch), n_kv)
        sync(engine.device)
        t_pp = time.perf_counter() - t0

        row = SweepRow(PP=n_ubatch, TG=n_tg, N_KV=n_kv, T_PP=t_pp, S_PP=n_ubatch / t_pp,
                       T_TG=t_tg, S_TG=n_tg / t_tg if t_tg > 0 else 0.0)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def markdown_header() -> str:
    return ("|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |\n"
            "|-------|--------|--------|----------|----------|----------|----------|")


def markdown_row(r: SweepRow) -> str:
    return (f"| {r.PP:5d} | {r.TG:6d} | {r.N_KV:6d} | {r.T_PP:8.3f} | {r.S_PP:8.2f} | "
            f"{r.T_TG:8.3f} | {r.S_TG:8.2f} |")


def render(rows: list[SweepRow], fmt: str, meta: dict | None = None) -> str:
    if fmt == "json":
        return json.dumps({**(meta or {}), "rows": [asdict(r) for r in rows]}, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(SweepRow.__dataclass_fields__))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
        return buf.getvalue().rstrip("\n")
    return "\n".join([markdown_header(), *map(markdown_row, rows)])
