"""GGUF tensor data: dequantization in torch (CPU or CUDA) and synthetic block data.

`dequantize` is bit-identical to gguf-py's numpy reference (`gguf.quants.dequantize`): every
float op below is the same f32 product/sum, in the same order, as in that reference. The integer
unpacking stays in uint8 and only the final values become float32, so memory per element is the
output plus a few bytes; large tensors are done in chunks of blocks to bound the temporaries.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import gguf.quants
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from .errors import TpError

# Blocks per chunk are chosen so a chunk holds about this many output values: large enough that
# kernel launches and Python overhead vanish (also on a GPU), small enough that the chunk-sized
# temporaries (uint8 fields, f32 quants, int32 indices) stay small beside the output itself.
_CHUNK_VALUES = 1 << 22

# The IQ4 non-linear code book, from the reference so that it is written down once.
_IQ4_VALUES = tuple(float(v) for v in gguf.quants.IQ4_NL.kvalues)


# --- unpacking helpers -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Cached so that a CUDA chunk loop does not pay a host-to-device copy per small table.
    return torch.tensor(values, dtype=dtype, device=device)


def _bytes_as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the last axis of uint8 `b` as `dtype`; block fields usually view in place,
    and only bytes at an odd offset or stride get copied first."""
    try:
        return b.view(dtype)
    except RuntimeError:
        return b.clone(memory_format=torch.contiguous_format).view(dtype)


def _half_to_float(h: torch.Tensor) -> torch.Tensor:
    """f16 -> f32 as numpy does it: torch's conversion turns NaNs into its canonical NaN or
    quiets them, numpy keeps sign and payload bits, so NaN lanes are redone by hand. Only on
    the CPU: CUDA has one canonical NaN anyway, and `.any()` would stall the device every call
    (the decode step dequantizes its embedding rows)."""
    x = h.float()
    if h.device.type != "cpu":
        return x
    nan = x.isnan()
    if nan.any():
        bits = h[nan].view(torch.int16).to(torch.int32)
        x[nan] = (((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13)).view(torch.float32)
    return x


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """The f16 field at byte `off` of every block, as an (n, 1) float32 column."""
    return _half_to_float(_bytes_as(blocks[:, off:off + 2], torch.float16))


def _unpack(x: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Split every byte of `x` (n, k) into 8 // bits fields, lowest first, in gguf's layout:
    within each run of `group` bytes all the lowest fields come first, then the next ones."""
    shifts = _const(tuple(range(0, 8, bits)), torch.uint8, x.device).view(1, 1, -1, 1)
    fields = (x.reshape(x.shape[0], -1, 1, group) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(x.shape[0], -1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit sub-block scales and eight 6-bit mins packed into 12 bytes."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _add_(x: torch.Tensor, y: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """x += sign * y in place. Where both are NaN numpy keeps x's payload and torch's add keeps
    y's, so with a NaN in y (never in real files) those lanes are redone out of place (on the
    CPU only, as in _half_to_float)."""
    if y.device.type == "cpu" and y.isnan().any():
        return torch.where(x.isnan(), x, x.add(y, alpha=sign))
    return x.add_(y, alpha=sign)


def _sub_blocks(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """q (n, S*L) float32 times a per-sub-block scale (n, S), minus a per-sub-block offset."""
    n, n_sub = scale.shape
    q = q.view(n, n_sub, -1).mul_(scale.unsqueeze(-1))
    if offset is not None:
        q = _add_(q, offset.unsqueeze(-1), -1)
    return q.view(n, -1)


# --- one function per type: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ------

def _f32(b):
    return _bytes_as(b.clone(), torch.float32)


def _f16_data(b):
    return _half_to_float(_bytes_as(b, torch.float16))


def _bf16(b):
    # A bf16 is the top half of an f32: the same shift as the reference, NaN payloads included.
    return _bytes_as(b, torch.int16).to(torch.int32).bitwise_left_shift_(16).view(torch.float32)


def _q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b):
    return _unpack(b[:, 2:], 16, 4).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b):
    return _add_(_unpack(b[:, 4:], 16, 4).float().mul_(_f16(b, 0)), _f16(b, 2))


def _q5(b, qh_off):
    """Q5_0/Q5_1 quants: low nibbles, plus bit j of the 32-bit qh word for value j."""
    return _unpack(b[:, qh_off + 4:], 16, 4) | (_unpack(b[:, qh_off:qh_off + 4], 1, 1) << 4)


def _q5_0(b):
    return _q5(b, 2).float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b):
    return _add_(_q5(b, 4).float().mul_(_f16(b, 0)), _f16(b, 2))


def _q2_k(b):
    sc = b[:, :16]
    dl = _f16(b, 80) * (sc & 0x0F).float()
    ml = _f16(b, 82) * (sc >> 4).float()
    return _sub_blocks(_unpack(b[:, 16:80], 32, 2).float(), dl, ml)


def _q3_k(b):
    s = b[:, 96:108]
    sc = (_unpack(s[:, :8], 8, 4) | (_unpack(s[:, 8:], 4, 2) << 4)).float().sub_(32)
    # A clear hmask bit means "subtract 4": ql - 4 * (1 - h) == (ql | h << 2) - 4.
    q = (_unpack(b[:, 32:96], 32, 2) | (_unpack(b[:, :32], 32, 1) << 2)).float().sub_(4)
    return _sub_blocks(q, _f16(b, 108) * sc)


def _k4_affine(b, q):
    """Q4_K/Q5_K: value = (d * scale) * q - (dmin * min) per 32-value sub-block."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return _sub_blocks(q.float(), _f16(b, 0) * sc.float(), _f16(b, 2) * mn.float())


def _q4_k(b):
    return _k4_affine(b, _unpack(b[:, 16:], 32, 4))


def _q5_k(b):
    return _k4_affine(b, _unpack(b[:, 48:], 32, 4) | (_unpack(b[:, 16:48], 32, 1) << 4))


def _q6_k(b):
    q = (_unpack(b[:, :128], 64, 4) | (_unpack(b[:, 128:192], 32, 2) << 4)).float().sub_(32)
    return _sub_blocks(q, _f16(b, 208) * b[:, 192:208].view(torch.int8).float())


def _iq4(q):
    # index_select takes int32 indices as they are; plain indexing would widen them to int64.
    return _const(_IQ4_VALUES, torch.float32, q.device).index_select(0, q.reshape(-1).int()).view(q.shape)


def _iq4_nl(b):
    return _iq4(_unpack(b[:, 2:], 16, 4)).mul_(_f16(b, 0))


def _iq4_xs(b):
    sc = (_unpack(b[:, 4:8], 1, 4) | (_unpack(b[:, 2:4], 1, 2) << 4)).float().sub_(32)
    return _sub_blocks(_iq4(_unpack(b[:, 8:], 16, 4)), _f16(b, 0) * sc)


_DEQUANT: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _f32, Q.F16: _f16_data, Q.BF16: _bf16,
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
    Q.IQ4_NL: _iq4_nl, Q.IQ4_XS: _iq4_xs,
}

SUPPORTED_TYPES: frozenset[Q] = frozenset(_DEQUANT)

# Byte offsets of the f16 fields of a block: (d, dmin/m or None). Random data needs them to be
# finite; everything else in a block is valid for any bit pattern.
F16_FIELDS: dict[Q, tuple[int, int | None]] = {
    Q.Q8_0: (0, None), Q.Q4_0: (0, None), Q.Q4_1: (0, 2), Q.Q5_0: (0, None), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108, None), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, None),
    Q.IQ4_NL: (0, None), Q.IQ4_XS: (0, None),
}


def type_nbytes(qtype: Q, n_elements: int) -> int:
    """Stored size of n_elements values of qtype (a whole number of blocks)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_elements % block:
        raise TpError(f"{n_elements} values are not a whole number of {qtype.name} blocks ({block})")
    return n_elements // block * type_size


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...], *, name: str = "?") -> torch.Tensor:
    """Stored GGUF bytes (uint8, rows contiguous, any device) -> float32 tensor of `shape`
    on the same device, bit-identical to gguf.quants.dequantize. Always a fresh tensor."""
    fn = _DEQUANT.get(qtype)
    if fn is None:
        raise TpError(f"tensor {name!r}: quantization type {qtype.name} is not supported")
    if raw.dtype != torch.uint8:
        raise TypeError(f"tensor {name!r}: raw data must be uint8, not {raw.dtype}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    row = shape[-1] if shape else 1
    if row % block:
        raise TpError(f"tensor {name!r}: row length {row} is not a multiple of the "
                      f"{qtype.name} block size {block}")
    n_blocks = math.prod(shape) // block
    if raw.numel() != n_blocks * type_size:
        raise TpError(f"tensor {name!r}: {raw.numel()} bytes of {qtype.name} data, "
                      f"expected {n_blocks * type_size} for shape {shape}")
    blocks = raw.reshape(n_blocks, type_size)
    per = max(1, _CHUNK_VALUES // block)
    if block == 1 or n_blocks <= per:  # float types make no temporaries worth chunking
        return fn(blocks).reshape(shape)
    out = torch.empty((n_blocks, block), dtype=torch.float32, device=raw.device)
    for i in range(0, n_blocks, per):
        out[i:i + per] = fn(blocks[i:i + per])
    return out.view(shape)


# --- synthetic data ----------------------------------------------------------------------------

_SYMMETRIC = {Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q3_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS}


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # The raw bit stream is ~20x faster than rng.bytes and ~2x faster than rng.integers.
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


@functools.cache
def _unit_std_and_offset(qtype: Q) -> tuple[float, float]:
    """(std of the values, dmin / d ratio that centres them) for random blocks with d = 1.

    The quant fields and sub-scales are uniform, so these are properties of the type alone;
    measured once on a sample through the reference rather than derived per layout by hand."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    d_off, m_off = F16_FIELDS[qtype]
    blocks = _random_bytes(np.random.default_rng(0), 4096 * type_size).reshape(-1, type_size)
    blocks[:, d_off:d_off + 2] = np.array([1], np.float16).view(np.uint8)
    ratio = 0.0
    if m_off is not None:
        # Centre the values: with dmin = 0, the mean of d * scale * q is what the mins remove.
        blocks[:, m_off:m_off + 2] = np.array([0], np.float16).view(np.uint8)
        mean = float(gguf.quants.dequantize(blocks, qtype).mean())
        blocks[:, m_off:m_off + 2] = np.array([1], np.float16).view(np.uint8)
        mins = mean - float(gguf.quants.dequantize(blocks, qtype).mean())
        # Q4_1/Q5_1 add m, the K-quants subtract dmin * min: either way, ratio cancels the mean.
        ratio = mean / mins
        blocks[:, m_off:m_off + 2] = np.array([ratio], np.float16).view(np.uint8)
    return float(gguf.quants.dequantize(blocks, qtype).std()), ratio


@functools.lru_cache(maxsize=8)
def _normal_codes(qtype: Q, target_std: float) -> np.ndarray:
    """The 65536 quantiles of N(0, target_std^2) as f16/bf16 bit patterns: indexing this with
    random 16-bit words samples the normal ~5x faster than drawing normals and converting."""
    p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    z = (torch.special.ndtri(p) * target_std).float()
    return z.to(torch.float16 if qtype == Q.F16 else torch.bfloat16).view(torch.int16).numpy()


@functools.lru_cache(maxsize=64)
def _scale_codes(qtype: Q, target_std: float) -> tuple[np.ndarray, np.ndarray]:
    """f16 codes of d and of dmin (or m) for 2^15 scale levels spanning +-30% around the one
    that gives target_std, the spread of real block scales."""
    unit_std, ratio = _unit_std_and_offset(qtype)
    j = np.linspace(0.7, 1.3, 1 << 15)
    d = (j * (target_std / unit_std / math.sqrt(np.mean(j * j)))).astype(np.float32)
    return d.astype(np.float16).view("<u2"), (d * np.float32(ratio)).astype(np.float16).view("<u2")


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator,
                  target_std: float = 0.02) -> np.ndarray:
    """Random valid data for n_blocks blocks of qtype (uint8, n_blocks * type_size bytes) whose
    values look like trained weights: roughly zero-mean with std about target_std."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    if qtype in (Q.F16, Q.BF16):
        words = _random_bytes(rng, 2 * n_blocks).view(np.uint16)
        return _normal_codes(qtype, float(target_std))[words].view(np.uint8)
    if qtype == Q.F32:
        x = rng.standard_normal(n_blocks, dtype=np.float32)
        x *= np.float32(target_std)
        return x.view(np.uint8)
    if qtype not in F16_FIELDS:
        raise TpError(f"cannot make random data for quantization type {qtype.name}")
    out = _random_bytes(rng, n_blocks * type_size).reshape(n_blocks, type_size)
    # The random bits already in the d field pick the block's scale (and, for symmetric types,
    # its sign: that of the block's extreme value); tables turn them into f16 codes.
    words = out.view("<u2")
    d_off, m_off = F16_FIELDS[qtype]
    d_codes, m_codes = _scale_codes(qtype, float(target_std))
    bits = words[:, d_off // 2]
    jitter = bits & 0x7FFF
    if m_off is not None:
        words[:, m_off // 2] = m_codes[jitter]
    words[:, d_off // 2] = d_codes[jitter] | (bits & 0x8000) if qtype in _SYMMETRIC else d_codes[jitter]
    return out.reshape(-1)


_QUANTIZABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})


def quantize_rows(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Quantize float rows with the gguf reference; uint8 of shape (*values.shape[:-1], row bytes)."""
    if qtype not in _QUANTIZABLE:
        raise TpError(f"quantizing to {qtype.name} is not supported "
                      f"(only {', '.join(sorted(t.name for t in _QUANTIZABLE))})")
    values = np.ascontiguousarray(values, dtype=np.float32)
    block = GGML_QUANT_SIZES[qtype][0]
    row = values.shape[-1] if values.ndim else 1
    if row % block:
        raise TpError(f"row length {row} is not a multiple of the {qtype.name} block size {block}")
    q = np.ascontiguousarray(gguf.quants.quantize(values.reshape(-1, row), qtype))
    return q.view(np.uint8).reshape(*values.shape[:-1], -1)
