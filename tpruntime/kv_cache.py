"""The KV cache of this rank: only its own KV heads, for every position of the context."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_head_kv: list[int], n_ctx: int, head_dim: int, head_dim_v: int,
                 device: torch.device, dtype: torch.dtype):
        """n_head_kv: this rank's KV heads in each layer (0 where it does not join the layer)."""
        self.n_ctx = n_ctx
        self.k = [torch.zeros(n, n_ctx, head_dim, device=device, dtype=dtype) for n in n_head_kv]
        self.v = [torch.zeros(n, n_ctx, head_dim_v, device=device, dtype=dtype) for n in n_head_kv]

    @staticmethod
    def bytes_per_token(n_head_kv: list[int], head_dim: int, head_dim_v: int, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(n * (head_dim + head_dim_v) * size for n in n_head_kv)

    @staticmethod
    def store(k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write k, v ([T, heads, d]) at positions pos ([T] int64 on the device) of one layer's
        caches (self.k[il], self.v[il]): the ops take the layer's tensors, not the cache."""
        k_cache.index_copy_(1, pos, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, pos, v.transpose(0, 1).to(v_cache.dtype))

    def view(self, il: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[il][:, start:stop], self.v[il][:, start:stop]
