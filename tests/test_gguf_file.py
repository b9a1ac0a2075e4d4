"""GGUF validation: valid files parse; each malformation is a one-line error naming the file."""

from __future__ import annotations

import struct

import pytest

from tpruntime.gguf_file import GGUFError, GGUFFile
from tpruntime.models import model_config
from tpruntime.tensors import dense_tensor_table, resolve

F32 = 0
STRING, ARRAY, UINT32, UINT64 = 8, 9, 4, 10


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def build(kvs=(), tensors=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
          align=32) -> bytes:
    """Raw GGUF bytes; kvs: (key, type, payload bytes); tensors: (name, dims, type, offset)."""
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    for key, vtype, payload in kvs:
        out += _s(key) + struct.pack("<I", vtype) + payload
    for name, dims, ttype, offset in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % align)
    return bytes(out + data)


ARCH = ("general.architecture", STRING, _s("llama"))


def write(tmp_path, blob: bytes):
    p = tmp_path / "m.gguf"
    p.write_bytes(blob)
    return p


def test_valid_minimal_file(tmp_path):
    p = write(tmp_path, build([ARCH], [("a", (8,), F32, 0), ("b", (4, 2), F32, 32)], b"\0" * 64))
    gf = GGUFFile(p)
    assert gf.architecture == "llama"
    assert gf.tensors["b"].shape == (2, 4)
    assert gf.raw("b").nbytes == 32


CASES = {
    "bad magic": (build([ARCH], magic=b"GGML"), "bad magic"),
    "version": (build([ARCH], version=7), "unsupported GGUF version 7"),
    "big-endian": (build([ARCH], version=3 << 24), "big-endian GGUF files are not supported"),
    "kv count": (build([ARCH], n_kv=1 << 60), "metadata count"),
    "tensor count": (build([ARCH], n_tensors=1 << 62), "tensor count"),
    "truncated kv": (build([ARCH])[:30], "truncated"),
    "string past end": (build([("k", STRING, struct.pack("<Q", 1 << 40))]), "truncated"),
    "array of arrays": (build([("k", ARRAY, struct.pack("<IQ", ARRAY, 1))]), "array of arrays"),
    "unknown value type": (build([("k", 99, b"")]), "unknown value type 99"),
    "duplicate key": (build([ARCH, ARCH]), "duplicate metadata key"),
    "unknown tensor type": (build([ARCH], [("a", (8,), 250, 0)], b"\0" * 32), "unknown type 250"),
    "zero dim": (build([ARCH], [("a", (8, 0), F32, 0)], b"\0" * 32), "zero or negative"),
    "overflow": (build([ARCH], [("a", (1 << 40, 1 << 40), F32, 0)]), "overflows"),
    "offset past end": (build([ARCH], [("a", (8,), F32, 1 << 20)], b"\0" * 32), "past the end"),
    "misaligned": (build([ARCH], [("a", (8,), F32, 4)], b"\0" * 64), "not aligned"),
    "overlap": (build([ARCH], [("a", (16,), F32, 0), ("b", (8,), F32, 32)], b"\0" * 96), "overlap"),
    "duplicate tensor": (build([ARCH], [("a", (8,), F32, 0), ("a", (8,), F32, 32)], b"\0" * 64),
                         "duplicate tensor"),
    "block size": (build([ARCH], [("a", (33,), 8, 0)], b"\0" * 64), "block size"),
    "too small": (b"GGUF", "too small"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed(tmp_path, case):
    blob, expected = CASES[case]
    p = write(tmp_path, blob)
    with pytest.raises(GGUFError) as e:
        GGUFFile(p)
    msg = str(e.value)
    assert expected in msg and str(p) in msg and "\n" not in msg


def test_missing_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


def _meta(arch="llama", **over):
    base = {f"{arch}.embedding_length": 8, f"{arch}.block_count": 1, f"{arch}.feed_forward_length": 16,
            f"{arch}.attention.head_count": 2, f"{arch}.context_length": 32,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.vocab_size": 4}
    base.update(over)
    kvs = [("general.architecture", STRING, _s(arch))]
    for k, v in base.items():
        if v is None:
            continue
        if isinstance(v, float):
            kvs.append((k, 6, struct.pack("<f", v)))
        else:
            kvs.append((k, UINT32, struct.pack("<I", v)))
    return kvs


def test_missing_required_key(tmp_path):
    gf = GGUFFile(write(tmp_path, build(_meta(**{"llama.block_count": None}))))
    with pytest.raises(Exception, match="missing metadata key 'llama.block_count'"):
        model_config(gf)


def test_unsupported_architecture(tmp_path):
    gf = GGUFFile(write(tmp_path, build(_meta(arch="mamba"))))
    with pytest.raises(Exception, match="architecture 'mamba' is not supported"):
        model_config(gf)


def test_missing_tensor_and_wrong_shape(tmp_path):
    gf = GGUFFile(write(tmp_path, build(_meta(), [("token_embd.weight", (8, 4), F32, 0)], b"\0" * 128)))
    cfg = model_config(gf)
    with pytest.raises(Exception, match="missing tensor 'output_norm.weight'"):
        resolve(gf, dense_tensor_table(cfg))
    gf = GGUFFile(write(tmp_path, build(_meta(), [("token_embd.weight", (8, 5), F32, 0)], b"\0" * 160)))
    with pytest.raises(Exception, match=r"'token_embd.weight' has shape \[5, 8\], the metadata implies \[4, 8\]"):
        resolve(gf, dense_tensor_table(model_config(gf)))
