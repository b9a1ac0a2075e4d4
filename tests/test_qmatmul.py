"""tpruntime.kernels.qmatmul (prefill matmul dequantizing GGUF blocks in its K loop) against the
float64 product of x and the weights as tpruntime.quants dequantizes them.

The kernel rounds each weight to x's 16-bit type before the tensor cores see it, so the reference
rounds them the same way: to nearest even when compiled, by truncation in Triton's interpreter
(its f32 -> bf16 cast truncates; see kernels/dequant.py). What is left is the f32 accumulation,
~1e-6 of sum |x| |w|; a wrong column, row, group or scale is a difference of order one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CUDA
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from tpruntime.kernels.qmatmul import SUPPORTED, qmatmul  # noqa: E402
from tpruntime.quants import dequantize, random_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TYPES = sorted(SUPPORTED, key=lambda t: t.value)


def weights(qtype: Q, n_out: int, k_in: int, seed: int) -> torch.Tensor:
    raw = random_blocks(qtype, n_out * k_in // GGML_QUANT_SIZES[qtype][0], np.random.default_rng(seed))
    return torch.from_numpy(raw.reshape(n_out, -1)).to(DEV)


def rounded(w: torch.Tensor, dtype: torch.dtype, fused: bool = True) -> torch.Tensor:
    """w (f32) as the kernel (fused: else kernels/dequant.py, which rounds to nearest in the
    interpreter too) feeds it to the MMA, back in f64."""
    if dtype == torch.bfloat16 and not CUDA and fused:
        return (w.view(torch.int32) & -65536).view(torch.float32).double()
    return w.to(dtype).double()


def check(raw, qtype, n_out, k_in, x, y, tol=1e-5, fused=True):
    w = rounded(dequantize(raw.cpu().reshape(-1), qtype, (n_out, k_in)), x.dtype, fused)
    xd = x.cpu().double()
    ref = xd @ w.T
    bound = xd.abs() @ w.abs().T
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.cpu().double() - ref).abs()
    assert bool((err <= tol * bound + 1e-30).all()), f"max error {float((err / bound).max()):.2e} of sum|x||w|"


# Tails in both tile axes (n_out, M not multiples of BN, BM), one and several K steps, several
# groups per step, 32-value types with a partial last step (blocks not a multiple of GS).
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,m,n_blocks,cfg", [
    (40, 20, 2, dict(BM=16, BN=16, GS=1)),
    (33, 17, 1, dict(BM=16, BN=32, GS=2)),
    (16, 9, 3, dict(BM=32, BN=16, GS=4, num_warps=2)),
    (20, 33, 1, dict(BM=16, BN=16, GS=2, W_LEFT=False)),
], ids=["gs1", "gs2", "gs4", "w-right"])
def test_matches_reference(qtype, n_out, m, n_blocks, cfg):
    block = GGML_QUANT_SIZES[qtype][0]
    k_in = n_blocks * 256 if block == 256 else (n_blocks * 8 + 3) * block
    raw = weights(qtype, n_out, k_in, seed=n_out)
    x = torch.randn(m, k_in, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEV)
    check(raw, qtype, n_out, k_in, x, qmatmul(x, raw, qtype, n_out, k_in, config=cfg))


def test_f16_x_and_output_slice():
    """f16 activations; the result written into a column slice of a wider float32 output (as
    qweight's caller does not, but a fused q/k/v split could), the columns around it untouched."""
    qtype, n_out, k_in, m = Q.Q4_K, 24, 512, 18
    raw = weights(qtype, n_out, k_in, seed=4)
    x = torch.randn(m, k_in, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(DEV)
    wide = torch.full((m, n_out + 10), 7.0, device=DEV)
    y = qmatmul(x, raw, qtype, n_out, k_in, out=wide[:, 5:5 + n_out], config=dict(BM=16, BN=16))
    assert y.data_ptr() == wide[:, 5:].data_ptr()
    check(raw, qtype, n_out, k_in, x, y)
    assert bool((wide[:, :5] == 7.0).all() and (wide[:, 5 + n_out:] == 7.0).all())


def test_prefill_goes_through_it(monkeypatch):
    """QuantWeight's prefill takes the fused kernel up to QMATMUL_MAX_TOKENS tokens and the
    dequantize + matmul path beyond; both agree with the reference. Unset, the limit is per
    type: 128 tokens for Q4_K (the type it was timed on), never for the others."""
    from tpruntime import qweight
    qtype, n_out, k_in = Q.Q6_K, 20, 256
    raw = weights(qtype, n_out, k_in, seed=6)
    w = qweight.QuantWeight(raw, qtype, n_out, k_in, torch.bfloat16)
    x = torch.randn(12, k_in, generator=torch.Generator().manual_seed(2)).to(DEV)
    calls = []
    import tpruntime.kernels.qmatmul as qm
    real = qm.qmatmul
    monkeypatch.setattr(qm, "qmatmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert qweight.qmatmul_max_tokens(Q.Q4_K) == 128 and qweight.qmatmul_max_tokens(Q.Q6_K) == 0
    for limit, fused in ((12, 1), (11, 0), (None, 0)):
        monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", limit)
        calls.clear()
        y = w(x)
        assert len(calls) == fused
        # (the other path's product is rounded to bf16 on the CPU: F.linear, not cuBLAS's f32 output)
        check(raw, qtype, n_out, k_in, x.to(torch.bfloat16), y, tol=1e-5 if fused else 4e-3, fused=bool(fused))
    monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", None)
    raw4 = weights(Q.Q4_K, n_out, k_in, seed=7)
    calls.clear()
    y = qweight.QuantWeight(raw4, Q.Q4_K, n_out, k_in, torch.bfloat16)(x)
    assert len(calls) == 1
    check(raw4, Q.Q4_K, n_out, k_in, x.to(torch.bfloat16), y)


def test_prefill_takes_the_dense_copy(monkeypatch):
    """With its dequantized copy (--dense-prefill) a matrix multiplies prefill batches of
    COPY_MIN_TOKENS or more, and the types the K-loop kernel does not take, without a
    dequantize pass, giving what the per-chunk pass gives; smaller Q4_K batches keep the kernel."""
    from tpruntime import qweight
    import tpruntime.kernels.dequant as dq
    import tpruntime.kernels.qmatmul as qm
    calls = []
    for mod, name in ((qm, "qmatmul"), (dq, "dequantize_rows")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    n_out, k_in = 20, 256
    g = torch.Generator().manual_seed(5)
    for qtype, tokens, path in ((Q.Q4_K, 12, "qmatmul"), (Q.Q4_K, qweight.COPY_MIN_TOKENS, "copy"),
                                (Q.Q6_K, 10, "copy")):
        raw = weights(qtype, n_out, k_in, seed=tokens)
        plain, kept = (qweight.QuantWeight(raw, qtype, n_out, k_in, torch.bfloat16) for _ in range(2))
        kept.keep_copy()
        assert kept.copy is not None and kept.copy.dtype == torch.bfloat16 and kept.copy_bytes == n_out * k_in * 2
        x = torch.randn(tokens, k_in, generator=g).to(DEV)
        calls.clear()
        y = kept(x)
        assert calls == (["qmatmul"] if path == "qmatmul" else [])
        monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", 0)  # the other side: dequantize + matmul
        want = plain(x)
        monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", None)
        if path == "copy":
            assert torch.equal(y, want)
        check(raw, qtype, n_out, k_in, x.to(torch.bfloat16), y, tol=1e-5 if path == "qmatmul" else 4e-3,
              fused=path == "qmatmul")


def test_rejects_bad_input():
    raw = weights(Q.Q4_K, 2, 256, seed=0)
    x = torch.zeros(16, 256, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="Q2_K"):
        qmatmul(x, torch.zeros(84, dtype=torch.uint8, device=DEV), Q.Q2_K, 1, 256)
    with pytest.raises(ValueError, match="bytes"):
        qmatmul(x, raw, Q.Q4_K, 3, 256)
    with pytest.raises(ValueError, match="bf16/f16"):
        qmatmul(x.float(), raw, Q.Q4_K, 2, 256)
    with pytest.raises(ValueError, match="out"):
        qmatmul(x, raw, Q.Q4_K, 2, 256, out=torch.empty(16, 3, device=DEV))
    with pytest.raises(ValueError, match="config"):
        qmatmul(x, raw, Q.Q4_K, 2, 256, config=dict(BB=4))
    with pytest.raises(ValueError, match="GS"):
        qmatmul(x, raw, Q.Q4_K, 2, 256, config=dict(GS=3))
    assert qmatmul(x[:0], raw, Q.Q4_K, 2, 256).shape == (0, 2)


def test_env_knobs_reject_bad_values(monkeypatch):
    """The tuning knobs fail as one-line user errors, not as a bug's exception."""
    from tpruntime import qweight
    from tpruntime.errors import TpError
    from tpruntime.kernels.qmatmul import parse_config
    assert parse_config("") == {} and parse_config('{"BM":64,"W_LEFT":false}') == {"BM": 64, "W_LEFT": False}
    for bad, msg in (("{BM:64}", "not a JSON object"), ("[1]", "not a JSON object"), ('{"BB":4}', "unknown keys")):
        with pytest.raises(TpError, match=f"TPRUNTIME_QMATMUL_CONFIG: .*{msg}"):
            parse_config(bad)
    monkeypatch.setenv("TPRUNTIME_QMATMUL_MAX", "512")
    assert qweight.env_tokens("TPRUNTIME_QMATMUL_MAX") == 512
    for bad in ("abc", "-1", "1.5"):
        monkeypatch.setenv("TPRUNTIME_QMATMUL_MAX", bad)
        with pytest.raises(TpError, match="TPRUNTIME_QMATMUL_MAX: .* is not a token count"):
            qweight.env_tokens("TPRUNTIME_QMATMUL_MAX")
    # read at import: the CLI reports it as its one-line error
    for bad in ("0", "8M"):
        r = subprocess.run([sys.executable, "-m", "tpruntime", "generate", "-m", "x.gguf", "-p", "x"],
                           capture_output=True, text=True, env={**os.environ, "TPRUNTIME_PREFILL_SCRATCH_MB": bad})
        assert r.returncode == 2 and r.stderr.strip() == (
            f"error: TPRUNTIME_PREFILL_SCRATCH_MB: {bad!r} is not a size in MiB"
            " (a whole number, at least 1)"), r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gpu_real_shape(qtype):
    """A layer-sized matrix at a prefill-sized M, default tiles, and a CUDA-graph replay."""
    n_out, k_in, m = 1000, 4096, 300
    raw = weights(qtype, n_out, k_in, seed=8)
    x = torch.randn(m, k_in, device=DEV).to(torch.bfloat16)
    y = qmatmul(x, raw, qtype, n_out, k_in)
    check(raw, qtype, n_out, k_in, x, y, tol=1e-4)
    out = torch.zeros_like(y)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        qmatmul(x, raw, qtype, n_out, k_in, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)


@pytest.mark.skipif(CUDA, reason="compiled and run on the GPU itself")
def test_compiles_for_hopper():
    """Every type compiles for sm_90a (the interpreter accepts code that the compiler rejects)
    onto Hopper's asynchronous MMA, without spilling."""
    from conftest import compile_offline
    rows = [json.loads(line) for line in compile_offline("compile_qmatmul.py")]
    assert len(rows) == 2 * len(TYPES)
    for r in rows:
        assert r["wgmma"] > 0, r
        assert r.get("stack", 0) == 0, r
