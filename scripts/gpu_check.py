"""Device check for the core: greedy tokens on CUDA equal the CPU path, and tokens/s.

Runs Gemma 3 270M (against its reference continuations) and a synthetic model (written by
`tpruntime synth`) on CPU float32 and on CUDA in float32 and bf16, and prints a table.

    python scripts/gpu_check.py --gemma gemma.gguf --reference ref.json --synth qwen3-8b.gguf --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tpruntime import load_tokenizer
from tpruntime.generate import generate
from tpruntime.model import load_model
from tpruntime.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temp=0)


def run(path: str, prompt: list[int], n: int, device: str, dtype: str, n_ctx: int = 512) -> dict:
    t0 = time.perf_counter()
    lm = load_model(path, n_ctx=n_ctx, device=device, dtype=dtype, progress=False)
    load_s = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    # Warm-up (allocator, kernels). A run from position 0 overwrites the cache it reads.
    generate(lm, prompt, 4, Sampler(GREEDY))
    res = generate(lm, prompt, n, Sampler(GREEDY))
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dict(device=device, dtype=dtype, tokens=res.tokens, load_s=round(load_s, 1),
                pp_tps=round(res.prompt_tps, 1), tg_tps=round(res.gen_tps, 2), gpu_mem_gib=round(mem / 2**30, 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemma", required=True)
    ap.add_argument("--reference", required=True, help="gemma3_270m_reference.json")
    ap.add_argument("--synth", required=True, help="a synthetic model written by `tpruntime synth`")
    ap.add_argument("--cpu-tokens", type=int, default=8, help="greedy tokens on the (slow) CPU path")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    rows = []

    ref = json.loads(Path(args.reference).read_text())
    for i, case in enumerate(ref["cases"]):
        for device, dtype in (("cpu", "f32"), ("cuda", "f32"), ("cuda", "bf16")):
            r = run(args.gemma, case["prompt_ids"], len(case["greedy_ids"]), device, dtype)
            r.update(model=f"gemma3-270m case {i}", match_ref=r["tokens"] == case["greedy_ids"])
            rows.append(r)
            print(r, flush=True)

    synth = args.synth
    tok = load_tokenizer(synth)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)
    ref_tokens = None
    for device, dtype in (("cpu", "f32"), ("cuda", "f32"), ("cuda", "bf16")):
        r = run(synth, prompt, args.cpu_tokens if device == "cpu" else args.n, device, dtype)
        if ref_tokens is None:
            ref_tokens = r["tokens"]
        n = min(len(ref_tokens), len(r["tokens"]))
        r.update(model=Path(synth).name, match_ref=r["tokens"][:n] == ref_tokens[:n])
        rows.append(r)
        print(r, flush=True)

    Path(args.out, "gpu_check.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| model | device | dtype | greedy = reference | load s | PP t/s | TG t/s | GPU mem GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['dtype']} | {r['match_ref']} | {r['load_s']} | "
              f"{r['pp_tps']} | {r['tg_tps']} | {r['gpu_mem_gib']} |")


if __name__ == "__main__":
    main()
