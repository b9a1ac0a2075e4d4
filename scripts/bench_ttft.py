"""Time to first token for prompt lengths the process has not seen: the first prefill of each
length after load (what a server's new request pays), then a second prompt of the same length
(warm), on one GPU through the engine as `generate` opens it (so with its load-time warm-up).

    python3 scripts/bench_ttft.py MODEL.gguf [-ub 2048] [--all-sdpa]

--all-sdpa routes every chunk at position 0 through SDPA's own kernel choice (cuDNN on Hopper,
a plan per new length), as before the fourteenth session, for A/B.
"""

from __future__ import annotations

import argparse
import time

import torch

from tpruntime.engine import open_engine
from tpruntime.generate import prefill
from tpruntime.layers import Attention
from tpruntime.plan import PlanOptions

LENGTHS = [37, 101, 517, 1000, 1500, 2048, 3000]


class _Every(set):
    def __contains__(self, _):
        return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-ub", type=int, default=2048)
    ap.add_argument("--all-sdpa", action="store_true")
    a = ap.parse_args()
    if a.all_sdpa:
        init = Attention.__init__

        def patched(self, *args, **kw):
            init(self, *args, **kw)
            self.sdpa_lengths = _Every()
        Attention.__init__ = patched
    t0 = time.perf_counter()
    eng = open_engine(a.model, n_ctx=4096, device="cuda", dtype="bf16", n_ubatch=a.ub, options=PlanOptions(),
                      progress=False)
    print(f"load + warm-up: {time.perf_counter() - t0:.1f} s ({'all SDPA' if a.all_sdpa else 'default'})")
    vocab = eng.model.cfg.n_vocab
    prefill(eng, list(range(1, 21)), a.ub)  # the kernels' first compilation, outside the rows (a server's first request)
    print("| prompt | first ms | warm ms |")
    print("|---|---|---|")
    for n in LENGTHS:
        row = []
        for _ in range(2):
            prompt = torch.randint(0, vocab, (n,)).tolist()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill(eng, prompt, a.ub)
            torch.cuda.synchronize()
            row.append((time.perf_counter() - t0) * 1e3)
        print(f"| {n} | {row[0]:.1f} | {row[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
