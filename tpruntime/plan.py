"""The shard plan: which slice of every tensor each rank owns, as data.

Models never compute their own slicing: each rank receives its `RankShard`, and the loader
cuts each tensor by the table's `Split` kind and the ranges here. `tpruntime plan`, memory
estimates and the tests read the same object.

Split mode graph (tensor parallel): in every layer a subset of the ranks (all of them, or
`--max-gpu K` rotating from layer to layer) share the layer's work. Attention is divided by
KV-head groups, with the query heads that attend to them; when a layer has fewer KV heads
than ranks the KV heads are replicated and the query heads are divided instead. The FFN is
divided in whole quant blocks of the row-parallel `ffn_down`. Uneven `--tensor-split` ratios
move whole units (heads, blocks), never fractions.

Split mode layer (pipeline): each rank owns a contiguous range of whole layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gguf.constants import GGML_QUANT_SIZES

from .config import ModelConfig
from .errors import TpError
from .tensors import Split, TensorSpec, dense_tensor_table, resolve

SPLIT_MODES = ("graph", "layer")


@dataclass(frozen=True)
class PlanOptions:
    world_size: int = 1
    split_mode: str = "graph"
    max_gpu: int | None = None  # ranks per layer (graph mode); None: all
    tensor_split: tuple[float, ...] | None = None  # relative share of each rank

    def validate(self) -> None:
        n = self.world_size
        if n < 1:
            raise TpError(f"world size {n}: must be >= 1")
        if self.split_mode not in SPLIT_MODES:
            raise TpError(f"--split-mode {self.split_mode!r}: expected one of {', '.join(SPLIT_MODES)}")
        if self.max_gpu is not None and not 1 <= self.max_gpu:
            raise TpError(f"--max-gpu {self.max_gpu}: must be >= 1")
        if self.tensor_split is not None:
            ts = self.tensor_split
            if len(ts) != n:
                raise TpError(f"--tensor-split has {len(ts)} values for {n} ranks")
            if any(not math.isfinite(x) or x < 0 for x in ts) or sum(ts) <= 0:
                raise TpError(f"--tensor-split {','.join(map(str, ts))}: shares must be >= 0, not all 0")

    @property
    def shares(self) -> tuple[float, ...]:
        return self.tensor_split or (1.0,) * self.world_size


@dataclass(frozen=True)
class LayerShard:
    """The part of one layer a rank computes. Query heads always follow their KV heads."""

    kv_heads: range
    q_heads: range
    ff: range  # columns of the FFN intermediate dimension

    @property
    def joins(self) -> bool:
        return len(self.q_heads) > 0 or len(self.ff) > 0


NO_LAYER = LayerShard(range(0), range(0), range(0))


@dataclass(frozen=True)
class RankShard:
    rank: int
    world_size: int
    layers: tuple[LayerShard, ...]  # every layer; NO_LAYER where the rank does not compute it
    vocab: range  # rows of the output head
    vocab_sizes: tuple[int, ...]  # every rank's number of rows, for gathering the logits
    embeds: bool = True  # holds the embedding table (graph: everyone; layer: the first stage)
    split_mode: str = "graph"

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

    def holds(self, spec: TensorSpec) -> bool:
        """Whether this rank reads the tensor at all (layer-mode stages skip other layers)."""
        if spec.layer is not None:
            # Graph mode: a rank outside a layer still applies its replicated norms to the sums.
            return self.split_mode == "graph" or self.layers[spec.layer].joins
        if spec.name == "token_embd.weight":
            return self.embeds
        if spec.name in ("output.weight", "output_norm.weight"):
            return len(self.vocab) > 0
        return True

    @property
    def first_stage(self) -> bool:
        return self.split_mode == "graph" or self.rank == 0

    @property
    def last_stage(self) -> bool:
        return self.split_mode == "graph" or self.rank == self.world_size - 1


def _scaled(r: range, size: int) -> range:
    return range(r.start * size, r.stop * size)


@dataclass(frozen=True)
class Plan:
    cfg: ModelConfig
    options: PlanOptions
    ranks: tuple[RankShard, ...]
    kv_replicated: tuple[bool, ...]  # per layer: KV heads copied to several ranks
    notes: tuple[str, ...] = field(default=())

    def layer_ranks(self, il: int) -> tuple[int, ...]:
        return tuple(r.rank for r in self.ranks if r.layers[il].joins)

    def tensor_slices(self, rank: int, gf) -> list[tuple[TensorSpec, str, tuple[int, range] | None, int, int]]:
        """(spec, file tensor, slice, elements, stored bytes) of every tensor this rank reads."""
        shard = self.ranks[rank]
        specs = dense_tensor_table(self.cfg)
        sources = resolve(gf, specs)
        out = []
        for spec in specs:
            src = sources[spec.name]
            if src is None or not shard.holds(spec):
                continue
            info = gf.tensors[src]
            sl = shard.slice_of(spec, self.cfg)
            shape = list(info.shape)
            if sl is not None:
                shape[sl[0]] = len(sl[1])
            n = math.prod(shape)
            block, type_size = GGML_QUANT_SIZES[info.ggml_type]
            out.append((spec, src, sl, n, n // block * type_size))
        return out

    def resident_bytes(self, rank: int, gf, element_size: int, keeps_quantized=lambda spec, qtype: False) -> int:
        """Weight bytes the loader keeps on this rank's device: the embedding table and the
        matrices `keeps_quantized(spec, qtype)` names as stored (rows are dequantized on lookup,
        matrices read by the quantized kernels), every other tensor dequantized to `element_size`."""
        total = 0
        for spec, src, _, n, nbytes in self.tensor_slices(rank, gf):
            if spec.name == "token_embd.weight" or keeps_quantized(spec, gf.tensors[src].ggml_type):
                total += nbytes
            else:
                total += n * (4 if spec.keeps_f32 else element_size)
        return total

    def kv_bytes_per_token(self, rank: int, element_size: int) -> int:
        cfg = self.cfg
        return sum(len(ls.kv_heads) * (cfg.head_dim + cfg.head_dim_v) * element_size
                   for ls in self.ranks[rank].layers)

    def describe(self, gf, kv_element_size: int = 2) -> str:
        """The human-readable plan `tpruntime plan` prints."""
        cfg, o = self.cfg, self.options
        lines = [f"plan: {cfg.arch}, {cfg.n_layer} layers, {cfg.n_head} q heads / {cfg.n_head_kv} KV heads, "
                 f"n_ff {cfg.n_ff}, vocab {cfg.n_vocab}; world size {o.world_size}, split mode "
                 f"{o.split_mode}" + (f", max-gpu {o.max_gpu}" if o.max_gpu else "")
                 + (f", tensor-split {','.join(f'{x:g}' for x in o.tensor_split)}" if o.tensor_split else "")]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("layers -> ranks:")
        groups: list[tuple[list[int], tuple]] = []
        for il in range(cfg.n_layer):
            key = tuple((r.rank, len(r.layers[il].q_heads), len(r.layers[il].kv_heads), len(r.layers[il].ff))
                        for r in self.ranks if r.layers[il].joins)
            if groups and groups[-1][1] == key:
                groups[-1][0].append(il)
            else:
                groups.append(([il], key))
        for ils, key in groups:
            desc = "  ".join(f"rank {r}: {q}q/{kv}kv heads, ff {ff}" for r, q, kv, ff in key)
            lines.append(f"  {_spans(ils):>9}  {desc}")
        for r in range(o.world_size):
            slices = self.tensor_slices(r, gf)
            total = sum(b for *_, b in slices)
            lines.append(f"rank {r}: weights {total / 2**20:.1f} MiB, KV cache "
                         f"{self.kv_bytes_per_token(r, kv_element_size) / 1024:.1f} KiB/token "
                         f"({kv_element_size}-byte elements), vocab rows "
                         f"{self.ranks[r].vocab.start}:{self.ranks[r].vocab.stop}")
            for spec, src, sl, _, nbytes in slices:
                where = "all" if sl is None else f"axis {sl[0]} [{sl[1].start}:{sl[1].stop}]"
                via = f" (from {src})" if src != spec.name else ""
                lines.append(f"    {spec.name:<32} {spec.split.value:<16} {where:<22} "
                             f"{nbytes / 2**20:>9.2f} MiB{via}")
        return "\n".join(lines)


def split_units(n_units: int, shares: list[float]) -> list[int]:
    """Whole units per share, proportional, largest remainder first (ties to lower index)."""
    total = sum(shares)
    exact = [n_units * s / total for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n_units - sum(counts)]:
        counts[i] += 1
    return counts


def _ranges(counts: list[int], unit: int) -> list[range]:
    out, start = [], 0
    for c in counts:
        out.append(range(start * unit, (start + c) * unit))
        start += c
    return out


def _block(gf, name: str) -> int:
    if gf is None or name not in gf.tensors:
        return 1
    return GGML_QUANT_SIZES[gf.tensors[name].ggml_type][0]


def _attention(cfg: ModelConfig, il: int, shares: list[float], blk_o: int) -> tuple[list[range], list[range], bool]:
    """(kv-head ranges, q-head ranges, kv replicated) for the participants of one layer."""
    g = cfg.n_head // cfg.n_head_kv
    if cfg.n_head_kv >= len(shares):
        # Whole KV-head groups; a unit is enough groups that attn_output's slice is whole blocks.
        u = blk_o // math.gcd(blk_o, g * cfg.head_dim_v)
        if cfg.n_head_kv % u:
            raise TpError(f"layer {il}: {cfg.n_head_kv} KV heads of {g * cfg.head_dim_v} attn_output "
                          f"columns each cannot be split on its {blk_o}-wide quant blocks")
        kv = _ranges(split_units(cfg.n_head_kv // u, shares), u)
        return kv, [range(r.start * g, r.stop * g) for r in kv], False
    # Fewer KV heads than ranks: replicate the KV heads, divide the query heads.
    u = blk_o // math.gcd(blk_o, cfg.head_dim_v)
    if cfg.n_head % u:
        raise TpError(f"layer {il}: {cfg.n_head} query heads cannot be split on attn_output's "
                      f"{blk_o}-wide quant blocks")
    q = _ranges(split_units(cfg.n_head // u, shares), u)
    kv = [range(r.start // g, -(-r.stop // g)) if len(r) else range(0) for r in q]
    return kv, q, True


def make_plan(cfg: ModelConfig, options: PlanOptions = PlanOptions(), gf=None) -> Plan:
    """The plan for every rank. `gf` (the GGUF file) supplies quant block sizes, so row-parallel
    slices land on block boundaries; without it every boundary is allowed."""
    options.validate()
    n = options.world_size
    shares = list(options.shares)
    notes: list[str] = []
    layers = [[NO_LAYER] * cfg.n_layer for _ in range(n)]
    replicated = [False] * cfg.n_layer

    if options.split_mode == "layer":
        if options.max_gpu is not None:
            raise TpError("--max-gpu applies to --split-mode graph")
        counts = split_units(cfg.n_layer, shares)
        if 0 in counts:
            raise TpError(f"--split-mode layer: {cfg.n_layer} layers cannot give every one of "
                          f"{n} ranks a layer with shares {shares}")
        for r, lr in enumerate(_ranges(counts, 1)):
            for il in lr:
                layers[r][il] = LayerShard(range(cfg.n_head_kv), range(cfg.n_head), range(cfg.n_ff))
        sizes = tuple(cfg.n_vocab if r == n - 1 else 0 for r in range(n))
        ranks = tuple(RankShard(r, n, tuple(layers[r]), range(cfg.n_vocab) if r == n - 1 else range(0),
                                sizes, embeds=r == 0, split_mode="layer") for r in range(n))
        return Plan(cfg, options, ranks, tuple(replicated), tuple(notes))

    k = min(options.max_gpu or n, n)
    if options.max_gpu and options.max_gpu > n:
        notes.append(f"--max-gpu {options.max_gpu} > {n} ranks: every layer uses all {n}")
    if k < n:
        notes.append(f"--max-gpu {k}: each layer uses {k} of {n} ranks, rotating from layer to layer")
    for il in range(cfg.n_layer):
        part = sorted((il * k + j) % n for j in range(k))
        sh = [shares[r] for r in part]
        if sum(sh) == 0:
            raise TpError(f"layer {il}: its ranks {part} all have a zero --tensor-split share")
        kv, q, replicated[il] = _attention(cfg, il, sh, _block(gf, f"blk.{il}.attn_output.weight"))
        blk_d = _block(gf, f"blk.{il}.ffn_down.weight")
        if cfg.n_ff % blk_d:
            raise TpError(f"layer {il}: feed_forward_length {cfg.n_ff} is not whole {blk_d}-blocks")
        ff = _ranges(split_units(cfg.n_ff // blk_d, sh), blk_d)
        for j, r in enumerate(part):
            layers[r][il] = LayerShard(kv[j], q[j], ff[j])
    if any(replicated):
        notes.append(f"{cfg.n_head_kv} KV head(s) < ranks per layer: KV heads replicated, query heads split")
    capped = sorted({il for il in range(cfg.n_layer) for r in range(n)
                     if layers[r][il].ff and not layers[r][il].q_heads})
    if capped:
        notes.append(f"layers {_spans(capped)}: fewer attention units than ranks, attention capped "
                     "to fewer ranks than the FFN")
    vocab = _ranges(split_units(cfg.n_vocab, shares), 1)
    sizes = tuple(len(v) for v in vocab)
    ranks = tuple(RankShard(r, n, tuple(layers[r]), vocab[r], sizes) for r in range(n))
    return Plan(cfg, options, ranks, tuple(replicated), tuple(notes))


def _spans(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(out)
