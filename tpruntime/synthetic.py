"""Random-weight GGUF files of real architectures and shapes, for tests and benchmarks.

The tensor layout comes from the same table the loader reads (tensors.py); the converter-made
reference files in shared/fixtures/ref check that table against llama.cpp's real layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .config import ModelConfig
from .errors import TpError
from .gguf_file import GGUFFile
from .quants import random_blocks
from .tensors import dense_tensor_table
from .tokenizer import BYTE_CHARS


@dataclass(frozen=True)
class Shape:
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    sliding_window: int = 0


SHAPES: dict[str, Shape] = {
    # Tiny shapes keep 256-wide rows so every quant type, K-quants included, applies.
    "tiny-llama": Shape("llama", 256, 2, 4, 2, 64, 512, 4096, rope_base=500000.0, norm_eps=1e-5),
    "tiny-qwen2": Shape("qwen2", 256, 2, 4, 2, 64, 512, 4096, rope_base=1000000.0),
    "tiny-qwen3": Shape("qwen3", 256, 2, 4, 2, 64, 512, 4096, rope_base=1000000.0),
    # Six layers so one global layer follows five sliding-window ones.
    "tiny-gemma3": Shape("gemma3", 256, 6, 4, 1, 64, 512, 4096, rope_base=1000000.0, sliding_window=8),
    "llama-8b": Shape("llama", 4096, 32, 32, 8, 128, 14336, 131072, rope_base=500000.0, norm_eps=1e-5),
    "llama-70b": Shape("llama", 8192, 80, 64, 8, 128, 28672, 131072, rope_base=500000.0, norm_eps=1e-5),
    "qwen2-7b": Shape("qwen2", 3584, 28, 28, 4, 128, 18944, 32768, rope_base=1000000.0),
    "qwen3-8b": Shape("qwen3", 4096, 36, 32, 8, 128, 12288, 40960, rope_base=1000000.0),
    "qwen3-32b": Shape("qwen3", 5120, 64, 64, 8, 128, 25600, 40960, rope_base=1000000.0),
    "gemma3-27b": Shape("gemma3", 5376, 62, 32, 16, 128, 21504, 131072, rope_base=1000000.0,
                        sliding_window=1024),
}

# Which optional tensors each architecture has: the flags its config sets from metadata.
_ARCH_FLAGS = {
    "llama": dict(),
    "qwen2": dict(attn_bias=True),
    "qwen3": dict(qk_norm=True),
    "gemma3": dict(qk_norm=True, sandwich_norm=True),
}

_TOKENIZER_KEY_TYPES = {
    "tokenizer.ggml.tokens": "strings", "tokenizer.ggml.merges": "strings",
    "tokenizer.ggml.scores": "float32s", "tokenizer.ggml.token_type": "int32s",
}


def byte_vocab() -> dict[str, object]:
    """A minimal byte-level BPE vocabulary (256 byte tokens, a few merges, an EOS token),
    for files that need no real tokenizer."""
    alphabet = [BYTE_CHARS[b] for b in range(256)]
    sp = alphabet[ord(" ")]
    merges = [f"{sp} t", "h e", f"{sp}t he", "i n", f"{sp} a", "e r", "o n", "r e"]
    tokens = alphabet + [a + b for a, b in (m.split(" ") for m in merges)] + ["<|endoftext|>"]
    eos = len(tokens) - 1
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * eos + [3],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": eos,
        "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.add_bos_token": False,
    }


def vocab_from(path: str | Path) -> dict[str, object]:
    """The tokenizer.* metadata of another GGUF file (e.g. one of llama.cpp's vocab files)."""
    md = GGUFFile(path).metadata
    return {k: v for k, v in md.items() if k.startswith("tokenizer.")}


def _add_metadata(w: GGUFWriter, key: str, value) -> None:
    kind = _TOKENIZER_KEY_TYPES.get(key)
    if kind == "strings":
        # Pieces may hold surrogate-escaped partial UTF-8: write their original bytes.
        w.add_array(key, [s.encode("utf-8", "surrogateescape") for s in value])
    elif kind == "float32s":
        w.add_key_value(key, [float(x) for x in value], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    elif kind == "int32s":
        w.add_key_value(key, [int(x) for x in value], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value.encode("utf-8", "surrogateescape"))
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise TypeError(f"cannot write metadata {key!r} of type {type(value).__name__}")


def _config(shape: Shape, n_vocab: int) -> ModelConfig:
    return ModelConfig(
        arch=shape.arch, n_vocab=n_vocab, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, n_head_kv=shape.n_head_kv, head_dim=shape.head_dim,
        head_dim_v=shape.head_dim, n_ff=shape.n_ff, n_ctx_train=shape.n_ctx_train,
        norm_eps=shape.norm_eps, rope_base=shape.rope_base, rope_dim=shape.head_dim,
        rope_neox=True, attn_scale=1.0 / math.sqrt(shape.head_dim),
        **_ARCH_FLAGS[shape.arch])


def _fits(qtype: GGMLQuantizationType, row: int) -> GGMLQuantizationType:
    """llama.cpp's fallback when a row is not a whole number of blocks: Q8_0, then F16."""
    for t in (qtype, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16):
        if row % GGML_QUANT_SIZES[t][0] == 0:
            return t
    return GGMLQuantizationType.F32


def write_model(path: str | Path, shape: Shape | str, *, qtype: str = "Q8_0", output_qtype: str | None = None,
                vocab: dict[str, object] | None = None, tied: bool = False, seed: int = 0,
                target_std: float = 0.02, progress: bool = False) -> Path:
    """Write a random-weight GGUF of `shape` with 2-D weights in `qtype` (the output head in
    `output_qtype`, default the same), norms in F32, and the given tokenizer metadata."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    qt = _qtype(qtype)
    out_qt = _qtype(output_qtype) if output_qtype else qt
    vocab = vocab or byte_vocab()
    n_vocab = len(vocab["tokenizer.ggml.tokens"])
    cfg = _config(shape, n_vocab)
    path = Path(path)

    w = GGUFWriter(path, shape.arch)
    a = shape.arch
    w.add_name(f"tpruntime synthetic {a} {shape.n_embd}x{shape.n_layer}")
    w.add_uint32(f"{a}.context_length", shape.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", shape.n_embd)
    w.add_uint32(f"{a}.block_count", shape.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", shape.n_ff)
    w.add_uint32(f"{a}.attention.head_count", shape.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", shape.head_dim)
    w.add_uint32(f"{a}.attention.value_length", shape.head_dim)
    w.add_float32(f"{a}.rope.freq_base", shape.rope_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", shape.norm_eps)
    if shape.sliding_window:
        w.add_uint32(f"{a}.attention.sliding_window", shape.sliding_window)
    ftype = getattr(LlamaFileType, f"MOSTLY_{qt.name}", None) or getattr(LlamaFileType, f"MOSTLY_{qt.name}_M", None)
    if ftype is not None:
        w.add_file_type(int(ftype))
    w.add_quantization_version(2)
    for k, v in vocab.items():
        _add_metadata(w, k, v)

    plan = []
    for spec in dense_tensor_table(cfg):
        if spec.optional or (tied and spec.name == "output.weight"):
            continue
        if len(spec.shape) == 1:
            t = GGMLQuantizationType.F32
        else:
            t = _fits(out_qt if spec.name == "output.weight" else qt, spec.shape[-1])
        n_elem = int(np.prod(spec.shape))
        block, type_size = GGML_QUANT_SIZES[t]
        nbytes = n_elem // block * type_size
        w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), nbytes, raw_dtype=t)
        plan.append((spec, t, n_elem, nbytes))

    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    it = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, desc=f"writing {path.name}", unit="tensor")
    for i, (spec, t, n_elem, nbytes) in enumerate(it):
        rng = np.random.default_rng([seed, i])
        if len(spec.shape) == 1:
            # Norm weights near 1 (Gemma's +1 is folded in by the converter), biases small.
            base = 0.0 if spec.name.endswith(".bias") else 1.0
            data = (base + rng.normal(0.0, 0.1, n_elem)).astype(np.float32).view(np.uint8)
        else:
            data = random_blocks(t, n_elem // GGML_QUANT_SIZES[t][0], rng, target_std=target_std)
        assert data.nbytes == nbytes, spec.name
        w.write_tensor_data(data)
    w.close()
    return path


def _qtype(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise TpError(f"unknown quantization type {name!r}") from None

