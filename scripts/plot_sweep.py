"""Overlay sweep-bench runs in one PNG: S_PP and S_TG against N_KV, one line per run.

    tpruntime sweep-bench ... --output json > a.json   (one file per run)
    python scripts/plot_sweep.py a.json b.json -o sweep.png [--labels "TP 1" "TP 2"]

A run may also be the markdown table that sweep-bench (or llama-sweep-bench) prints, as is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


COLUMNS = ("PP", "TG", "N_KV", "T_PP", "S_PP", "T_TG", "S_TG")


def load_rows(path: str) -> list[dict]:
    """The rows of a --output json file, or of the markdown table lines in any text file."""
    text = Path(path).read_text()
    try:
        return json.loads(text)["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) == len(COLUMNS):
            try:
                rows.append(dict(zip(COLUMNS, (float(c) for c in cells))))
            except ValueError:  # the header and the separator line
                continue
    if not rows:
        raise SystemExit(f"error: {path}: no sweep-bench rows (neither --output json nor a markdown table)")
    return rows


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
        rows = load_rows(path)
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
