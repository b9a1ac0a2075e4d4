"""Generation: prefill the prompt in micro-batches of `n_ubatch`, then one token per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import TpError
from .model import Transformer
from .sampling import Sampler


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    n_prompt: int = 0
    t_prompt: float = 0.0
    t_gen: float = 0.0
    stop: str = ""  # eog | length | context

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        # The first generated token comes from the prefill's logits, so decode steps = n - 1.
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.t_gen if self.t_gen > 0 else 0.0


def sync(device: torch.device) -> None:
    """Wait for the device, so a host clock reading covers its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Transformer, prompt: list[int], n_ubatch: int, pos0: int = 0,
            all_logits: bool = False) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the last chunk's logits
    (or every position's, concatenated, with all_logits)."""
    outs = []
    for start in range(0, len(prompt), n_ubatch):
        chunk = torch.tensor(prompt[start:start + n_ubatch], dtype=torch.long)
        outs.append(model.forward(chunk, pos0 + start, all_logits=all_logits))
    return torch.cat(outs) if all_logits else outs[-1]


def check_prompt(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise TpError("the prompt is empty (no tokens to condition on)")
    if n_prompt >= n_ctx:
        raise TpError(f"the prompt is {n_prompt} tokens but the context holds {n_ctx}: "
                      f"raise -c or shorten the prompt")


def generate(model: Transformer, prompt: list[int], n_predict: int, sampler: Sampler, *,
             n_ubatch: int = 512, eog_ids: frozenset[int] = frozenset(),
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate up to n_predict tokens (-1: until end of generation or a full context)."""
    n_ctx = model.n_ctx
    check_prompt(len(prompt), n_ctx)
    res = GenerationResult(n_prompt=len(prompt))
    history = list(prompt)

    t0 = time.perf_counter()
    logits = prefill(model, prompt, n_ubatch)
    sync(model.device)
    res.t_prompt = time.perf_counter() - t0

    t0 = time.perf_counter()
    pos = len(prompt)
    while n_predict < 0 or len(res.tokens) < n_predict:
        tok = sampler(logits[-1], history)
        if tok in eog_ids:
            res.stop = "eog"
            break
        res.tokens.append(tok)
        history.append(tok)
        if on_token is not None:
            on_token(tok)
        if pos >= n_ctx:
            res.stop = "context"
            break
        if n_predict >= 0 and len(res.tokens) >= n_predict:
            break
        logits = model.forward(torch.tensor([tok], dtype=torch.long), pos)
        pos += 1
    res.stop = res.stop or "length"
    sync(model.device)
    res.t_gen = time.perf_counter() - t0
    return res
