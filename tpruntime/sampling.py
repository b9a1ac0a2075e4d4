"""Token sampling with llama.cpp's chain and defaults:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw (greedy when temp <= 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import TpError


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int = 0

    def validate(self) -> None:
        if not math.isfinite(self.temp):
            raise TpError(f"--temp must be a finite number, got {self.temp}")
        if not 0.0 < self.top_p <= 1.0:
            raise TpError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise TpError(f"--min-p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            raise TpError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise TpError(f"--repeat-last-n must be >= 0, got {self.repeat_last_n}")


class Sampler:
    """Deterministic for a given seed: draws use a private CPU generator."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.gen = torch.Generator().manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: [n_vocab] float32; history: the tokens so far (prompt and generated)."""
        p = self.p
        logits = logits.detach().float().cpu()
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            ids = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
            picked = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
        if p.temp <= 0:
            return int(torch.argmax(logits))

        k = p.top_k if 0 < p.top_k < logits.numel() else logits.numel()
        values, ids = torch.topk(logits, k)  # sorted, descending
        if p.top_p < 1.0:
            cum = torch.softmax(values, dim=0).cumsum(0)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            n_keep = int(torch.searchsorted(cum, torch.tensor([p.top_p])).item()) + 1
            values, ids = values[:n_keep], ids[:n_keep]
        if p.min_p > 0.0:
            keep = values >= values[0] + math.log(p.min_p)
            values, ids = values[keep], ids[keep]
        probs = torch.softmax(values / p.temp, dim=0)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])
