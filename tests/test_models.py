"""Model correctness: independent references (transformers, Gemma 3 270M) and KV-cache invariants."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_SHAPES, fixture_path, gemma_path
from tpruntime.generate import prefill
from tpruntime.model import load_model
from tpruntime.synthetic import Shape

# Shapes whose int8-x GEMVs split K (<= 4096 rows of >= 16 Q4_K blocks), so the kernel before
# each zeroes its output: q/k/v (from the attention norm), ffn_down (from the activation) and
# the head in the first; the attention output (from the attention merge) in the second.
SPLIT_K_SHAPES = [Shape("qwen3", 4096, 1, 16, 4, 128, 4096, 4096, rope_base=1000000.0),
                  Shape("qwen3", 2048, 1, 16, 8, 256, 2048, 4096, rope_base=1000000.0)]


def greedy(lm, prompt: list[int], n: int) -> list[int]:
    logits = prefill(lm, prompt, n_ubatch=512)
    out, pos = [], len(prompt)
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = lm.forward(torch.tensor(out[-1:]), pos)
        pos += 1
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_matches_transformers_float64_greedy(arch):
    """Tiny random models converted by llama.cpp's converter, against transformers (float64)."""
    ref = json.loads(fixture_path("ref", f"{arch}-tiny.json").read_text())
    lm = load_model(str(fixture_path("ref", ref["gguf"])), n_ctx=64, progress=False)
    checked = 0
    for case in ref["cases"]:
        if case["min_margin"] < 1e-3:
            continue  # float32 may legitimately pick the other token of a near tie
        assert greedy(lm, case["prompt_ids"], len(case["greedy_ids"])) == case["greedy_ids"]
        checked += 1
    assert checked >= 2


@pytest.fixture(scope="module")
def gemma():
    return load_model(gemma_path(), n_ctx=128, progress=False)


def test_gemma3_270m_greedy_matches_reference(gemma):
    ref = json.loads(fixture_path("gemma3_270m_reference.json").read_text())
    for case in ref["cases"]:
        logits = prefill(gemma, case["prompt_ids"], n_ubatch=512)
        top = logits[-1].topk(5)
        assert top.indices.tolist() == case["last_logits_top5_ids"]
        assert top.values.tolist() == pytest.approx(case["last_logits_top5"], abs=2e-3)
        assert greedy(gemma, case["prompt_ids"], 32) == case["greedy_ids"]


def _logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * max(scale, 1.0), (a - b).abs().max()


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_prefill_equals_token_by_token_and_chunked(shape, tiny_models):
    lm = load_model(str(tiny_models[shape]), n_ctx=64, progress=False)
    g = torch.Generator().manual_seed(7)
    # Longer than tiny-gemma3's sliding window (8), so the window is exercised.
    prompt = torch.randint(0, lm.cfg.n_vocab, (23,), generator=g).tolist()

    one_shot = prefill(lm, prompt, n_ubatch=512, all_logits=True)
    step = torch.cat([lm.forward(torch.tensor([t]), i, all_logits=True) for i, t in enumerate(prompt)])
    chunked = prefill(lm, prompt, n_ubatch=5, all_logits=True)

    assert one_shot.shape == (len(prompt), lm.cfg.n_vocab)
    assert torch.isfinite(one_shot).all()
    _logits_close(step, one_shot)
    _logits_close(chunked, one_shot)


def test_sliding_window_changes_attention(tiny_models):
    """Positions past the window must not see the start: with the window the last logits differ
    from a model that attends globally, while inside the window they agree."""
    lm = load_model(str(tiny_models["tiny-gemma3"]), n_ctx=64, progress=False)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, lm.cfg.n_vocab, (20,), generator=g).tolist()
    windowed = prefill(lm, prompt, n_ubatch=512, all_logits=True)
    for blk in lm.blocks:
        blk.attn.window = 0
    full = prefill(lm, prompt, n_ubatch=512, all_logits=True)
    window = lm.cfg.sliding_window
    _logits_close(windowed[:window], full[:window])
    assert (windowed[window:] - full[window:]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_cuda_graph_decode_equals_eager(shape, tiny_models):
    """Replayed decode graphs (bucketed keys, device-side positions) give the eager logits,
    across a bucket boundary and past the sliding window."""
    lm = load_model(str(tiny_models[shape]), n_ctx=600, device="cuda", dtype="f32", progress=False)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, lm.cfg.n_vocab, (250,), generator=g).tolist()
    steps = torch.randint(0, lm.cfg.n_vocab, (12,), generator=g).tolist()
    outs = {}
    for graphs in (False, True):
        lm.use_cuda_graphs(graphs)
        prefill(lm, prompt, n_ubatch=128)
        outs[graphs] = torch.cat([lm.forward(torch.tensor([t]), len(prompt) + i).clone()
                                  for i, t in enumerate(steps)])
    # The split-K decode kernel reads the key count on the device: one graph for every position.
    # The SDPA path captures one per bucket (256 and 512 were both used).
    assert len(lm.graphs.graphs) == (1 if lm.ops.fused else 2)
    _logits_close(outs[True].cpu(), outs[False].cpu())


def _prefill_then_decode(lm, prompt: list[int], steps: list[int]) -> torch.Tensor:
    first = prefill(lm, prompt, n_ubatch=128, all_logits=True)
    rest = [lm.forward(torch.tensor([t]), len(prompt) + i).clone() for i, t in enumerate(steps)]
    return torch.cat([first.to(rest[0].device)] + rest).cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("prologue", [True, False], ids=["", "separate"])
def test_cuda_kernels_equal_torch_reference(shape, tiny_models, prologue, monkeypatch):
    """The CUDA default (weights kept in GGUF blocks: GEMV kernels for decode, dequantize +
    matmul for prefill; fused norm/rope/cache/activation kernels; split-K decode attention in
    graphs) gives the logits of plain torch over dequantized weights, prefill and decode
    past the sliding window; also with TPRUNTIME_ATTN_QKV=0 and TPRUNTIME_NORM_PREWAIT=0."""
    from tpruntime.kernels import attention, fused
    monkeypatch.setattr(attention, "FUSE_QKV", prologue)
    monkeypatch.setattr(fused, "NORM_PREWAIT", prologue)
    path = str(tiny_models[shape])
    ref = load_model(path, n_ctx=600, device="cuda", dtype="f32", progress=False, dense_weights=True,
                     fused_ops=False, cuda_graphs=False)
    fast = load_model(path, n_ctx=600, device="cuda", dtype="f32", progress=False)
    assert fast.ops.fused and fast.graphs is not None
    assert fast.weight_bytes < ref.weight_bytes / 3 and fast.weight_bytes == fast.planned_bytes
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, ref.cfg.n_vocab, (250,), generator=g).tolist()
    steps = torch.randint(0, ref.cfg.n_vocab, (12,), generator=g).tolist()
    _logits_close(_prefill_then_decode(fast, prompt, steps), _prefill_then_decode(ref, prompt, steps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("dtype,matmul", [("bf16", "scratch"), ("f32", "scratch"), ("bf16", "qmatmul")],
                         ids=["bf16", "f32", "bf16-qmatmul"])
def test_cuda_chunked_prefill_equals_one_shot(shape, tiny_models, dtype, matmul, monkeypatch):
    """Prompt chunks after the first attend to the cache with the causal mask aligned to the
    bottom right (flash attention in 16 bits, the memory-efficient kernel in f32): every
    position's logits equal those of the CPU float32 reference prefilling all at once. The
    chunks' matmuls dequantize into scratch for cuBLAS, or in the K loop of kernels/qmatmul.py
    (TPRUNTIME_QMATMUL_MAX; these Q8_0 models take it only when asked)."""
    from tpruntime import qweight
    monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", 512 if matmul == "qmatmul" else 0)
    path = str(tiny_models[shape])
    ref = load_model(path, n_ctx=300, progress=False, dense_weights=True, fused_ops=False)
    lm = load_model(path, n_ctx=300, device="cuda", dtype=dtype, progress=False)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, ref.cfg.n_vocab, (250,), generator=g).tolist()
    want = prefill(ref, prompt, n_ubatch=512, all_logits=True)
    got = prefill(lm, prompt, n_ubatch=64, all_logits=True).float().cpu()
    if dtype == "f32":
        _logits_close(got, want)
    else:  # bf16 weights and activations: a loose bound, far below what a wrong mask gives
        err = (got - want).abs().max(dim=-1).values / want.abs().max(dim=-1).values
        assert err.max().item() < 0.1, err.max()


def test_dense_prefill_copies_that_fit():
    """--dense-prefill's choice: the first matrices within the budget, then within the free
    memory (auto keeps fewer, down to none when not even the reserve is free; a number that
    does not fit is a one-line error)."""
    from tpruntime.errors import TpError
    from tpruntime.model import copies_that_fit
    g = 2**30
    sizes = [4 * g, 4 * g, 4 * g]
    assert copies_that_fit(sizes, 100 * g, float("inf"), False, "cpu") == 3
    assert copies_that_fit(sizes, 9 * g, float("inf"), False, "cpu") == 2
    assert copies_that_fit(sizes, 0, -5 * g, False, "cuda:0") == 0
    assert copies_that_fit(sizes, float("inf"), 9 * g, True, "cuda:0") == 2
    assert copies_that_fit(sizes, float("inf"), 3 * g, True, "cuda:0") == 0
    assert copies_that_fit(sizes, float("inf"), -1 * g, True, "cuda:0") == 0
    assert copies_that_fit([], float("inf"), -1 * g, True, "cuda:0") == 0
    with pytest.raises(TpError, match=r"--dense-prefill 12: the copies need 12.0 GiB on cuda:1 but 9.0 GiB is free"):
        copies_that_fit(sizes, 12 * g, 9 * g, False, "cuda:1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_cuda_first_chunk_through_fa2_or_the_warmed_sdpa(shape, tiny_models, monkeypatch):
    """A chunk at position 0 takes FA2 unless its length was warmed (Transformer.warm_prefill,
    as the engine does for -ub), then SDPA's choice (cuDNN on Hopper): the logits agree."""
    path = str(tiny_models[shape])
    lm = load_model(path, n_ctx=300, device="cuda", dtype="bf16", progress=False)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, lm.cfg.n_vocab, (100,), generator=g).tolist()
    from tpruntime import layers
    causal = []
    real = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *a, **k: causal.append(bool(k.get("is_causal"))) or real(*a, **k))
    fa2 = prefill(lm, prompt, n_ubatch=64, all_logits=True).float()
    assert not any(causal)  # the first chunk's causal attention did not go through SDPA
    lm.warm_prefill(64)
    takes = [b.attn for b in lm.blocks if b.attn.flash_shapes and b.attn.whole_groups and not b.attn.window]
    assert takes and all(a.sdpa_lengths == {64} for a in takes)
    causal.clear()
    sdpa = prefill(lm, prompt, n_ubatch=64, all_logits=True).float()
    assert sum(causal) == len(takes)  # now it did, once a layer (the second chunk is not at 0)
    err = (fa2 - sdpa).abs().max(dim=-1).values / sdpa.abs().max(dim=-1).values
    assert err.max().item() < 0.05, err.max()  # two bf16 kernels' roundings; a wrong mask is order one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_cuda_dense_prefill_copies_equal_the_dequantize_pass(shape, tiny_models, monkeypatch):
    """--dense-prefill auto: every matrix keeps its bf16 copy and prompt chunks multiply it,
    bit for bit what the per-chunk dequantize pass into scratch gives; decode is untouched."""
    from tpruntime import qweight
    monkeypatch.setattr(qweight, "QMATMUL_MAX_TOKENS", 0)
    path = str(tiny_models[shape])
    plain = load_model(path, n_ctx=300, device="cuda", dtype="bf16", progress=False)
    kept = load_model(path, n_ctx=300, device="cuda", dtype="bf16", progress=False, dense_prefill="auto")
    mats = [w for blk in kept.blocks for w in blk.matrices()]
    assert all(w.copy is not None for w in mats) and kept.copy_bytes == sum(w.copy_bytes for w in mats)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, plain.cfg.n_vocab, (250,), generator=g).tolist()
    steps = torch.randint(0, plain.cfg.n_vocab, (4,), generator=g).tolist()
    assert torch.equal(_prefill_then_decode(kept, prompt, steps), _prefill_then_decode(plain, prompt, steps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_int8_gemv_error_within_bf16s(tmp_path, monkeypatch):
    """A bf16 model's decode runs its Q4_K matrices through gemv_q8 (x rounded to int8): its
    logits stay within the float32 reference's reach, an order of magnitude of what the exact
    float GEMV gives (llama.cpp's MMVQ makes the same trade)."""
    from tpruntime import qweight
    from tpruntime.synthetic import write_model
    path = str(write_model(tmp_path / "q4k.gguf", "tiny-qwen3", qtype="Q4_K", seed=4, target_std=0.05))
    ref = load_model(path, n_ctx=300, device="cuda", dtype="f32", progress=False, dense_weights=True,
                     fused_ops=False, cuda_graphs=False)
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, ref.cfg.n_vocab, (40,), generator=g).tolist()
    steps = torch.randint(0, ref.cfg.n_vocab, (16,), generator=g).tolist()
    want = _prefill_then_decode(ref, prompt, steps)[len(prompt):]

    def err(int8: bool, **kw) -> float:
        monkeypatch.setattr(qweight, "INT8_ACTIVATIONS", int8)
        lm = load_model(path, n_ctx=300, device="cuda", dtype="bf16", progress=False, **kw)
        got = _prefill_then_decode(lm, prompt, steps)[len(prompt):].float()
        return ((got - want).abs().max(dim=-1).values / want.abs().max(dim=-1).values).max().item()

    e_q8, e_float = err(True), err(False)
    e_torch = err(False, dense_weights=True, fused_ops=False, cuda_graphs=False)
    # Measured on an H200: 0.043 against 0.006 with the float GEMV and 0.012 for torch in bf16
    # (tiny random weights, whose activations are spikier per 32 values than a trained model's);
    # a wrong scale or sub-block would be off by the logits' whole size.
    assert e_q8 < min(0.1, 10 * e_float), (e_q8, e_float, e_torch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA device of sm_90 or newer (programmatic dependent launch)")
def test_cuda_dependent_launches_equal_ordinary_ones(tmp_path, monkeypatch):
    """Decode graphs whose kernels launch as programmatic dependents (each places its programs
    while the previous kernel finishes, the GEMVs load their first weights before waiting) give
    bit for bit the logits of ordinary launches, over hundreds of replays, on a shape whose
    GEMVs split K (their outputs zeroed by the kernel before them, then summed with atomics):
    a kernel that started on its inputs or outputs before the previous one finished would show
    as stale or torn activations."""
    from tpruntime.kernels import common
    from tpruntime.synthetic import write_model
    if common.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol (PDL needs Triton >= 3.4)")
    path = str(write_model(tmp_path / "q4k.gguf", SPLIT_K_SHAPES[0], qtype="Q4_K", seed=8, target_std=0.05))
    g = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, 200, (30,), generator=g).tolist()
    steps = torch.randint(0, 200, (400,), generator=g).tolist()
    outs = {}
    for pdl in (True, False):
        monkeypatch.setattr(common, "PDL", pdl)
        lm = load_model(path, n_ctx=512, device="cuda", dtype="bf16", progress=False)
        assert common.use_pdl(torch.empty(1, device="cuda")) == pdl and lm.graphs is not None
        outs[pdl] = _prefill_then_decode(lm, prompt, steps)
        del lm
    assert torch.equal(outs[True], outs[False])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["tiny-qwen3", *SPLIT_K_SHAPES])
def test_cuda_int8_inputs_from_their_producers(tmp_path, monkeypatch, shape):
    """In a bf16 decode step the norms, the activation and the attention merge write the int8
    form of their output for the GEMV after them (no quantize launches are left), zeroing its
    output where it splits K; the logits equal those of GEMVs that round x themselves, up to
    the order of the per-16 sums."""
    from tpruntime.kernels import gemv_q8
    from tpruntime.qweight import QuantWeight
    from tpruntime.synthetic import write_model
    path = str(write_model(tmp_path / "q4k.gguf", shape, qtype="Q4_K", seed=3, target_std=0.05))
    g = torch.Generator().manual_seed(14)
    prompt = torch.randint(0, 200, (20,), generator=g).tolist()
    steps = torch.randint(0, 200, (8,), generator=g).tolist()
    real = gemv_q8.quantize_x
    calls = []
    monkeypatch.setattr(gemv_q8, "quantize_x", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = load_model(path, n_ctx=128, device="cuda", dtype="bf16", progress=False, cuda_graphs=False)
    prefill(lm, prompt, n_ubatch=64)
    calls.clear()
    fused = torch.cat([lm.forward(torch.tensor([t]), len(prompt) + i).clone() for i, t in enumerate(steps)])
    assert not calls
    monkeypatch.setattr(QuantWeight, "int8_request", lambda self, n: None)
    prefill(lm, prompt, n_ubatch=64)
    own = torch.cat([lm.forward(torch.tensor([t]), len(prompt) + i).clone() for i, t in enumerate(steps)])
    assert calls  # the GEMVs rounded x themselves
    err = ((fused - own).abs().max(dim=-1).values / own.abs().max(dim=-1).values).max().item()
    assert err < 1e-3, err


def test_split_k_shapes_split_where_they_say():
    """SPLIT_K_SHAPES keep their promise (else the GPU tests above would not reach the zeroing)."""
    pytest.importorskip("triton")
    from gguf.constants import GGMLQuantizationType as Q

    from tpruntime.kernels.gemv_q8 import split_k
    a, b = SPLIT_K_SHAPES
    qkv = lambda s: (s.n_head + 2 * s.n_head_kv) * s.head_dim  # noqa: E731
    assert split_k(Q.Q4_K, qkv(a), a.n_embd) > 1 and split_k(Q.Q4_K, a.n_embd, a.n_ff) > 1
    assert split_k(Q.Q4_K, 256, a.n_embd) > 1  # the head over a byte vocabulary
    assert split_k(Q.Q4_K, b.n_embd, b.n_head * b.head_dim) > 1
