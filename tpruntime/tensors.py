"""The tensor table: every tensor a model reads, by GGUF name, with its expected shape and
how it is split across ranks. The plan, the loader, `inspect` and the tests all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from gguf.constants import GGMLQuantizationType

from .config import ModelConfig
from .errors import TpError
from .gguf_file import GGUFFile


class Split(str, Enum):
    """How a tensor is divided among the ranks of a layer (torch-order axes)."""

    REPLICATED = "replicated"
    Q_HEADS = "column/q-heads"  # rows of whole query heads
    KV_HEADS = "column/kv-heads"  # rows of whole KV heads
    O_HEADS = "row/q-heads"  # input columns of whole query heads; output is a partial sum
    FF_COLUMN = "column/ff"  # rows of the FFN intermediate dim
    FF_ROW = "row/ff"  # input columns of the FFN intermediate dim; partial sum
    VOCAB = "column/vocab"  # rows of the vocabulary


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # torch order
    split: Split = Split.REPLICATED
    layer: int | None = None
    optional: bool = False
    tied_to: str | None = None  # when absent from the file, read this tensor instead

    @property
    def keeps_f32(self) -> bool:
        """Norm weights and rope factors stay float32 whatever the compute dtype."""
        return self.name.endswith("norm.weight") or self.name.startswith("rope_freqs")

    @property
    def attr(self) -> str:
        """The attribute name models use: the GGUF name without layer prefix and `.weight`."""
        base = self.name.split(".", 2)[-1] if self.layer is not None else self.name
        return base.removesuffix(".weight").replace(".bias", "_bias")


def dense_tensor_table(cfg: ModelConfig) -> list[TensorSpec]:
    """Tensors of the llama-like decoder; which optional ones exist follows the config flags."""
    e, hd, hdv = cfg.n_embd, cfg.head_dim, cfg.head_dim_v
    q, kv, ff = cfg.n_head * hd, cfg.n_head_kv * hd, cfg.n_ff
    specs = [
        TensorSpec("token_embd.weight", (cfg.n_vocab, e)),
        TensorSpec("output_norm.weight", (e,)),
        TensorSpec("output.weight", (cfg.n_vocab, e), Split.VOCAB, tied_to="token_embd.weight"),
        TensorSpec("rope_freqs.weight", (cfg.rope_dim // 2,), optional=True),
    ]
    for il in range(cfg.n_layer):
        def t(name, shape, split=Split.REPLICATED, **kw):
            specs.append(TensorSpec(f"blk.{il}.{name}", shape, split, layer=il, **kw))

        t("attn_norm.weight", (e,))
        t("attn_q.weight", (q, e), Split.Q_HEADS)
        t("attn_k.weight", (kv, e), Split.KV_HEADS)
        t("attn_v.weight", (cfg.n_head_kv * hdv, e), Split.KV_HEADS)
        if cfg.attn_bias:
            t("attn_q.bias", (q,), Split.Q_HEADS)
            t("attn_k.bias", (kv,), Split.KV_HEADS)
            t("attn_v.bias", (cfg.n_head_kv * hdv,), Split.KV_HEADS)
        if cfg.qk_norm:
            t("attn_q_norm.weight", (hd,))
            t("attn_k_norm.weight", (hd,))
        t("attn_output.weight", (e, cfg.n_head * hdv), Split.O_HEADS)
        if cfg.sandwich_norm:
            t("post_attention_norm.weight", (e,))
        t("ffn_norm.weight", (e,))
        t("ffn_gate.weight", (ff, e), Split.FF_COLUMN)
        t("ffn_up.weight", (ff, e), Split.FF_COLUMN)
        t("ffn_down.weight", (e, ff), Split.FF_ROW)
        if cfg.sandwich_norm:
            t("post_ffw_norm.weight", (e,))
    return specs


def _source(gf: GGUFFile, s: TensorSpec) -> str | None:
    return s.name if s.name in gf.tensors else s.tied_to if s.tied_to in gf.tensors else None


def check_shapes(gf: GGUFFile, specs: list[TensorSpec]) -> None:
    """Every tensor the file has must have the shape the metadata implies (absent ones are
    resolve's business), so a file whose metadata disagrees with its tensors is named as such
    before anything (the plan included) computes with those hyperparameters."""
    for s in specs:
        src = _source(gf, s)
        if src is not None and gf.tensors[src].shape != s.shape:
            raise TpError(f"{gf.path}: tensor {src!r} has shape {list(gf.tensors[src].shape)}, the "
                          f"metadata implies {list(s.shape)}")


_FLOAT_VIEWS = {GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2",
                GGMLQuantizationType.BF16: "<u2"}


def check_finite(gf: GGUFFile, name: str) -> None:
    """A NaN or infinity in a norm weight, bias or rope factor makes every logit NaN; these
    1-D tensors are small, so they are read and checked before loading."""
    t = gf.tensors[name]
    view = _FLOAT_VIEWS.get(t.ggml_type)
    if view is None or len(t.dims) != 1:
        return
    v = gf.raw(name).view(view)
    if t.ggml_type == GGMLQuantizationType.BF16:
        v = (v.astype("<u4") << 16).view("<f4")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise TpError(f"{gf.path}: tensor {name!r} holds {bad.size} NaN or infinite value(s), the first "
                      f"at index {bad[0]} ({v[bad[0]]})")


def resolve(gf: GGUFFile, specs: list[TensorSpec]) -> dict[str, str | None]:
    """Map each spec to the file tensor it reads (itself, its tie, or None if optional and
    absent), checking presence, shape and the values of 1-D float tensors first so a bad file
    fails before any weight is read."""
    check_shapes(gf, specs)
    out: dict[str, str | None] = {}
    for s in specs:
        src = out[s.name] = _source(gf, s)
        if src is None and not s.optional:
            raise TpError(f"{gf.path}: missing tensor {s.name!r}")
        if src is not None and len(s.shape) == 1:
            check_finite(gf, src)
    return out
