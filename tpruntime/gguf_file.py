"""Reading and validating GGUF files: metadata, tensor directory, memory-mapped tensor bytes.

The `gguf` package supplies the format's constants (value types, quant block sizes). The
parsing itself is ours because `gguf.GGUFReader` builds a numpy view per array item (10.8 s
to open Gemma 3's 262k-token vocabulary) and sizes reads from counts it has not checked
against the file. Here every count, length, offset and size is checked against the bytes
that remain before anything is allocated, so a hostile file costs time and memory in
proportion to its own size (Python objects for metadata: at most ~9x its bytes; tensor bytes
are never copied).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import TpError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 60  # far beyond any model, far below int64 overflow

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "?",
}


class GGUFError(TpError):
    """The file is not a GGUF we can trust; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order: dims[0] is the contiguous (input) dimension
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (torch) shape: the GGUF dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def row_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return self.dims[0] // block * type_size


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, gf: "GGUFFile", buf: np.ndarray):
        self.gf = gf
        self.buf = buf
        self.mv = memoryview(buf)
        self.pos = 0
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.gf.error(f"truncated {what} at byte {self.pos} "
                                f"(needs {n} bytes, {self.size - self.pos} left)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, strict: bool = True) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = bytes(self.mv[self.pos:self.pos + n])
        self.pos += n
        try:
            # Vocabulary pieces may hold partial UTF-8 sequences: keep their bytes exactly.
            return raw.decode("utf-8", errors="strict" if strict else "surrogateescape")
        except UnicodeDecodeError:
            raise self.gf.error(f"{what} is not valid UTF-8") from None


class GGUFFile:
    """A validated, memory-mapped GGUF file. Tensor bytes are read lazily from the map."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise GGUFError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:
            raise self.error(f"too small to be a GGUF file ({self.file_size} bytes)")
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise self.error(f"cannot be read: {e.strerror or e}") from None
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self, self._map)
        magic = bytes(cur.mv[0:4])
        if magic != GGUF_MAGIC:
            raise self.error(f"bad magic {magic!r} (expected b'GGUF'): not a GGUF file")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version & 0xFFFFFF == 0 and (self.version >> 24) in SUPPORTED_VERSIONS:
                raise self.error("big-endian GGUF files are not supported")
            raise self.error(f"unsupported GGUF version {self.version} "
                             f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # A key/value pair takes at least 13 bytes and a tensor entry at least 24: counts
        # that cannot fit in the file are rejected before any loop runs.
        if n_kv * 13 > self.file_size - cur.pos:
            raise self.error(f"metadata count {n_kv} cannot fit in a {self.file_size}-byte file")
        if n_tensors * 24 > self.file_size - cur.pos:
            raise self.error(f"tensor count {n_tensors} cannot fit in a {self.file_size}-byte file")

        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise self.error(f"duplicate metadata key {key!r}")
            vtype = self._value_type(cur.u32(f"type of {key!r}"), key)
            self.metadata[key] = self._value(cur, vtype, key)

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(self.alignment, int) or isinstance(self.alignment, bool)
                or self.alignment <= 0 or self.alignment & (self.alignment - 1)):
            raise self.error(f"general.alignment {self.alignment!r} is not a power of two")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name")
            n_dims = cur.u32(f"tensor {name!r} dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.error(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = tuple(cur.u64(f"tensor {name!r} dims") for _ in range(n_dims))
            raw_type = cur.u32(f"tensor {name!r} type")
            offset = cur.u64(f"tensor {name!r} offset")
            infos.append((name, dims, raw_type, offset))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment

        for name, dims, raw_type, offset in infos:
            if name in self.tensors:
                raise self.error(f"duplicate tensor name {name!r}")
            self.tensors[name] = self._tensor_info(name, dims, raw_type, offset)
        self._check_overlaps()

    def _value_type(self, raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.error(f"metadata {key!r} has unknown value type {raw}") from None

    def _value(self, cur: _Cursor, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return cur.string(f"value of {key!r}", strict=False)
        if vtype == GGUFValueType.ARRAY:
            etype = self._value_type(cur.u32(f"element type of {key!r}"), key)
            count = cur.u64(f"length of {key!r}")
            if etype == GGUFValueType.ARRAY:
                raise self.error(f"metadata {key!r} is an array of arrays (not supported)")
            if etype == GGUFValueType.STRING:
                if count * 8 > cur.size - cur.pos:
                    raise self.error(f"metadata {key!r} claims {count} strings, past the end of the file")
                return [cur.string(f"item of {key!r}", strict=False) for _ in range(count)]
            dtype = np.dtype(_NUMPY_DTYPES[etype])
            cur.need(count * dtype.itemsize, f"array {key!r} ({count} items)")
            arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=cur.pos)
            cur.pos += count * dtype.itemsize
            return arr.tolist()
        return cur.scalar(_SCALAR_FORMATS[vtype], f"value of {key!r}")

    def _tensor_info(self, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self.error(f"tensor {name!r} has unknown type {raw_type}") from None
        if ggml_type not in GGML_QUANT_SIZES:
            raise self.error(f"tensor {name!r} has type {ggml_type.name} with no known block size")
        n = 1
        for d in dims:
            if d <= 0:
                raise self.error(f"tensor {name!r} has a zero or negative dimension {dims}")
            n *= d
            if n > MAX_ELEMENTS:
                raise self.error(f"tensor {name!r} element count overflows (dims {dims})")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims[0] % block:
            raise self.error(f"tensor {name!r} row length {dims[0]} is not a multiple of the "
                             f"{ggml_type.name} block size {block}")
        n_bytes = n // block * type_size
        if offset % self.alignment:
            raise self.error(f"tensor {name!r} offset {offset} is not aligned to {self.alignment}")
        start = self.data_offset + offset
        if start + n_bytes > self.file_size:
            raise self.error(f"tensor {name!r} data ({n_bytes} bytes at {start}) runs past the "
                             f"end of the file ({self.file_size} bytes): truncated?")
        return TensorInfo(name, ggml_type, dims, start, n_bytes)

    def _check_overlaps(self) -> None:
        spans = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(spans, spans[1:]):
            if a.offset + a.n_bytes > b.offset:
                raise self.error(f"tensors {a.name!r} and {b.name!r} overlap")

    # -- access --------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise self.error("missing metadata key 'general.architecture'")
        if not isinstance(arch, str) or not arch:
            raise self.error(f"metadata 'general.architecture' should be a non-empty str, got {arch!r:.60}")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self.error(f"missing tensor {name!r}") from None

    def raw(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """The stored bytes of rows [row_start, row_stop) of a tensor, as a uint8 view of the map.

        A "row" is one run of dims[0] elements, so a rank can read just its slice.
        """
        t = self.tensor(name)
        n_rows = t.n_elements // t.dims[0]
        row_stop = n_rows if row_stop is None else row_stop
        if not 0 <= row_start <= row_stop <= n_rows:
            raise ValueError(f"rows {row_start}:{row_stop} out of range for {name} ({n_rows} rows)")
        begin = t.offset + row_start * t.row_bytes
        return self._map[begin:begin + (row_stop - row_start) * t.row_bytes]
