"""The decoder: embedding, a loop over shared blocks, norm, vocabulary head.

Built from a GGUF file, the architecture's config, and this rank's shard of the plan.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from tqdm import tqdm

from .comm import Comm
from .config import ModelConfig
from .errors import TpError
from .gguf_file import GGUFFile
from .kernels import QUANT_KERNEL_TYPES
from .kv_cache import KVCache
from .layers import DecoderBlock, Positions, Rope, add_norm, settle
from .loader import load_quantized, load_raw_rows, load_tensor
from .models import model_config
from .ops import ops_for
from .plan import PlanOptions, RankShard, make_plan
from .qweight import QuantWeight, int8_request, keeps_quantized, matmul
from .quants import dequantize
from .tensors import dense_tensor_table, resolve


class Transformer:
    def __init__(self, gf: GGUFFile, cfg: ModelConfig, shard: RankShard, comm: Comm, *,
                 n_ctx: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = True, dense_weights: bool = False, fused_ops: bool = True,
                 interpret_kernels: bool = False):
        """On CUDA matrices stay in their stored GGUF blocks where a kernel reads the type
        (dense_weights: dequantize all at load) and the elementwise steps run as fused Triton
        kernels (fused_ops False: the torch reference). On the CPU both are torch, unless
        interpret_kernels (tests: the kernels under Triton's interpreter)."""
        self.cfg, self.shard, self.comm = cfg, shard, comm
        self.device, self.dtype, self.n_ctx = torch.device(device), dtype, n_ctx
        kernels = self.device.type == "cuda" or interpret_kernels
        self.ops = ops_for(fused_ops and kernels)
        self.quantized = quantized = not dense_weights and kernels
        specs = dense_tensor_table(cfg)
        sources = resolve(gf, specs)  # fails on a bad file before any weight is read

        self.weight_bytes = 0  # what this rank holds on its device, to check against the plan
        glob: dict[str, torch.Tensor] = {}
        layer_w: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for spec in tqdm(specs, desc="loading", unit="tensor", disable=None if progress else True, leave=False):
            src = sources[spec.name]
            if src is None or spec.name == "token_embd.weight" or not shard.holds(spec):
                continue  # the embedding stays quantized: rows are dequantized on lookup
            sl = shard.slice_of(spec, cfg)
            if keeps_quantized(spec, gf.tensor(src).ggml_type, quantized):
                t = load_quantized(gf, src, sl, self.device, dtype)
                self.weight_bytes += t.nbytes
            else:
                t = load_tensor(gf, src, sl, self.device, torch.float32 if spec.keeps_f32 else dtype)
                self.weight_bytes += t.numel() * t.element_size()
            (layer_w[spec.layer] if spec.layer is not None else glob)[spec.attr] = t

        if shard.embeds:
            embd = gf.tensor("token_embd.weight")
            self.token_embd = load_raw_rows(gf, embd.name, self.device)
            self.weight_bytes += self.token_embd.numel()
            self.token_embd_type = embd.ggml_type
            self.embed_kernel = kernels and embd.ggml_type in QUANT_KERNEL_TYPES
        if shard.last_stage:
            self.output_norm = glob["output_norm"]
            self.output = glob["output"]
        freq_factors = glob.get("rope_freqs")

        # Pipeline stages own whole layers: their blocks sum nothing across ranks.
        block_comm = comm if shard.split_mode == "graph" else Comm()
        ropes: dict[tuple[float, float], Rope] = {}
        self.blocks = []
        for il, ls in enumerate(shard.layers):
            if il not in layer_w:
                continue
            key = (cfg.layer_rope_base(il), cfg.layer_rope_freq_scale(il))
            if key not in ropes:
                ropes[key] = Rope(cfg.rope_dim, key[0], key[1], cfg.rope_neox, n_ctx, self.device,
                                  freq_factors)
            self.blocks.append(DecoderBlock(layer_w[il], cfg, il, ls, ropes[key], block_comm, self.ops, dtype))
        self.cache = KVCache([len(ls.kv_heads) for ls in shard.layers], n_ctx, cfg.head_dim,
                             cfg.head_dim_v, self.device, dtype)
        self.graphs: DecodeGraphs | None = None
        self.copy_bytes = 0  # the dequantized copies of keep_prefill_copies

    def keep_prefill_copies(self, budget: float, fit: bool = False, n_ubatch: int = 512) -> None:
        """Dequantized copies of the quantized matrices, layer by layer while their bytes stay
        within `budget`, for prefill batches to multiply without a dequantize pass. On CUDA they
        must also leave room for a chunk of n_ubatch tokens (copy_reserve): beyond that `fit`
        keeps fewer, else a TpError says how much would fit."""
        mats = [w for blk in self.blocks for w in blk.matrices() if isinstance(w, QuantWeight) and w.copy_bytes]
        room = float("inf")
        if self.device.type == "cuda" and mats and budget > 0:
            torch.cuda.empty_cache()  # the loader's staging blocks count as free
            room = torch.cuda.mem_get_info(self.device)[0] - self.copy_reserve(n_ubatch)
        take = copies_that_fit([w.copy_bytes for w in mats], budget, room, fit, self.device)
        for w in mats[:take]:
            w.keep_copy()
        self.copy_bytes = sum(w.copy_bytes for w in mats[:take])

    def copy_reserve(self, n_ubatch: int) -> int:
        """What the copies must leave free: a prompt chunk's float32 activations (gate|up, the
        activation, q|k|v, a few residual-sized tensors, generously), COPY_RESERVE besides."""
        n_ff = max((blk.ffn.n_ff for blk in self.blocks), default=0)
        qkv = max((sum(blk.attn.attn_qkv.sizes) for blk in self.blocks), default=0)
        return COPY_RESERVE + n_ubatch * 4 * (3 * n_ff + qkv + 8 * self.cfg.n_embd)

    def warm_prefill(self, n_ubatch: int) -> None:
        """Build now what a full prompt chunk at position 0 would build at its first use (the
        attention's cuDNN plan: up to 0.8 s of the first request's time to first token)."""
        if self.device.type == "cuda" and 1 < n_ubatch <= self.n_ctx:
            for blk in self.blocks:
                blk.attn.warm_sdpa(n_ubatch, self.cache)
            torch.cuda.synchronize(self.device)

    def use_cuda_graphs(self, on: bool = True) -> None:
        self.graphs = DecodeGraphs(self) if on and self.device.type == "cuda" else None

    def memory_report(self) -> str:
        """One line: what this rank holds against its plan, its KV cache, its device peak."""
        mib = 2**20
        kv = sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)
        planned = getattr(self, "planned_bytes", None)
        line = (f"rank {self.shard.rank}: weights {self.weight_bytes / mib:.1f} MiB"
                + (f" (plan {planned / mib:.1f} MiB)" if planned is not None else "")
                + f", KV cache {kv / mib:.1f} MiB for {self.n_ctx} tokens")
        if self.copy_bytes:
            line += f", prefill copies {self.copy_bytes / mib:.1f} MiB"
        if self.comm.buffer_bytes:
            line += f", all-reduce buffers {self.comm.buffer_bytes / mib:.1f} MiB"
        if self.device.type == "cuda":
            # symmetric memory is mapped outside torch's caching allocator: its peak leaves it out
            line += f", device peak {torch.cuda.max_memory_allocated(self.device) / mib:.1f} MiB" + (
                " (without the all-reduce buffers)" if self.comm.buffer_bytes else "")
        return line

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.token_embd[tokens]
        if self.embed_kernel:  # one launch; the torch reference is ~25 small kernels in every decode step
            from .kernels import dequantize_rows
            h = dequantize_rows(rows, self.token_embd_type, tokens.shape[0], self.cfg.n_embd, dtype=torch.float32)
        else:
            h = dequantize(rows.reshape(-1), self.token_embd_type, (tokens.shape[0], self.cfg.n_embd))
        return h * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else h

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos0: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions pos0 .. pos0 + T - 1 through the model, filling the KV cache.

        Returns float32 logits over the whole vocabulary on rank 0 ([T, n_vocab] or, by
        default, only the last position's [1, n_vocab]); None on the other ranks. A single
        decoded token replays a captured CUDA graph when graphs are on.
        """
        T = tokens.shape[0]
        if pos0 + T > self.n_ctx:
            raise ValueError(f"positions {pos0}..{pos0 + T} exceed the context of {self.n_ctx}")
        if T == 1 and not all_logits and self.graphs is not None:
            return self.graphs(int(tokens[0]), pos0)
        return self._step(tokens.to(self.device), Positions.eager(pos0, T, self.device), T if all_logits else 1)

    def _step(self, tokens: torch.Tensor, p: Positions, n_out: int) -> torch.Tensor | None:
        """One forward pass; device-side only, so it can be captured in a CUDA graph."""
        shard = self.shard
        if tokens.shape[0] == 1:
            # The decode attention kernel reads the key count before it waits for the kernel
            # launched before it (kernels/attention.py), so it is made here, ahead of every
            # kernel of the step, not by the first layer that needs it.
            p.memo["n_keys"] = p.pos + 1
        if shard.first_stage:
            h = self.embed(tokens)
        else:
            h = self.comm.recv_hidden((tokens.shape[0], self.cfg.n_embd), shard.rank - 1, self.device)
        pending = None
        for blk in self.blocks:
            h, pending = blk(h, pending, p, self.cache)
        if shard.last_stage:
            if n_out < h.shape[0]:  # only the last rows reach the head
                h = h[-n_out:]
                pending = pending and (pending[0][-n_out:], pending[1])
            _, x = add_norm(self.ops, h, pending, self.output_norm, self.cfg.norm_eps, self.dtype,
                            q8=int8_request([self.output], h.shape[0]))
            logits = matmul(x, self.output)
        else:
            self.comm.send_hidden(settle(self.ops, h, pending, self.cfg.norm_eps), shard.rank + 1)
            logits = torch.empty(n_out, 0, device=self.device)
        return self.comm.gather_vocab(logits, shard.vocab_sizes)


class DecodeGraphs:
    """The single-token decode step of this rank, all-reduces included, captured as CUDA
    graphs: one per key-length bucket (powers of two from 256 up to the context), so a step
    attends over at most twice the keys it needs. Per token the host writes the token and
    position into static buffers and replays. Every rank captures the same bucket at the
    same step, since every rank runs the same steps."""

    MIN_BUCKET = 256

    def __init__(self, model: Transformer):
        self.model = model
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def buckets(self) -> list[int]:
        if all(b.attn.reads_n_keys or b.attn.n_head == 0 for b in self.model.blocks):
            return [self.model.n_ctx]  # the decode kernel reads the key count from the device
        out, n = [], self.MIN_BUCKET
        while n < self.model.n_ctx:
            out.append(n)
            n *= 2
        return out + [self.model.n_ctx]

    def bucket(self, pos0: int) -> int:
        return next(b for b in self.buckets() if b > pos0)

    def __call__(self, token: int, pos0: int) -> torch.Tensor | None:
        self.token.fill_(token)  # a kernel with a scalar argument: no host-device sync
        self.pos.fill_(pos0)
        n_keys = self.bucket(pos0)
        if n_keys not in self.graphs:
            self.graphs[n_keys] = self._capture(n_keys)
        graph, logits = self.graphs[n_keys]
        graph.replay()
        return logits

    def _capture(self, n_keys: int):
        # A fresh Positions each pass: its per-step tables must be computed inside the graph.
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):  # warm-up: allocator, library handles, communicators
            for _ in range(2):
                self.model._step(self.token, Positions(self.pos, n_keys), 1)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model._step(self.token, Positions(self.pos, n_keys), 1)
        return graph, logits

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# What --dense-prefill leaves free besides a chunk's activations (Transformer.copy_reserve):
# library workspaces, the prefill scratch of matrices without a copy, the decode graphs.
COPY_RESERVE = 1 << 30


def copies_that_fit(sizes: list[int], budget: float, room: float, fit: bool, device) -> int:
    """How many of the matrices (their copies' bytes, in order) --dense-prefill keeps: those
    within the budget, and within `room` (the device's free memory less the reserve), fewer
    with auto (fit), else a TpError."""
    take, total = 0, 0
    while take < len(sizes) and total + sizes[take] <= budget:
        total += sizes[take]
        take += 1
    if take and total > room and not fit:
        raise TpError(f"--dense-prefill {budget / 2**30:g}: the copies need {total / 2**30:.1f} GiB on {device} "
                      f"but {max(room, 0) / 2**30:.1f} GiB is free after the weights, the KV cache and room for a "
                      f"prompt chunk (or use auto)", local=True)
    while take and total > room:
        take -= 1
        total -= sizes[take]
    return take


def dense_prefill_budget(text: str) -> tuple[float, bool]:
    """--dense-prefill: GiB per rank of dequantized matrix copies for prefill, or auto (as many
    as fit) -> (bytes, fit)."""
    if str(text).strip().lower() == "auto":
        return float("inf"), True
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not 0 <= gib < float("inf"):
        raise TpError(f"--dense-prefill {text!r}: expected a size in GiB (0 for off) or auto")
    return gib * 2**30, False


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The device of this rank: under a launcher, `cuda` means the GPU of its local rank."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TpError(f"--device {device!r}: expected cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise TpError(f"--device {device!r}: expected cpu or cuda")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise TpError("--device cuda: no CUDA device is available (use --device cpu)")
        index = dev.index if dev.index is not None else local_rank
        if index >= n:
            raise TpError(f"local rank {local_rank} needs GPU {index} but this host has {n}: "
                          "use at most one process per GPU", local=True)
        dev = torch.device("cuda", index)
        # Triton launches on the current device and cannot reach another GPU's memory; torch
        # ops follow their tensors, so without this only kernels of ranks > 0 failed.
        torch.cuda.set_device(dev)
    return dev


def load_model(path: str, *, n_ctx: int = 4096, device: str = "cpu", dtype: str = "auto",
               progress: bool = True, options: PlanOptions = PlanOptions(), local_rank: int = 0,
               make_comm: Callable[[torch.device, ModelConfig], Comm] = lambda dev, cfg: Comm(),
               cuda_graphs: bool = True, dense_weights: bool = False, fused_ops: bool = True,
               interpret_kernels: bool = False, dense_prefill: str = "0", n_ubatch: int = 512) -> Transformer:
    """Open, validate and load a GGUF model: this rank's shard of it under `options`.

    Every check (file, flags, plan) runs before `make_comm` joins the other ranks and before
    any weight is read. n_ctx 0 means the model's training context; dtype auto is f32 on
    CPU, bf16 on CUDA. dense_prefill: see dense_prefill_budget (where the matrices stay
    quantized: on CUDA without dense_weights), leaving room for chunks of n_ubatch tokens.
    """
    gf = GGUFFile(path)
    cfg = model_config(gf)
    dev = resolve_device(device, local_rank)
    if dtype == "auto":
        dtype = "f32" if dev.type == "cpu" else "bf16"
    if dtype not in DTYPES:
        raise TpError(f"--dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    if n_ctx < 0:
        raise TpError(f"-c {n_ctx}: the context size must be >= 0")
    n_ctx = n_ctx or cfg.n_ctx_train
    copy_budget, copy_fit = dense_prefill_budget(dense_prefill)
    plan = make_plan(cfg, options, gf)
    comm = make_comm(dev, cfg)
    model = Transformer(gf, cfg, plan.ranks[comm.rank], comm, n_ctx=n_ctx, device=dev,
                        dtype=DTYPES[dtype], progress=progress and comm.rank == 0,
                        dense_weights=dense_weights, fused_ops=fused_ops, interpret_kernels=interpret_kernels)
    model.planned_bytes = plan.resident_bytes(
        comm.rank, gf, DTYPES[dtype].itemsize,
        keeps_quantized=lambda spec, qtype: keeps_quantized(spec, qtype, model.quantized))
    model.keep_prefill_copies(copy_budget, copy_fit, n_ubatch)
    model.use_cuda_graphs(cuda_graphs)
    return model

