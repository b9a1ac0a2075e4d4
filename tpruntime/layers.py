"""Shared blocks of the decoder. Each takes its weights by GGUF name (`attn_q`, `ffn_down`, …)
and the local sizes of this rank's shard; the row-parallel linear owns the all-reduce."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .comm import Comm
from .config import ModelConfig
from .kv_cache import KVCache
from .plan import LayerShard

Weights = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's fused kernel: one launch on CUDA where the spelled-out formula takes six.
    return F.rms_norm(x.float(), weight.shape, weight, eps)


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps  # float32 (TensorSpec.keeps_f32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ColumnLinear:
    """All-to-sharded: full input, this rank's output columns; no communication.

    Several projections of the same input (q/k/v, gate/up) are fused into one weight so a
    decode step reads them in one matrix product; the result is split back by `sizes`."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None):
        self.sizes = [w.shape[0] for w in weights]
        self.weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        biases = biases or [None] * len(weights)
        if any(b is not None for b in biases):
            self.bias = torch.cat([b if b is not None else self.weight.new_zeros(n)
                                   for b, n in zip(biases, self.sizes)]).to(self.weight.dtype)
        else:
            self.bias = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).split(self.sizes, dim=-1)


class RowLinear:
    """Sharded-to-all: this rank's input slice; the partial products are summed over ranks."""

    def __init__(self, weight: torch.Tensor, comm: Comm):
        self.weight, self.comm = weight, comm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(F.linear(x.to(self.weight.dtype), self.weight)).float()


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
    """Rotary position embedding over the first `dim` features of each head, tables precomputed
    in float64 for positions [0, n_pos)."""

    def __init__(self, dim: int, base: float, freq_scale: float, neox: bool, n_pos: int,
                 device: torch.device, freq_factors: torch.Tensor | None = None):
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.double().cpu()
        angles = torch.outer(torch.arange(n_pos, dtype=torch.float64) * freq_scale, inv_freq)
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)
        self.dim, self.neox = dim, neox

    def __call__(self, x: torch.Tensor, p: "Positions") -> torch.Tensor:
        """x: [T, heads, head_dim] at positions p.pos."""
        key = ("rope", id(self))
        if key not in p.memo:  # once per step, not once per layer
            p.memo[key] = (self.cos[p.pos][:, None, :], self.sin[p.pos][:, None, :])
        cos, sin = p.memo[key]
        xf = x.float()
        rot, rest = xf[..., :self.dim], xf[..., self.dim:]
        if self.neox:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class Attention:
    """Causal (optionally sliding-window) attention over this rank's KV-head group."""

    def __init__(self, w: Weights, cfg: ModelConfig, il: int, shard: LayerShard, rope: Rope, comm: Comm):
        self.attn_qkv = ColumnLinear([w["attn_q"], w["attn_k"], w["attn_v"]],
                                     [w.get("attn_q_bias"), w.get("attn_k_bias"), w.get("attn_v_bias")])
        self.attn_output = RowLinear(w["attn_output"], comm)
        self.attn_q_norm = RMSNorm(w["attn_q_norm"], cfg.norm_eps) if cfg.qk_norm else None
        self.attn_k_norm = RMSNorm(w["attn_k_norm"], cfg.norm_eps) if cfg.qk_norm else None
        self.il, self.rope = il, rope
        self.n_head, self.n_head_kv = len(shard.q_heads), len(shard.kv_heads)
        # The local KV head each local query head reads. With replicated KV heads a rank's
        # query heads need not start on a group boundary, so this is a map, not a repeat.
        group = cfg.n_head // cfg.n_head_kv
        self.kv_of_q = torch.tensor([q // group - shard.kv_heads.start for q in shard.q_heads],
                                    dtype=torch.long, device=rope.cos.device)
        # Whole groups in order: SDPA can broadcast the KV heads itself instead of copying them.
        self.whole_groups = self.kv_of_q.tolist() == [i // group for i in range(len(shard.q_heads))]
        self.head_dim, self.head_dim_v = cfg.head_dim, cfg.head_dim_v
        self.scale = cfg.attn_scale
        self.window = cfg.sliding_window if cfg.layer_uses_swa(il) else 0

    def __call__(self, x: torch.Tensor, p: Positions, cache: KVCache) -> torch.Tensor:
        T = x.shape[0]
        if self.n_head == 0:  # this rank sits the layer's attention out: it adds nothing
            return self.attn_output(x.new_zeros(T, 0))
        q, k, v = self.attn_qkv(x)
        q = q.view(T, self.n_head, self.head_dim)
        k = k.view(T, self.n_head_kv, self.head_dim)
        v = v.view(T, self.n_head_kv, self.head_dim_v)
        if self.attn_q_norm is not None:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = self.rope(q, p), self.rope(k, p)
        cache.store(self.il, p.pos, k, v)

        start = max(0, p.first - self.window + 1) if self.window and p.first is not None else 0
        keys, values = cache.view(self.il, start, p.k_stop)  # [n_head_kv, S, d]
        if self.n_head != self.n_head_kv and not self.whole_groups:
            keys, values = keys[self.kv_of_q], values[self.kv_of_q]
        mask = None
        if T > 1 or self.window or p.first is None:
            key = ("mask", start, self.window)
            if key not in p.memo:  # once per step for each kind of layer
                k_pos = torch.arange(start, p.k_stop, device=x.device)[None, :]
                q_pos = p.pos[:, None]
                mask = k_pos <= q_pos
                if self.window:
                    mask &= q_pos - k_pos < self.window
                p.memo[key] = mask
            mask = p.memo[key]
        out = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(0, 1), keys, values, attn_mask=mask,
                                             scale=self.scale, enable_gqa=self.n_head != keys.shape[0])
        return self.attn_output(out.transpose(0, 1).reshape(T, self.n_head * self.head_dim_v))


class GatedFFN:
    """down(act(gate(x)) * up(x)) over this rank's slice of the intermediate dimension."""

    ACTIVATIONS = {
        "silu": F.silu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }

    def __init__(self, w: Weights, cfg: ModelConfig, comm: Comm):
        self.ffn_gate_up = ColumnLinear([w["ffn_gate"], w["ffn_up"]])
        self.ffn_down = RowLinear(w["ffn_down"], comm)
        self.act = self.ACTIVATIONS[cfg.activation]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.ffn_gate_up(x)
        return self.ffn_down(self.act(gate) * up)


class DecoderBlock:
    """h += attn(norm(h)); h += ffn(norm(h)), with optional post-norms (sandwich)."""

    def __init__(self, w: Weights, cfg: ModelConfig, il: int, shard: LayerShard, rope: Rope, comm: Comm):
        eps = cfg.norm_eps
        self.attn_norm = RMSNorm(w["attn_norm"], eps)
        self.attn = Attention(w, cfg, il, shard, rope, comm)
        self.ffn_norm = RMSNorm(w["ffn_norm"], eps)
        self.ffn = GatedFFN(w, cfg, comm)
        self.post_attention_norm = RMSNorm(w["post_attention_norm"], eps) if cfg.sandwich_norm else None
        self.post_ffw_norm = RMSNorm(w["post_ffw_norm"], eps) if cfg.sandwich_norm else None

    def __call__(self, h: torch.Tensor, p: Positions, cache: KVCache, trace=None) -> torch.Tensor:
        a = self.attn(self.attn_norm(h), p, cache)
        if self.post_attention_norm is not None:
            a = self.post_attention_norm(a)
        h = h + a
        f = self.ffn(self.ffn_norm(h))
        if self.post_ffw_norm is not None:
            f = self.post_ffw_norm(f)
        if trace is not None:
            trace("attn_out", self.attn.il, a)
            trace("ffn_out", self.attn.il, f)
        return h + f
