"""The model on its GPU path (weights kept in GGUF blocks, fused Triton ops, split-K decode
attention) against the torch reference path, on the CPU under Triton's interpreter: every
kernel as the model calls it, prefill (dequantize + matmul and GEMV tails) and decode.
tests/test_models.py repeats this compiled on CUDA with CUDA graphs."""

from __future__ import annotations


import pytest
import torch

from conftest import CUDA  # (conftest picked Triton's interpreter without a GPU)
pytest.importorskip("triton", reason="triton is not installed (it belongs in the test extra)")

from tpruntime.generate import prefill  # noqa: E402
from tpruntime.model import load_model  # noqa: E402
from tpruntime.ops import TritonOps  # noqa: E402
from tpruntime.qweight import QuantWeight  # noqa: E402
from tpruntime.synthetic import Shape, write_model  # noqa: E402

# The interpreter runs each kernel program as Python (~0.1 s per GEMV program), so these
# shapes are smaller than the tiny ones: 64-wide rows, still whole Q8_0 blocks. Together they
# take every branch of the kernels: interleaved (llama) and neox rope, q/k biases (qwen2),
# q/k norms, sandwich norms, a sliding window, one KV head and gelu (gemma3).
MICRO = {
    "llama": Shape("llama", 64, 1, 2, 1, 32, 128, 64, rope_base=500000.0, norm_eps=1e-5),
    "qwen2": Shape("qwen2", 64, 1, 2, 1, 32, 128, 64),
    "gemma3": Shape("gemma3", 64, 2, 2, 1, 32, 128, 64, sliding_window=8),
}


@pytest.fixture(scope="module")
def micro_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro")
    return {k: write_model(d / f"{k}.gguf", s, qtype="Q8_0", seed=2, target_std=0.05) for k, s in MICRO.items()}


def _run(lm, prompt: list[int], steps: list[int]) -> torch.Tensor:
    # ub 10: one chunk over the GEMV limit (dequantize + matmul), then a 2-token GEMV tail.
    first = prefill(lm, prompt, n_ubatch=10, all_logits=True)
    rest = [lm.forward(torch.tensor([t]), len(prompt) + i) for i, t in enumerate(steps)]
    return torch.cat([first] + rest).float().cpu()


@pytest.mark.skipif(CUDA, reason="the CUDA variant is test_models.test_cuda_kernels_equal_torch_reference")
# The default kernels: decode attention with the q/k norm + rope + KV store in its launch
# (TPRUNTIME_ATTN_QKV) and the norms' weights read before the wait (TPRUNTIME_NORM_PREWAIT).
# Their separate launches (the A/B switch) are checked compiled on CUDA only (test_models'
# "separate"), and so is qwen2 (its q/k biases: the kernels' own tests take them, here only the
# wiring would differ): each interpreted model run takes ~30-40 s of CI's 2 cores.
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_interpreted_kernels_equal_torch_path(arch, micro_models, monkeypatch):
    from tpruntime.kernels import attention, fused
    monkeypatch.setattr(attention, "FUSE_QKV", True)
    monkeypatch.setattr(fused, "NORM_PREWAIT", True)
    path = str(micro_models[arch])
    ref = load_model(path, n_ctx=32, progress=False)
    fast = load_model(path, n_ctx=32, progress=False, interpret_kernels=True)
    assert isinstance(fast.ops, TritonOps) and not isinstance(ref.ops, TritonOps)
    assert fast.ops.decode_attention_qkv is not None
    blk = fast.blocks[0]
    assert isinstance(blk.ffn.ffn_down.weight, QuantWeight) and isinstance(blk.attn.attn_qkv.parts[0], QuantWeight)
    assert fast.weight_bytes == fast.planned_bytes < ref.weight_bytes / 3
    tokens = torch.tensor([0, 5, ref.cfg.n_vocab - 1, 5])
    assert fast.embed_kernel and not ref.embed_kernel  # one dequantize kernel against torch's ops
    assert torch.equal(fast.embed(tokens), ref.embed(tokens))
    g = torch.Generator().manual_seed(3)
    # 12 prompt tokens and 2 decoded: past gemma3's sliding window of 8.
    prompt = torch.randint(0, ref.cfg.n_vocab, (12,), generator=g).tolist()
    steps = torch.randint(0, ref.cfg.n_vocab, (2,), generator=g).tolist()
    a, b = _run(fast, prompt, steps), _run(ref, prompt, steps)
    assert a.shape == b.shape == (len(prompt) + len(steps), ref.cfg.n_vocab)
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * max(scale, 1.0)


@pytest.mark.skipif(CUDA, reason="CPU interpreter check; CUDA runs the same path compiled")
def test_interpreted_kernels_on_a_rank_that_sits_layers_out(micro_models):
    """Under --max-gpu a rank holds empty slices of the layers it does not join (no q heads, no
    FFN columns) and still adds its zero share: the kernel path must treat those empty matrices
    as F.linear does. Each rank's partial logits (identity comm) equal the torch path's."""
    from tpruntime.comm import Comm
    from tpruntime.gguf_file import GGUFFile
    from tpruntime.model import Transformer
    from tpruntime.models import model_config
    from tpruntime.plan import PlanOptions, make_plan

    gf = GGUFFile(str(micro_models["gemma3"]))
    cfg = model_config(gf)
    plan = make_plan(cfg, PlanOptions(world_size=2, max_gpu=1), gf)
    prompt = list(range(5, 17))
    for rank in plan.ranks:
        assert any(not ls.joins for ls in rank.layers)
        outs = []
        for kernels in (True, False):
            m = Transformer(gf, cfg, rank, Comm(), n_ctx=32, progress=False, interpret_kernels=kernels)
            outs.append(_run(m, prompt, [3]))
        scale = outs[1].abs().max().item()
        assert (outs[0] - outs[1]).abs().max().item() <= 1e-4 * max(scale, 1.0)



@pytest.mark.skipif(CUDA, reason="CPU interpreter check; tests/test_models.py has the CUDA one")
def test_interpreted_dense_prefill_copies(micro_models, monkeypatch):
    """--dense-prefill: the first layers' matrices within the budget keep dequantized copies
    (q/k/v and gate/up as fused), prompt chunks give the same logits as without them, the memory
    line names them, and a bad value is a TpError before anything loads."""
    from tpruntime.errors import TpError
    from tpruntime.model import dense_prefill_budget

    path = str(micro_models["llama"])
    plain = load_model(path, n_ctx=32, progress=False, interpret_kernels=True)
    mats = [w for blk in plain.blocks for w in blk.matrices()]
    assert len(mats) == 4 * len(plain.blocks) and all(isinstance(w, QuantWeight) for w in mats)
    first = sum(w.copy_bytes for w in mats[:3])
    some = load_model(path, n_ctx=32, progress=False, interpret_kernels=True,
                      dense_prefill=str((first + 1) / 2**30))
    assert [w.copy is not None for w in some.blocks[0].matrices()] == [True, True, True, False]
    assert some.copy_bytes == first and "prefill copies" in some.memory_report()
    every = load_model(path, n_ctx=32, progress=False, interpret_kernels=True, dense_prefill="auto")
    assert every.copy_bytes == sum(w.copy_bytes for w in mats) and plain.copy_bytes == 0
    assert every.weight_bytes == every.planned_bytes  # the copies are not the plan's weights
    chunk = torch.arange(3, 3 + 20)  # 20 tokens: past COPY_MIN_TOKENS
    import tpruntime.kernels.dequant as dq
    passes = []  # dequantize passes into the prefill scratch
    real = dq.dequantize_rows
    monkeypatch.setattr(dq, "dequantize_rows", lambda *a, **k: passes.append(k.get("out") is not None) or real(*a, **k))
    want = plain.forward(chunk, 0, all_logits=True)
    assert sum(passes) == len(mats) + 1  # (+ the output head's: all 20 rows' logits)
    passes.clear()
    assert torch.equal(every.forward(chunk, 0, all_logits=True), want)
    assert sum(passes) == 1  # the head's only: it keeps no copy
    for bad in ("-1", "nan", "inf", "lots"):
        with pytest.raises(TpError, match="--dense-prefill"):
            dense_prefill_budget(bad)
    assert dense_prefill_budget("AUTO") == (float("inf"), True) and dense_prefill_budget("0.5") == (2**29, False)
