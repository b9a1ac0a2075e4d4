"""The elementwise steps of a decoder block, in two interchangeable implementations.

`TorchOps` is the reference (and the CPU path): plain torch, step by step. `TritonOps` does
each step in one fused kernel (tpruntime.kernels.fused, .attention): a decode step is a few
kilobytes of activations, so on the GPU its cost is the number of launches, not the math.
Both have the same signatures and semantics (including the in-place residual add), so the
blocks are written once and the GPU tests compare one against the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


class TorchOps:
    """(`q8`, the next product's request for its input in int8 form, is the fused kernels'
    business: the reference returns plain tensors and the product rounds x itself.)"""

    fused = False

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, q8=None) -> torch.Tensor:
        # torch's fused kernel: one launch on CUDA where the spelled-out formula takes six.
        return F.rms_norm(x.float(), weight.shape, weight, eps).to(out_dtype)

    @classmethod
    def add_rms_norm(cls, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     post_weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, q8=None):
        """h += (post-normed) delta, in place; returns (h, rms_norm(h) * weight)."""
        if post_weight is not None:
            delta = cls.rms_norm(delta, post_weight, eps, torch.float32)
        h.add_(delta)
        return h, cls.rms_norm(h, weight, eps, out_dtype)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, rope_dim: int,
             neox: bool) -> torch.Tensor:
        """x: f32 [T, heads, head_dim]; rotates the first rope_dim features of each head."""
        cos, sin = cos[pos][:, None, :], sin[pos][:, None, :]
        rot, rest = x[..., :rope_dim], x[..., rope_dim:]
        if neox:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    @classmethod
    def qk_norm_rope_store(cls, qkv: torch.Tensor, n_head: int, n_head_kv: int, head_dim: int,
                           head_dim_v: int, *, q_norm, k_norm, eps: float, cos, sin, pos, rope_dim: int,
                           neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, bias=None,
                           q_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Split the fused q|k|v projection, norm and rotate q and k, store k and v at `pos` in
        the layer's cache; returns q [T, n_head, head_dim]."""
        T = qkv.shape[0]
        if bias is not None:
            qkv = qkv + bias
        q, k, v = qkv.float().split([n_head * head_dim, n_head_kv * head_dim, n_head_kv * head_dim_v], dim=-1)
        q, k = q.reshape(T, n_head, head_dim), k.reshape(T, n_head_kv, head_dim)
        if q_norm is not None:
            q, k = cls.rms_norm(q, q_norm, eps, torch.float32), cls.rms_norm(k, k_norm, eps, torch.float32)
        q, k = cls.rope(q, cos, sin, pos, rope_dim, neox), cls.rope(k, cos, sin, pos, rope_dim, neox)
        KVCache.store(k_cache, v_cache, pos, k, v.reshape(T, n_head_kv, head_dim_v))
        return q.to(q_dtype)

    @staticmethod
    def act_mul(gate_up: torch.Tensor, n_ff: int, act: str = "silu",
                out_dtype: torch.dtype = torch.float32, q8=None) -> torch.Tensor:
        gate, up = gate_up.float().split([n_ff, n_ff], dim=-1)
        return (ACTIVATIONS[act](gate) * up).to(out_dtype)

    decode_attention = None  # the reference attends with SDPA over the cache (layers.Attention)
    decode_attention_qkv = None  # (qk_norm_rope_store and decode_attention in one launch)


class TritonOps(TorchOps):
    fused = True

    def __init__(self):
        from .kernels import attention, fused
        self.rms_norm = fused.rms_norm
        self.add_rms_norm = fused.add_rms_norm
        self.qk_norm_rope_store = fused.qk_norm_rope_store
        self.act_mul = fused.act_mul
        self.decode_attention = attention.decode_attention
        self.decode_attention_qkv = attention.decode_attention_qkv if attention.FUSE_QKV else None


def ops_for(fused: bool):
    return TritonOps() if fused else TorchOps()
