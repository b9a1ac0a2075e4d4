"""Per-rank loading: read only this rank's slice of each tensor from the memory map,
move the stored bytes to the device and dequantize there."""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES

from .errors import TpError
from .gguf_file import GGUFFile, TensorInfo
from .qweight import QuantWeight
from .quants import F16_FIELDS, dequantize


def read_slice(gf: GGUFFile, info: TensorInfo, sl: tuple[int, range] | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Stored bytes of a slice (torch axis 0 = whole rows, axis 1 = a run of quant blocks in
    every row) and the slice's torch shape."""
    shape = list(info.shape)
    if sl is None:
        return gf.raw(info.name), tuple(shape)
    axis, r = sl
    if axis == 0 and len(shape) > 1:
        rows_per = int(np.prod(shape[1:-1], dtype=np.int64))  # GGUF rows under one index of axis 0
        data = gf.raw(info.name, r.start * rows_per, r.stop * rows_per)
    else:
        # A run of elements inside every GGUF row (a 1-D tensor is a single row).
        if axis != len(shape) - 1 or len(shape) > 2:
            raise AssertionError(f"slice on axis {axis} of {len(shape)}-D tensor {info.name}")
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        if r.start % block or r.stop % block:
            raise TpError(f"{gf.path}: slice {r.start}:{r.stop} of {info.name!r} does not fall on "
                          f"the {info.ggml_type.name} block boundary ({block})")
        rows = gf.raw(info.name).reshape(-1, info.row_bytes)
        data = rows[:, r.start // block * type_size:r.stop // block * type_size]
    shape[axis] = len(r)
    return data, tuple(shape)


def check_block_scales(gf: GGUFFile, info: TensorInfo, raw: torch.Tensor) -> None:
    """A NaN or infinite f16 scale (d, dmin) in one quant block poisons every token that
    meets that row: fail at load with the tensor's name instead of sampling from NaN logits.
    The fields are read from the bytes already on the device (2 bytes per block)."""
    fields = F16_FIELDS.get(info.ggml_type)
    if fields is None or raw.numel() == 0:
        return
    type_size = GGML_QUANT_SIZES[info.ggml_type][1]
    blocks = raw.view(-1, type_size)
    for off in fields:
        if off is None:
            continue
        bad = ~torch.isfinite(blocks[:, off:off + 2].contiguous().view(torch.float16))
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise TpError(f"{gf.path}: tensor {info.name!r} has {int(bad.sum())} NaN or infinite "
                          f"{info.ggml_type.name} block scale(s), the first in block {first} of this rank's slice")


def _slice_to_device(gf: GGUFFile, name: str, sl: tuple[int, range] | None,
                     device: torch.device) -> tuple[TensorInfo, torch.Tensor, tuple[int, ...]]:
    """The stored bytes of a slice on the device (flat uint8), with the tensor's info and the
    slice's shape."""
    info = gf.tensor(name)
    data, shape = read_slice(gf, info, sl)
    raw = torch.from_numpy(np.array(data).reshape(-1)).to(device)  # copy: the map is read-only
    check_block_scales(gf, info, raw)
    return info, raw, shape


def load_tensor(gf: GGUFFile, name: str, sl: tuple[int, range] | None,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    info, raw, shape = _slice_to_device(gf, name, sl, device)
    if 0 in shape:  # a rank that sits this layer out
        return torch.empty(shape, device=device, dtype=dtype)
    return dequantize(raw, info.ggml_type, shape, name=name).to(dtype)


def load_quantized(gf: GGUFFile, name: str, sl: tuple[int, range] | None, device: torch.device,
                   dtype: torch.dtype) -> QuantWeight:
    """A matrix slice kept in its stored blocks (a column slice is a run of whole blocks in
    every row, so it is itself a valid block matrix)."""
    info, raw, shape = _slice_to_device(gf, name, sl, device)
    return QuantWeight(raw, info.ggml_type, shape[0], shape[1], dtype)


def load_raw_rows(gf: GGUFFile, name: str, device: torch.device) -> torch.Tensor:
    """A quantized tensor kept in its stored form, one byte row per torch row (for lookups)."""
    info = gf.tensor(name)
    rows = torch.from_numpy(np.array(gf.raw(info.name).reshape(-1, info.row_bytes))).to(device)
    check_block_scales(gf, info, rows.reshape(-1))
    return rows
