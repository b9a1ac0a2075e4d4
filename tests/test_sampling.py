"""Sampling: greedy, the truncation chain, penalties, and determinism per seed."""

from __future__ import annotations

import pytest
import torch

from tpruntime.errors import TpError
from tpruntime.sampling import Sampler, SamplingParams


def logits(seed=0, n=1000):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def draws(params, n=200, seed_logits=0):
    s = Sampler(params)
    lg = logits(seed_logits)
    return [s(lg, []) for _ in range(n)]


def test_greedy_is_argmax():
    lg = logits()
    assert Sampler(SamplingParams(temp=0))(lg, []) == int(lg.argmax())
    assert Sampler(SamplingParams(temp=1.0, top_k=1))(lg, []) == int(lg.argmax())


def test_same_seed_same_tokens_other_seed_differs():
    p = SamplingParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=43))


def test_top_k_limits_support():
    lg = logits()
    allowed = set(lg.topk(5).indices.tolist())
    assert set(draws(SamplingParams(temp=5.0, top_k=5, top_p=1.0, min_p=0.0))) <= allowed


def test_top_p_keeps_smallest_prefix_reaching_mass():
    lg = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(lg, 0)  # 0.636, 0.234, 0.086, ...
    assert probs[0] < 0.8 < probs[:2].sum()
    s = Sampler(SamplingParams(temp=10.0, top_k=0, top_p=0.8, min_p=0.0))
    got = set(s(lg, []) for _ in range(300))
    assert got == {0, 1}


def test_min_p_drops_unlikely_tokens():
    lg = torch.tensor([0.0, -0.5, -5.0, -6.0])  # p/p_max: 1, 0.61, 0.0067, 0.0025
    s = Sampler(SamplingParams(temp=10.0, top_k=0, top_p=1.0, min_p=0.1))
    assert set(s(lg, []) for _ in range(300)) == {0, 1}


def test_repeat_penalty_discourages_history():
    lg = torch.tensor([2.0, 1.9, -1.0])
    s = Sampler(SamplingParams(temp=0, repeat_penalty=1.5))
    assert s(lg, [0]) == 1  # 2.0 / 1.5 < 1.9
    assert s(lg, [2]) == 0


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1),
                                 dict(repeat_penalty=0.0), dict(repeat_last_n=-1), dict(temp=float("nan"))])
def test_invalid_params(bad):
    with pytest.raises(TpError):
        Sampler(SamplingParams(**bad))
