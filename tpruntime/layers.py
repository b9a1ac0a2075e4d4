"""Shared blocks of the decoder. Each takes its weights by GGUF name (`attn_q`, `ffn_down`, …)
and the local sizes of this rank's shard; the row-parallel linear owns the all-reduce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .comm import Comm
from .config import ModelConfig
from .kv_cache import KVCache
from .plan import LayerShard
from .qweight import QuantWeight, QuantizedX, dense, int8_request, matmul

Weights = dict[str, "torch.Tensor | QuantWeight"]


class ColumnLinear:
    """All-to-sharded: full input, this rank's output columns; no communication.

    Several projections of the same input (q/k/v, gate/up) are fused into one weight so a
    decode step reads them in one matrix product (quantized ones only when they share a type);
    the result is float32, split back by `sizes`."""

    def __init__(self, weights: list):
        self.sizes = [w.shape[0] for w in weights]
        if all(isinstance(w, QuantWeight) for w in weights) and len({w.qtype for w in weights}) == 1:
            self.parts = [QuantWeight.cat(weights) if len(weights) > 1 else weights[0]]
        elif any(isinstance(w, QuantWeight) for w in weights):
            self.parts = weights  # mixed types (Q4_K_M's Q6_K attn_v): one product each
        else:
            self.parts = [torch.cat(weights) if len(weights) > 1 else weights[0]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.parts[0]) if len(self.parts) == 1 else torch.cat([matmul(x, w) for w in self.parts], -1)

    def int8_request(self, n_tokens: int):
        """What to ask of the kernel producing this product's input (tpruntime/qweight.py)."""
        return int8_request(self.parts, n_tokens)


@dataclass(frozen=True)
class Partial:
    """A row-parallel product not yet summed over ranks. Its consumer is always the residual
    add (and, but at the end of a pipeline stage, the next norm), which sums it: where the
    all-reduce and the add + norm can be one kernel, they are (Comm.reduce_add_rms_norm)."""

    value: torch.Tensor
    comm: Comm

    def reduce(self) -> torch.Tensor:
        return self.comm.all_reduce(self.value)

    def __getitem__(self, rows) -> "Partial":
        return Partial(self.value[rows], self.comm)


class RowLinear:
    """Sharded-to-all: this rank's input slice; the partial products, summed over ranks by
    whoever adds them to the residual stream."""

    def __init__(self, weight, comm: Comm):
        self.weight, self.comm = weight, comm

    def __call__(self, x: torch.Tensor) -> Partial:
        return Partial(matmul(x, self.weight), self.comm)

    def int8_request(self, n_tokens: int):
        return int8_request([self.weight], n_tokens)


@dataclass(frozen=True)
class Positions:
    """Where a step's tokens sit. `pos` ([T] int64 on the device) is what rope, the KV cache
    and the mask read, so a captured CUDA graph can be replayed at any position; keys
    [0, k_stop) may be attended to (a Python int: shapes must not depend on device data).
    An eager step knows its first position and attends exactly; a captured decode step
    attends over a fixed bucket and lets the mask hide the positions past `pos`."""

    pos: torch.Tensor
    k_stop: int
    first: int | None = None  # the first position when the host knows it (eager)
    memo: dict = field(default_factory=dict)  # per-step tables shared by the layers

    @staticmethod
    def eager(pos0: int, n: int, device: torch.device) -> "Positions":
        return Positions(torch.arange(pos0, pos0 + n, device=device), pos0 + n, pos0)


class Rope:
    """Rotary position tables for the first `dim` features of each head, computed in float64
    for positions [0, n_pos); the ops rotate with them."""

    def __init__(self, dim: int, base: float, freq_scale: float, neox: bool, n_pos: int,
                 device: torch.device, freq_factors: torch.Tensor | None = None):
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.double().cpu()
        angles = torch.outer(torch.arange(n_pos, dtype=torch.float64) * freq_scale, inv_freq)
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)
        self.dim, self.neox = dim, neox


class Attention:
    """Causal (optionally sliding-window) attention over this rank's KV-head group."""

    def __init__(self, w: Weights, cfg: ModelConfig, il: int, shard: LayerShard, rope: Rope, comm: Comm, ops):
        self.attn_qkv = ColumnLinear([w["attn_q"], w["attn_k"], w["attn_v"]])
        # q/k/v biases (qwen2) as one float32 vector over the fused columns, added inside the
        # split/norm/rope op rather than as a launch of its own
        biases = [w.get("attn_q_bias"), w.get("attn_k_bias"), w.get("attn_v_bias")]
        present = [b for b in biases if b is not None]
        self.attn_qkv_bias = torch.cat([b.float() if b is not None else torch.zeros(n, device=present[0].device)
                                        for b, n in zip(biases, self.attn_qkv.sizes)]) if present else None
        self.attn_output = RowLinear(w["attn_output"], comm)
        self.attn_q_norm = w["attn_q_norm"] if cfg.qk_norm else None
        self.attn_k_norm = w["attn_k_norm"] if cfg.qk_norm else None
        self.il, self.rope, self.ops, self.eps = il, rope, ops, cfg.norm_eps
        self.n_head, self.n_head_kv = len(shard.q_heads), len(shard.kv_heads)
        # The local KV head each local query head reads. With replicated KV heads a rank's
        # query heads need not start on a group boundary, so this is a map, not a repeat.
        group = cfg.n_head // cfg.n_head_kv
        self.kv_of_q = torch.tensor([q // group - shard.kv_heads.start for q in shard.q_heads],
                                    dtype=torch.long, device=rope.cos.device)
        # Whole groups in order: SDPA (and the decode kernel) can broadcast the KV heads itself
        # instead of copying them. They pair query head i with local KV head i // (n_head /
        # n_head_kv), so the local heads must be that even split (an uneven -ts can give a rank
        # one group and part of the next: 8 query heads over 2 KV heads of 6 each).
        n_kv = len(shard.kv_heads)
        per_kv = len(shard.q_heads) // n_kv if n_kv and len(shard.q_heads) % n_kv == 0 else 0
        self.whole_groups = not shard.q_heads or (
            per_kv > 0 and self.kv_of_q.tolist() == [i // per_kv for i in range(len(shard.q_heads))])
        self.head_dim, self.head_dim_v = cfg.head_dim, cfg.head_dim_v
        dev = rope.cos.device
        # flash attention's limits other than the dtype: q/k and v heads of one size up to 256
        # and a multiple of 8 (torch pads others), an sm80 or newer GPU
        self.flash_shapes = (self.head_dim == self.head_dim_v <= 256 and self.head_dim % 8 == 0
                             and dev.type == "cuda"
                             and torch.cuda.get_device_capability(dev)[0] >= 8)
        self.scale = cfg.attn_scale
        self.window = cfg.sliding_window if cfg.layer_uses_swa(il) else 0
        # Prompt lengths whose chunk at position 0 goes through SDPA's own kernel choice (see
        # warm_sdpa); any other length takes the FA2 kernel called directly.
        self.sdpa_lengths: set[int] = set()
        # The split-K decode kernel reads the number of keys from the device, so one captured
        # graph serves every position; it takes query heads in whole groups.
        self.reads_n_keys = ops.decode_attention is not None and self.whole_groups and self.n_head > 0

    def __call__(self, x: "torch.Tensor | QuantizedX", p: Positions, cache: KVCache) -> Partial:
        """x: the normed input (with its int8 form when the q/k/v product asked for one)."""
        T = dense(x).shape[0]
        if self.n_head == 0:  # this rank sits the layer's attention out: it adds nothing
            return self.attn_output(dense(x).new_zeros(T, 0))
        k_cache, v_cache = cache.k[self.il], cache.v[self.il]
        qkv = self.attn_qkv(x)
        rope = dict(q_norm=self.attn_q_norm, k_norm=self.attn_k_norm, eps=self.eps, cos=self.rope.cos,
                    sin=self.rope.sin, rope_dim=self.rope.dim, neox=self.rope.neox, bias=self.attn_qkv_bias)
        decode = T == 1 and self.reads_n_keys  # (then the step has put pos + 1 in p.memo["n_keys"])
        if decode and self.ops.decode_attention_qkv is not None:
            out = self.ops.decode_attention_qkv(qkv, self.n_head, k_cache, v_cache, p.memo["n_keys"], self.scale,
                                                self.window, q8=self.attn_output.int8_request(1), **rope)
            return self.attn_output(out if isinstance(out, QuantizedX) else out.reshape(1, -1))
        q = self.ops.qk_norm_rope_store(qkv, self.n_head, self.n_head_kv, self.head_dim, self.head_dim_v,
                                        pos=p.pos, k_cache=k_cache, v_cache=v_cache, q_dtype=k_cache.dtype, **rope)
        if decode:
            out = self.ops.decode_attention(q[0], k_cache, v_cache, p.memo["n_keys"], self.scale, self.window,
                                            q8=self.attn_output.int8_request(1))
            return self.attn_output(out if isinstance(out, QuantizedX) else out.reshape(1, -1))

        start = max(0, p.first - self.window + 1) if self.window and p.first is not None else 0
        keys, values = cache.view(self.il, start, p.k_stop)  # [n_head_kv, S, d]
        # A prompt from position 0 is plain causal: SDPA's flash kernel masks it itself.
        causal = T > 1 and not self.window and p.first == 0 and p.k_stop == T
        # A later chunk of a prompt (the keys are the cache up to its last position) is causal
        # aligned to the bottom right, which flash attention also masks itself on CUDA; the
        # CPU has no kernel for that alignment, so it builds the mask.
        x = dense(x)
        lower_right = (not causal and T > 1 and not self.window and p.first is not None and x.is_cuda
                       and p.k_stop == p.first + T and self.whole_groups)
        # The bottom-right causal mask runs in flash attention (which also broadcasts grouped KV
        # heads) where flash can run: 16-bit inputs, equal q/k and v head sizes up to 256, sm80
        # or newer; otherwise in the memory-efficient kernel, which cannot broadcast them.
        # A first chunk whose length SDPA has not seen would pay for cuDNN's plan (see
        # warm_sdpa); FA2 needs none, and causal from position 0 is its bottom-right mask too.
        flash = self._takes_fa2(q.dtype) and (lower_right or (causal and T not in self.sdpa_lengths))
        mask = None
        if lower_right and not flash:
            # imported here: the module pulls in torch._dynamo (1.5 s at every start)
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(T, p.k_stop)
        elif not lower_right and not causal and (T > 1 or self.window or p.first is None):
            key = ("mask", start, self.window)
            if key not in p.memo:  # once per step for each kind of layer
                k_pos = torch.arange(start, p.k_stop, device=x.device)[None, :]
                q_pos = p.pos[:, None]
                mask = k_pos <= q_pos
                if self.window:
                    mask &= q_pos - k_pos < self.window
                p.memo[key] = mask
            mask = p.memo[key]
        # Grouped heads are broadcast by SDPA only in its flash and math kernels; with a
        # mask on CUDA, copying the KV heads out lets the memory-efficient kernel take it
        # instead of the math one (which materializes every score in float32).
        if self.n_head != self.n_head_kv and (not self.whole_groups or (mask is not None and x.is_cuda)):
            keys, values = keys[self.kv_of_q], values[self.kv_of_q]
        # 4-D: SDPA's fused CUDA kernels reject 3-D inputs and would fall back to the math one.
        q4, k4, v4 = q.transpose(0, 1)[None], keys[None], values[None]
        if flash:
            # Flash attention aligns its causal mask to the bottom right when there are fewer
            # queries than keys: what torch's causal_lower_right dispatches to. Called directly,
            # since that public wrapper cost ~4 s at its first use (torch._dynamo's import and
            # its __torch_function__ dispatch), inside the first prompt chunk after position 0.
            out = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, True, False,
                                                                     scale=self.scale)[0][0]
        else:
            out = self._sdpa(q4, k4, v4, mask, causal)[0]
        return self.attn_output(out.transpose(0, 1).reshape(T, self.n_head * self.head_dim_v))

    def _takes_fa2(self, dtype: torch.dtype) -> bool:
        """Whether the FA2 kernel, called directly, can take this layer's heads in `dtype`."""
        return self.flash_shapes and self.whole_groups and dtype in (torch.float16, torch.bfloat16)

    def _sdpa(self, q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, mask, causal: bool) -> torch.Tensor:
        """SDPA with its own choice of kernel; q4 [1, H, T, d], k4/v4 [1, Hkv, S, d]."""
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=self.n_head != k4.shape[1])

    def warm_sdpa(self, T: int, cache: KVCache) -> None:
        """Let chunks of T tokens at position 0 take SDPA's choice of kernel, and build its plan
        now. On Hopper SDPA picks cuDNN, faster than FA2 on long chunks (a qwen3-32b layer's
        2048 tokens in 0.17 ms against 0.30 on an H100) but building an execution plan at the
        first call of every new length: 58-62 ms, 800 ms at 2048 (docs/benchmarks.md,
        fourteenth session). So only the full chunk length, which repeats, takes it, warmed at
        load; other lengths, which seldom repeat, take FA2."""
        keys, values = cache.view(self.il, 0, T)  # the layout of the real call, for the same plan
        # (the chunks __call__ sends to SDPA by this set: causal ones, which a window never is)
        if not (self.n_head and not self.window and self._takes_fa2(keys.dtype)):
            return
        q = torch.zeros(T, self.n_head, self.head_dim, dtype=keys.dtype, device=keys.device)
        self._sdpa(q.transpose(0, 1)[None], keys[None], values[None], None, True)
        self.sdpa_lengths.add(T)


class GatedFFN:
    """down(act(gate(x)) * up(x)) over this rank's slice of the intermediate dimension."""

    def __init__(self, w: Weights, cfg: ModelConfig, comm: Comm, ops, dtype: torch.dtype):
        self.ffn_gate_up = ColumnLinear([w["ffn_gate"], w["ffn_up"]])
        self.ffn_down = RowLinear(w["ffn_down"], comm)
        self.n_ff = self.ffn_gate_up.sizes[0]
        self.act, self.ops, self.dtype = cfg.activation, ops, dtype

    def __call__(self, x: "torch.Tensor | QuantizedX") -> Partial:
        gate_up = self.ffn_gate_up(x)
        return self.ffn_down(self.ops.act_mul(gate_up, self.n_ff, self.act, self.dtype,
                                              q8=self.ffn_down.int8_request(gate_up.shape[0])))


# A block output not yet added to the residual stream, with the post-norm weight to apply first.
Pending = Optional[tuple[Partial, Optional[torch.Tensor]]]


class DecoderBlock:
    """h += attn(norm(h)); h += ffn(norm(h)), with optional post-norms (sandwich).

    The FFN's output is returned, not added: the next block adds it inside its first norm
    (one fused kernel for add + norm), applying this block's post-FFN norm on the way."""

    def __init__(self, w: Weights, cfg: ModelConfig, il: int, shard: LayerShard, rope: Rope, comm: Comm,
                 ops, dtype: torch.dtype):
        self.eps, self.ops, self.dtype = cfg.norm_eps, ops, dtype
        self.attn_norm = w["attn_norm"]
        self.attn = Attention(w, cfg, il, shard, rope, comm, ops)
        self.ffn_norm = w["ffn_norm"]
        self.ffn = GatedFFN(w, cfg, comm, ops, dtype)
        self.post_attention_norm = w["post_attention_norm"] if cfg.sandwich_norm else None
        self.post_ffw_norm = w["post_ffw_norm"] if cfg.sandwich_norm else None

    def matrices(self) -> list:
        """Its weight matrices as its products hold them (q/k/v and gate/up fused), in order."""
        return [*self.attn.attn_qkv.parts, self.attn.attn_output.weight, *self.ffn.ffn_gate_up.parts,
                self.ffn.ffn_down.weight]

    def __call__(self, h: torch.Tensor, pending: Pending, p: Positions,
                 cache: KVCache) -> tuple[torch.Tensor, Pending]:
        """h: the float32 residual stream (updated in place); pending: the previous block's
        output still to be added (or None). Returns h and this block's pending output."""
        # Each norm also writes its output in the int8 form where the next product asks for it.
        T = h.shape[0]
        h, x = add_norm(self.ops, h, pending, self.attn_norm, self.eps, self.dtype,
                        q8=self.attn.attn_qkv.int8_request(T))
        h, x = add_norm(self.ops, h, (self.attn(x, p, cache), self.post_attention_norm), self.ffn_norm,
                        self.eps, self.dtype, q8=self.ffn.ffn_gate_up.int8_request(T))
        return h, (self.ffn(x), self.post_ffw_norm)


def add_norm(ops, h: torch.Tensor, pending: Pending, weight: torch.Tensor, eps: float, dtype: torch.dtype,
             q8=None):
    """(h + pending summed over ranks, rms_norm of that * weight): the add fused into the norm
    where there is one, and the all-reduce too where the group can (Comm.reduce_add_rms_norm)."""
    if pending is None:
        return h, ops.rms_norm(h, weight, eps, dtype, q8=q8)
    delta, post = pending
    return delta.comm.reduce_add_rms_norm(ops, h, delta.value, weight, eps, post_weight=post, out_dtype=dtype,
                                          q8=q8)


def settle(ops, h: torch.Tensor, pending: Pending, eps: float) -> torch.Tensor:
    """h + pending without a norm after it (the end of a pipeline stage)."""
    if pending is None:
        return h
    delta, post = pending
    delta = delta.reduce()
    return h.add_(ops.rms_norm(delta, post, eps, torch.float32) if post is not None else delta)
