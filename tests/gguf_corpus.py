"""Malformed GGUF files, made by code rather than kept as blobs in git.

`cases(tmp_dir)` writes each file and returns it with the text its one-line error must contain.
Most cases start from a valid tiny model (tpruntime.synthetic) and change one thing: either
the file is rebuilt from its parsed metadata and tensors (`rebuild`), or a single field is
overwritten at the offset our own parser reports for it (`fields`). The fuzzer (test_fuzz.py)
shares the base files and `validate`.
"""

from __future__ import annotations

import math
import re
import resource
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
from gguf.constants import GGMLQuantizationType as QT, GGUFValueType as VT

from test_gguf_file import build
from tpruntime.gguf_file import GGUFFile, _Cursor
from tpruntime.models import model_config
from tpruntime.plan import make_plan
from tpruntime.synthetic import Shape, byte_vocab, write_model
from tpruntime.tensors import dense_tensor_table, resolve
from tpruntime import load_tokenizer


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    expected: str
    # Set where the message cannot name the file yet; the tests xfail on that alone.
    gap: str | None = None


# -- the in-process path the CLI takes before any weight is read ------------------------------

def validate(path: str | Path, stages: list[str] | None = None) -> None:
    """generate's checks, in its order: parse, tokenizer, config, plan, tensor table (shapes,
    presence, finite norms). Appends each stage's name to `stages` as it starts."""
    stages = [] if stages is None else stages
    stages.append("parse")
    gf = GGUFFile(path)
    stages.append("tokenizer")
    tok = load_tokenizer(path)
    tok.decode(tok.encode("hi there", add_bos=True))
    stages.append("config")
    cfg = model_config(gf)
    stages.append("plan")
    make_plan(cfg, gf=gf)
    stages.append("tensors")
    resolve(gf, dense_tensor_table(cfg))


@contextmanager
def address_space_limit(extra_mb: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus extra_mb while inside, so a
    runaway allocation (a regression) raises MemoryError instead of waking the OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status")
    m = re.search(r"VmSize:\s+(\d+) kB", status.read_text()) if status.exists() else None
    if m:
        cap = int(m.group(1)) * 1024 + extra_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- writing GGUF bytes -------------------------------------------------------------------------

@dataclass(frozen=True)
class T:
    """A metadata value with an explicit GGUF type (etype: the element type of an array)."""
    vtype: VT
    value: Any
    etype: VT | None = None


_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
        VT.INT32: "<i", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT32: "<f", VT.FLOAT64: "<d",
        VT.BOOL: "<?"}


def typed(v: Any) -> T:
    """The type synthetic.write_model gives a Python value (so a rebuilt file matches it)."""
    if isinstance(v, T):
        return v
    if isinstance(v, bool):
        return T(VT.BOOL, v)
    if isinstance(v, int):
        return T(VT.UINT32 if 0 <= v < 2**32 else VT.INT64 if v < 0 else VT.UINT64, v)
    if isinstance(v, float):
        return T(VT.FLOAT32, v)
    if isinstance(v, (str, bytes)):
        return T(VT.STRING, v)
    if isinstance(v, list):
        e = typed(v[0]).vtype if v else VT.UINT8
        return T(VT.ARRAY, v, VT.INT32 if e == VT.UINT32 else e)
    raise TypeError(type(v))


def encode(vtype: VT, v: Any, etype: VT | None = None) -> bytes:
    if vtype == VT.STRING:
        b = v if isinstance(v, bytes) else v.encode("utf-8", "surrogateescape")
        return struct.pack("<Q", len(b)) + b
    if vtype == VT.ARRAY:
        return struct.pack("<IQ", etype, len(v)) + b"".join(encode(etype, x) for x in v)
    return struct.pack(_FMT[vtype], v)


def kv(key: str, value: Any) -> tuple[str, int, bytes]:
    """One entry for test_gguf_file.build."""
    t = typed(value)
    return key, t.vtype, encode(t.vtype, t.value, t.etype)


Tensor = tuple[str, tuple[int, ...], int, bytes]  # name, GGUF dims, ggml type, data


def assemble(base: GGUFFile, *, set: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
             extra: list[tuple[str, Any]] = (), tensors: Callable[[list[Tensor]], list[Tensor]] | None = None,
             align: int = 32) -> bytes:
    """`base` again with metadata keys replaced (set), removed (drop) or appended (extra: may
    repeat a key), and its tensor list passed through `tensors`; data is laid out afresh."""
    set = set or {}
    kvs = [kv(k, set.get(k, v)) for k, v in base.metadata.items() if k not in drop]
    kvs += [kv(k, v) for k, v in extra]
    ts = [(t.name, t.dims, int(t.ggml_type), bytes(base.raw(t.name))) for t in base.tensors.values()]
    ts = tensors(ts) if tensors else ts
    infos, data = [], bytearray()
    for name, dims, ttype, raw in ts:
        data += b"\0" * (-len(data) % align)
        infos.append((name, dims, ttype, len(data)))
        data += raw
    return build(kvs, infos, bytes(data), align=align)


def rebuild(base: GGUFFile, path: Path, **kw) -> Path:
    path.write_bytes(assemble(base, **kw))
    return path


def fields(path: str | Path) -> dict[str, list[tuple[int, str]]]:
    """Where our parser read each header field of a valid file: {what: [(offset, struct format)]}
    (what as in its messages: 'version', "value of 'qwen3.block_count'", "tensor 'x' dims"...)."""
    seen: dict[str, list[tuple[int, str]]] = {}
    scalar = _Cursor.scalar

    def spy(self, fmt, what):
        seen.setdefault(what, []).append((self.pos, fmt))
        return scalar(self, fmt, what)

    with mock.patch.object(_Cursor, "scalar", spy):
        GGUFFile(path)
    return seen


def patch(src: Path, dst: Path, edits: list[tuple[int, str, Any]] | None = None, *,
          cut: int | None = None, replace: tuple[bytes, bytes] | None = None) -> Path:
    """A copy of `src` with struct-packed values written at offsets, cut short, or with the
    first occurrence of some bytes replaced (same length)."""
    blob = bytearray(src.read_bytes())
    for at, fmt, value in edits or []:
        struct.pack_into(fmt, blob, at, value)
    if replace:
        old, new = replace
        assert len(old) == len(new) and old in blob
        at = blob.find(old)
        blob[at:at + len(old)] = new
    dst.write_bytes(bytes(blob[:cut]))
    return dst


# -- valid base files --------------------------------------------------------------------------

# Smaller than synthetic's tiny shapes (32-wide rows) so the fuzzer mostly hits the header.
MICRO = {
    "micro-qwen3": Shape("qwen3", 32, 1, 2, 1, 16, 64, 128),
    "micro-gemma3": Shape("gemma3", 32, 2, 2, 1, 16, 64, 128, sliding_window=8),
}


def spm_vocab() -> dict[str, object]:
    """A small SentencePiece-style (llama) vocabulary: unk, bos, eos, 256 byte tokens, pieces."""
    pieces = ["\u2581", "\u2581h", "\u2581hi", "h", "i", "e", "\u2581t", "\u2581th"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def base_files(tmp_dir: Path) -> dict[str, Path]:
    """Valid files: synthetic's tiny-qwen3 and two micro models (gpt2 and SPM vocabularies)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return {
        "tiny-qwen3": write_model(tmp_dir / "tiny-qwen3.gguf", "tiny-qwen3", qtype="Q8_0"),
        "micro-qwen3": write_model(tmp_dir / "micro-qwen3.gguf", MICRO["micro-qwen3"], vocab=byte_vocab()),
        "micro-gemma3": write_model(tmp_dir / "micro-gemma3.gguf", MICRO["micro-gemma3"], vocab=spm_vocab()),
    }


# -- the corpus ---------------------------------------------------------------------------------


def cases(tmp_dir: str | Path) -> list[Case]:
    tmp_dir = Path(tmp_dir)
    d = tmp_dir / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    base = base_files(tmp_dir / "base")["tiny-qwen3"]
    gf = GGUFFile(base)
    at = fields(base)
    out: list[Case] = []

    def new(name: str, expected: str, gap: str | None = None) -> Path:
        out.append(Case(name, d / f"{name}.gguf", expected, gap))
        return out[-1].path

    def field(what: str, value: Any, k: int = 0) -> tuple[int, str, Any]:
        pos, fmt = at[what][k]
        return pos, fmt, value

    def cut(name, expected, n):
        patch(base, new(name, expected), cut=n)

    def poke(name, expected, *edits):
        patch(base, new(name, expected), list(edits))

    def meta(name, expected, gap=None, **kw):
        rebuild(gf, new(name, expected, gap), **kw)

    def retensor(name, expected, fn):
        rebuild(gf, new(name, expected), tensors=fn)

    def rel(tensor: str) -> int:  # a tensor's offset as stored: relative to the data section
        return gf.tensors[tensor].offset - gf.data_offset

    def float_at(tensor: str, index: int, value: float) -> tuple[int, str, float]:
        return gf.tensors[tensor].offset + 4 * index, "<f", value

    def as_type(name: str, ttype: QT, dtype: str, bad: int):
        """The 1-D F32 tensor `name` stored as F16/BF16 with one non-finite value."""
        def fn(ts):
            res = []
            for n, dims, t, raw in ts:
                if n == name:
                    v = np.frombuffer(raw, "<f4").copy()
                    v[bad] = np.inf
                    raw = (v.astype(dtype) if dtype == "<f2" else (v.view("<u4") >> 16).astype("<u2")).tobytes()
                    t = int(ttype)
                res.append((n, dims, t, raw))
            return res
        return fn

    def drop_tensor(name):
        return lambda ts: [t for t in ts if t[0] != name]

    def with_dims(name, dims):
        return lambda ts: [(n, dims if n == name else dm, t, raw) for n, dm, t, raw in ts]

    last = max(gf.tensors.values(), key=lambda t: t.offset).name
    a = "qwen3"
    tokens, types = gf.metadata["tokenizer.ggml.tokens"], gf.metadata["tokenizer.ggml.token_type"]

    # file and header
    new("missing-file", "no such file")
    new("directory", "is a directory").mkdir(exist_ok=True)
    new("empty-file", "too small to be a GGUF file (0 bytes)").write_bytes(b"")
    cut("truncated-header", "too small to be a GGUF file (20 bytes)", 20)
    poke("bad-magic", "bad magic b'GGML'", (0, "4s", b"GGML"))
    poke("version-1", "unsupported GGUF version 1", field("version", 1))
    poke("big-endian", "big-endian GGUF files are not supported", field("version", 3 << 24))
    poke("kv-count-huge", f"metadata count {2**64 - 1} cannot fit", field("metadata count", 2**64 - 1))
    poke("tensor-count-huge", f"tensor count {2**63} cannot fit", field("tensor count", 2**63))

    # metadata
    # (a cut early in the metadata fails the count check above: these cut where counts still fit)
    cut("truncated-kv-key", "truncated metadata key #20", at["metadata key #20 length"][0][0] + 11)
    cut("truncated-kv-value", "truncated value of 'tokenizer.ggml.eos_token_id'",
        at["value of 'tokenizer.ggml.eos_token_id'"][0][0] + 2)
    cut("truncated-string-array", "truncated item of 'tokenizer.ggml.merges' length",
        at["item of 'tokenizer.ggml.merges' length"][7][0] + 2)
    poke("string-length-past-end", "truncated value of 'general.name'",
         field("value of 'general.name' length", 10**12))
    poke("array-of-arrays", "'tokenizer.ggml.tokens' is an array of arrays",
         field("element type of 'tokenizer.ggml.tokens'", int(VT.ARRAY)))
    poke("unknown-value-type", f"'{a}.block_count' has unknown value type 200",
         field(f"type of '{a}.block_count'", 200))
    poke("string-array-count-huge", f"'tokenizer.ggml.tokens' claims {2**62} strings, past the end",
         field("length of 'tokenizer.ggml.tokens'", 2**62))
    poke("numeric-array-count-huge", "truncated array 'tokenizer.ggml.token_type'",
         field("length of 'tokenizer.ggml.token_type'", 2**61))
    patch(base, new("non-utf8-key", "metadata key #1 is not valid UTF-8"),
          replace=(b"general.name", b"general.n\xffme"))
    meta("duplicate-key", f"duplicate metadata key '{a}.block_count'", extra=[(f"{a}.block_count", 2)])
    meta("alignment-not-power-of-two", "general.alignment 48 is not a power of two",
         extra=[("general.alignment", 48)])

    # tensor directory and data
    cut("truncated-tensor-info", "truncated tensor 'blk.0.attn_q.weight' dims",
        at["tensor 'blk.0.attn_q.weight' dims"][0][0] + 3)
    cut("truncated-tensor-data", f"tensor '{last}' data", len(base.read_bytes()) - 1000)
    patch(base, new("non-utf8-tensor-name", "tensor #1 name is not valid UTF-8"),
          replace=(b"output_norm.weight", b"output_norm.weig\xc3("))
    poke("too-many-dims", "'blk.0.attn_q.weight' has 5 dimensions",
         field("tensor 'blk.0.attn_q.weight' dimension count", 5))
    poke("zero-dim", "'blk.0.attn_q.weight' has a zero or negative dimension",
         field("tensor 'blk.0.attn_q.weight' dims", 0, k=1))
    retensor("dims-overflow-64-bits", "'blk.0.ffn_up.weight' element count overflows",
             with_dims("blk.0.ffn_up.weight", (2**32, 2**32, 2**8)))
    poke("unknown-tensor-type", "'blk.0.attn_k.weight' has unknown type 99",
         field("tensor 'blk.0.attn_k.weight' type", 99))
    retensor("row-not-whole-blocks", "row length 250 is not a multiple of the Q8_0 block size 32",
             with_dims("blk.0.attn_q.weight", (250, 256)))
    poke("offset-past-end", "'output.weight' data", field("tensor 'output.weight' offset", 2**40))
    poke("offset-misaligned", "'output_norm.weight' offset", field("tensor 'output_norm.weight' offset",
                                                                    rel("output_norm.weight") + 4))
    poke("overlapping-tensors", "overlap", field("tensor 'blk.0.attn_norm.weight' offset", rel("output_norm.weight")))
    retensor("duplicate-tensor", "duplicate tensor name 'output_norm.weight'", lambda ts: ts + [ts[1]])

    # configuration
    meta("missing-architecture", "missing metadata key 'general.architecture'", drop=("general.architecture",))
    meta("architecture-not-string", "'general.architecture' should be a non-empty str, got 7",
         set={"general.architecture": 7})
    meta("unsupported-architecture", "architecture 'mamba' is not supported", set={"general.architecture": "mamba"})
    meta("missing-block-count", f"missing metadata key '{a}.block_count'", drop=(f"{a}.block_count",))
    meta("block-count-string", f"'{a}.block_count' should be int, got str", set={f"{a}.block_count": "2"})
    # Found by the fuzzer: the tensor table and the plan were built for every layer (MemoryError).
    meta("block-count-huge", f"'{a}.block_count' = 4294967295 (must be <= 4096)", set={f"{a}.block_count": 2**32 - 1})
    meta("block-count-beyond-tensors", f"'{a}.block_count' = 1000, more layers than the file has tensors (25)",
         set={f"{a}.block_count": 1000})
    meta("embedding-length-negative", f"'{a}.embedding_length' = -256 (must be >= 1)",
         set={f"{a}.embedding_length": T(VT.INT32, -256)})
    meta("head-counts-not-dividing", "head_count 4 is not a multiple of head_count_kv 3",
         set={f"{a}.attention.head_count_kv": 3})
    meta("context-length-array", f"'{a}.context_length': per-layer values [4096, 2048]",
         set={f"{a}.context_length": [4096, 2048]})
    meta("epsilon-nan", f"'{a}.attention.layer_norm_rms_epsilon' is not finite",
         set={f"{a}.attention.layer_norm_rms_epsilon": math.nan})
    meta("rope-base-zero", f"'{a}.rope.freq_base' = 0.0 (must be > 0)", set={f"{a}.rope.freq_base": 0.0})
    # Found by this corpus: ZeroDivisionError.
    meta("rope-scale-linear-zero", f"'{a}.rope.scale_linear' = 0.0 (must be > 0)",
         extra=[(f"{a}.rope.scale_linear", 0.0)])
    meta("vocab-size-mismatch", "vocab_size 300 disagrees with 265 tokenizer tokens", extra=[(f"{a}.vocab_size", 300)])
    meta("embedding-rows-mismatch", "'token_embd.weight' has shape [265, 256], the metadata implies [266, 256]",
         set={"tokenizer.ggml.tokens": tokens + ["<extra>"], "tokenizer.ggml.token_type": types + [1]})
    # Found by the fuzzer: these two used to fail in the plan, as an odd split not naming the file.
    meta("ffn-length-mismatch", "'blk.0.ffn_gate.weight' has shape [512, 256], the metadata implies [500, 256]",
         set={f"{a}.feed_forward_length": 500})
    meta("value-length-mismatch", "'blk.0.attn_v.weight' has shape [128, 256], the metadata implies [144, 256]",
         set={f"{a}.attention.value_length": 72})

    # tensors the table needs, and their values
    retensor("missing-tensor", "missing tensor 'blk.1.ffn_down.weight'", drop_tensor("blk.1.ffn_down.weight"))
    poke("nan-norm", "'blk.0.attn_norm.weight' holds 1 NaN or infinite value(s), the first at index 3 (nan)",
         float_at("blk.0.attn_norm.weight", 3, math.nan))
    retensor("inf-f16-norm", "'output_norm.weight' holds 1 NaN or infinite value(s), the first at index 5 (inf)",
             as_type("output_norm.weight", QT.F16, "<f2", 5))
    retensor("inf-bf16-norm", "'blk.1.ffn_norm.weight' holds 1 NaN or infinite value(s), the first at index 7 (inf)",
             as_type("blk.1.ffn_norm.weight", QT.BF16, "bf16", 7))

    # tokenizer metadata (read before the model in `generate`); found by the fuzzer: a TypeError
    # (unhashable list) and a message broken over two lines
    meta("pre-tokenizer-array", "unsupported pre-tokenizer", set={"tokenizer.ggml.pre": ["gpt-2"]})
    meta("tokenizer-model-newline", "unsupported tokenizer model 'gpt2\\nx'",
         set={"tokenizer.ggml.model": "gpt2\nx"})
    return out
