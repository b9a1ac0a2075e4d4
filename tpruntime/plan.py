"""The shard plan: which slice of every tensor each rank owns, as data.

Models never compute their own slicing: they receive a `RankShard` and the loader cuts each
tensor by the table's `Split` kind and the ranges here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .errors import TpError
from .tensors import Split, TensorSpec


@dataclass(frozen=True)
class LayerShard:
    """The part of one layer a rank computes. Query heads always follow their KV heads."""

    kv_heads: range
    q_heads: range
    ff: range  # columns of the FFN intermediate dimension

    @property
    def joins(self) -> bool:
        return len(self.kv_heads) > 0 or len(self.ff) > 0


@dataclass(frozen=True)
class RankShard:
    rank: int
    world_size: int
    layers: tuple[LayerShard, ...]
    vocab: range

    def slice_of(self, spec: TensorSpec, cfg: ModelConfig) -> tuple[int, range] | None:
        """(torch axis, index range) of this rank's slice of a tensor; None: the whole tensor."""
        if spec.split == Split.REPLICATED:
            return None
        if spec.split == Split.VOCAB:
            return 0, self.vocab
        ls = self.layers[spec.layer]
        if spec.split == Split.Q_HEADS:
            return 0, _scaled(ls.q_heads, cfg.head_dim)
        if spec.split == Split.KV_HEADS:
            size = cfg.head_dim_v if spec.attr.startswith("attn_v") else cfg.head_dim
            return 0, _scaled(ls.kv_heads, size)
        if spec.split == Split.O_HEADS:
            return 1, _scaled(ls.q_heads, cfg.head_dim_v)
        if spec.split == Split.FF_COLUMN:
            return 0, ls.ff
        if spec.split == Split.FF_ROW:
            return 1, ls.ff
        raise AssertionError(spec.split)


def _scaled(r: range, size: int) -> range:
    return range(r.start * size, r.stop * size)


def single_rank_plan(cfg: ModelConfig) -> RankShard:
    """World size 1: the rank owns everything."""
    layer = LayerShard(kv_heads=range(cfg.n_head_kv), q_heads=range(cfg.n_head), ff=range(cfg.n_ff))
    return RankShard(rank=0, world_size=1, layers=(layer,) * cfg.n_layer, vocab=range(cfg.n_vocab))


def make_plan(cfg: ModelConfig, world_size: int = 1) -> list[RankShard]:
    if world_size != 1:
        raise TpError(f"world size {world_size}: tensor-parallel plans need the engine "
                      "(tpruntime launch); this build runs one rank")
    return [single_rank_plan(cfg)]
