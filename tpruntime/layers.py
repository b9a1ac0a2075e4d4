"""Shared blocks of the decoder. Each takes its weights by GGUF name (`attn_q`, `ffn_down`, …)
and the local sizes of this rank's shard; the row-parallel linear owns the all-reduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import Comm
from .config import ModelConfig
from .kv_cache import KVCache
from .plan import LayerShard

Weights = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps  # float32 (TensorSpec.keeps_f32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ColumnLinear:
    """All-to-sharded: full input, this rank's output columns; no communication."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class RowLinear:
    """Sharded-to-all: this rank's input slice; the partial products are summed over ranks."""

    def __init__(self, weight: torch.Tensor, comm: Comm):
        self.weight, self.comm = weight, comm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(F.linear(x.to(self.weight.dtype), self.weight)).float()


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

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x: [T, heads, head_dim] at positions pos0 .. pos0 + T - 1."""
        T = x.shape[0]
        cos = self.cos[pos0:pos0 + T, None, :]
        sin = self.sin[pos0:pos0 + T, None, :]
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
        self.attn_q = ColumnLinear(w["attn_q"], w.get("attn_q_bias"))
        self.attn_k = ColumnLinear(w["attn_k"], w.get("attn_k_bias"))
        self.attn_v = ColumnLinear(w["attn_v"], w.get("attn_v_bias"))
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
        self.head_dim, self.head_dim_v = cfg.head_dim, cfg.head_dim_v
        self.scale = cfg.attn_scale
        self.window = cfg.sliding_window if cfg.layer_uses_swa(il) else 0

    def __call__(self, x: torch.Tensor, pos0: int, cache: KVCache) -> torch.Tensor:
        T = x.shape[0]
        if self.n_head == 0:  # this rank sits the layer's attention out: it adds nothing
            return self.attn_output(x.new_zeros(T, 0))
        q = self.attn_q(x).view(T, self.n_head, self.head_dim)
        k = self.attn_k(x).view(T, self.n_head_kv, self.head_dim)
        v = self.attn_v(x).view(T, self.n_head_kv, self.head_dim_v)
        if self.attn_q_norm is not None:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = self.rope(q, pos0), self.rope(k, pos0)
        cache.store(self.il, pos0, k, v)

        end = pos0 + T
        start = max(0, pos0 - self.window + 1) if self.window else 0
        keys, values = cache.view(self.il, start, end)  # [n_head_kv, S, d]
        if self.n_head != self.n_head_kv:
            keys, values = keys[self.kv_of_q], values[self.kv_of_q]
        mask = None
        if T > 1 or self.window:
            q_pos = torch.arange(pos0, end, device=x.device)[:, None]
            k_pos = torch.arange(start, end, device=x.device)[None, :]
            mask = k_pos <= q_pos
            if self.window:
                mask &= q_pos - k_pos < self.window
        out = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(0, 1), keys, values,
                                             attn_mask=mask, scale=self.scale)
        return self.attn_output(out.transpose(0, 1).reshape(T, self.n_head * self.head_dim_v))


class GatedFFN:
    """down(act(gate(x)) * up(x)) over this rank's slice of the intermediate dimension."""

    ACTIVATIONS = {
        "silu": F.silu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }

    def __init__(self, w: Weights, cfg: ModelConfig, comm: Comm):
        self.ffn_gate = ColumnLinear(w["ffn_gate"])
        self.ffn_up = ColumnLinear(w["ffn_up"])
        self.ffn_down = RowLinear(w["ffn_down"], comm)
        self.act = self.ACTIVATIONS[cfg.activation]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(self.act(self.ffn_gate(x)) * self.ffn_up(x))


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

    def __call__(self, h: torch.Tensor, pos0: int, cache: KVCache, trace=None) -> torch.Tensor:
        a = self.attn(self.attn_norm(h), pos0, cache)
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
