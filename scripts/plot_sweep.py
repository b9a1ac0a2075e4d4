"""Overlay sweep-bench runs in one PNG: S_PP and S_TG against N_KV, one line per run.

    tpruntime sweep-bench ... --output json > a.json   (one file per run)
    python scripts/plot_sweep.py a.json b.json -o sweep.png [--labels "TP 1" "TP 2"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="sweep-bench --output json files")
    ap.add_argument("-o", "--output", default="sweep.png")
    ap.add_argument("--labels", nargs="*", help="one label per run (default: file names)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib)")
    labels = args.labels or [Path(r).stem for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(args.runs)} runs")

    fig, (ax_pp, ax_tg) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path, label in zip(args.runs, labels):
        rows = json.loads(Path(path).read_text())["rows"]
        n_kv = [r["N_KV"] for r in rows]
        ax_pp.plot(n_kv, [r["S_PP"] for r in rows], marker="o", label=label)
        ax_tg.plot(n_kv, [r["S_TG"] for r in rows], marker="o", label=label)
    for ax, what in ((ax_pp, "S_PP (prompt t/s)"), (ax_tg, "S_TG (generation t/s)")):
        ax.set_xlabel("N_KV (context depth)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
