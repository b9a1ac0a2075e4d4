"""tpruntime.quants against gguf-py's numpy reference, bit for bit."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from tpruntime import quants
from tpruntime.errors import TpError
from tpruntime.quants import SUPPORTED_TYPES, dequantize, quantize_rows, random_blocks, type_nbytes

TYPES = sorted(SUPPORTED_TYPES, key=lambda t: t.value)
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}


def shapes(qtype: Q) -> list[tuple[int, ...]]:
    """1, 12 and 34 blocks: a single row, and 2-D shapes with several blocks per row."""
    b = GGML_QUANT_SIZES[qtype][0]
    return [(b,), (4, 3 * b), (17, 2 * b)]


def random_bytes(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator, finite: bool) -> np.ndarray:
    """Uniform random block bytes. finite=True makes every f16/bf16/f32 scale or value finite
    (clearing an exponent bit where the exponent is all ones), keeping their wide range;
    finite=False instead sets the exponent of a quarter of them to all ones (inf or NaN, random
    sign and payload), so that blocks with two non-finite scales are common."""
    raw = rng.integers(0, 256, type_nbytes(qtype, int(np.prod(shape))), dtype=np.uint8)
    if qtype == Q.F32:
        fields = [(raw.view(np.uint32), 0x7F800000, 0x40000000)]
    elif qtype in (Q.F16, Q.BF16):
        fields = [(raw.view(np.uint16), 0x7C00 if qtype == Q.F16 else 0x7F80, 0x4000)]
    else:
        words = raw.view("<u2").reshape(-1, GGML_QUANT_SIZES[qtype][1] // 2)
        fields = [(words[:, off // 2], 0x7C00, 0x4000) for off in quants.F16_FIELDS[qtype] if off is not None]
    for w, exp, bit in fields:
        w[...] = (np.where((w & exp) == exp, w & ~w.dtype.type(bit), w) if finite else
                  np.where(rng.random(w.shape) < 0.25, w | w.dtype.type(exp), w))
    return raw


def reference(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(-1, type_nbytes(qtype, shape[-1]))
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(rows, qtype).reshape(shape)


def assert_bits_equal(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    got_bits, want_bits = got.cpu().numpy().view(np.uint32), want.view(np.uint32)
    bad = np.flatnonzero(got_bits != want_bits)
    assert bad.size == 0, (f"{bad.size} of {want.size} values differ, first at {bad[0]}: "
                           f"{got_bits.flat[bad[0]]:#010x} != {want_bits.flat[bad[0]]:#010x}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_reference(qtype):
    rng = np.random.default_rng(qtype.value)
    for shape in shapes(qtype):
        raw = random_bytes(qtype, shape, rng, finite=True)
        out = dequantize(torch.from_numpy(raw), qtype, shape)
        assert_bits_equal(out, reference(raw, qtype, shape))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_reference_with_nan_and_inf_scales(qtype):
    # Fully random bytes: about 1 in 32 f16 fields is NaN or inf, so NaN payloads, inf * 0 and
    # NaN - NaN all occur, and must come out as the same bit patterns as numpy's.
    rng = np.random.default_rng(1000 + qtype.value)
    b = GGML_QUANT_SIZES[qtype][0]
    shape = (64, 4 * b) if b > 1 else (64, 256)
    raw = random_bytes(qtype, shape, rng, finite=False)
    want = reference(raw, qtype, shape)
    assert not np.isfinite(want).all()
    assert_bits_equal(dequantize(torch.from_numpy(raw), qtype, shape), want)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q5_1, Q.BF16], ids=lambda t: t.name)
def test_chunked_matches_unchunked(qtype, monkeypatch):
    rng = np.random.default_rng(7)
    b = GGML_QUANT_SIZES[qtype][0]
    shape = (10, 7 * b)  # 70 blocks: chunks of 3 leave a partial last chunk
    raw = random_bytes(qtype, shape, rng, finite=False)
    monkeypatch.setattr(quants, "_CHUNK_VALUES", 3 * b)
    assert_bits_equal(dequantize(torch.from_numpy(raw), qtype, shape), reference(raw, qtype, shape))


def test_input_views_and_fresh_output():
    rng = np.random.default_rng(3)
    raw = random_bytes(Q.F32, (64,), rng, finite=True)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw)
    out = dequantize(buf[1:], Q.F32, (8, 8))  # an odd byte offset cannot be viewed as f32
    assert_bits_equal(out, raw.view(np.float32).reshape(8, 8))
    aligned = torch.from_numpy(raw.copy())
    dequantize(aligned, Q.F32, (64,)).add_(1)  # the result must not alias the stored bytes
    assert torch.equal(aligned, torch.from_numpy(raw))
    q = random_bytes(Q.Q4_K, (2, 512), rng, finite=True)
    padded = torch.zeros(2, 300, dtype=torch.uint8)
    padded[:, :288] = torch.from_numpy(q).reshape(2, 288)
    got = dequantize(padded[:, :288], Q.Q4_K, (2, 512))  # rows with a gap between them
    assert_bits_equal(got, reference(q, Q.Q4_K, (2, 512)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("target_std", [0.02, 0.05])
def test_random_blocks_look_like_weights(qtype, target_std):
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = 65536 // block
    data = random_blocks(qtype, n_blocks, np.random.default_rng(5), target_std=target_std)
    assert data.dtype == np.uint8 and data.shape == (n_blocks * type_size,)
    again = random_blocks(qtype, n_blocks, np.random.default_rng(5), target_std=target_std)
    assert np.array_equal(data, again)
    values = dequantize(torch.from_numpy(data), qtype, (n_blocks * block,)).numpy()
    assert np.isfinite(values).all()
    assert target_std / 2 < values.std() < target_std * 2
    assert abs(values.mean()) < target_std / 4
    assert len(np.unique(values)) > 16  # quants and scales really vary


def test_random_blocks_vary_quants_and_sub_scales():
    data = random_blocks(Q.Q4_K, 256, np.random.default_rng(6)).reshape(256, 144)
    assert len(np.unique(data[:, 4:16])) > 200  # 6-bit sub-scales and mins
    assert len(np.unique(data[:, 16:])) == 256  # nibbles
    d = data[:, :2].copy().view(np.float16).astype(np.float32)
    assert np.isfinite(d).all() and (d > 0).all() and len(np.unique(d)) > 50


def test_unsupported_type():
    for qtype in (Q.IQ2_XXS, Q.TQ1_0):
        with pytest.raises(TpError, match=rf"tensor 'blk\.0\.ffn_up\.weight': quantization type {qtype.name} is not supported"):
            dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (256,), name="blk.0.ffn_up.weight")
    assert Q.IQ2_XXS not in SUPPORTED_TYPES and Q.Q4_K in SUPPORTED_TYPES


def test_bad_sizes():
    with pytest.raises(TpError, match="'w'.*row length 100.*block size 32"):
        dequantize(torch.zeros(34 * 4, dtype=torch.uint8), Q.Q8_0, (4, 100), name="w")
    with pytest.raises(TpError, match="'w'.*35 bytes.*expected 34"):
        dequantize(torch.zeros(35, dtype=torch.uint8), Q.Q8_0, (32,), name="w")
    assert type_nbytes(Q.Q4_K, 4096 * 2) == 32 * 144
    assert type_nbytes(Q.F16, 3) == 6
    with pytest.raises(TpError):
        type_nbytes(Q.Q8_0, 33)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda t: t.name)
def test_quantize_rows_round_trip(qtype):
    values = np.random.default_rng(8).normal(0, 1, (3, 64)).astype(np.float32)
    data = quantize_rows(values, qtype)
    assert data.dtype == np.uint8 and data.shape == (3, type_nbytes(qtype, 64))
    back = dequantize(torch.from_numpy(data.reshape(-1)), qtype, values.shape).numpy()
    tol = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.02}.get(qtype, 0.25)
    np.testing.assert_allclose(back, values, atol=tol * np.abs(values).max())


def test_quantize_rows_unsupported():
    with pytest.raises(TpError, match="Q4_K"):
        quantize_rows(np.zeros((2, 256), np.float32), Q.Q4_K)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype, monkeypatch):
    rng = np.random.default_rng(9)
    b = GGML_QUANT_SIZES[qtype][0]
    # A GPU does NaN arithmetic its own way (one canonical NaN), so only finite data here.
    cases = [random_bytes(qtype, s, rng, finite=True) for s in shapes(qtype)]
    cases.append(random_blocks(qtype, 8192 // b * 64, rng))
    for raw in cases:
        shape = (raw.size // type_nbytes(qtype, 4 * b), 4 * b) if raw.size % type_nbytes(qtype, 4 * b) == 0 \
            else (raw.size // type_nbytes(qtype, b) * b,)
        cpu = dequantize(torch.from_numpy(raw), qtype, shape)
        gpu = dequantize(torch.from_numpy(raw).cuda(), qtype, shape)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
    # the chunked path on the device as well
    monkeypatch.setattr(quants, "_CHUNK_VALUES", 5 * b)
    raw = cases[-1]
    gpu = dequantize(torch.from_numpy(raw).cuda(), qtype, (raw.size // type_nbytes(qtype, b) * b,))
    assert torch.equal(gpu.cpu().view(torch.int32), dequantize(torch.from_numpy(raw), qtype, gpu.shape).view(torch.int32))
