"""Typed model configuration read from GGUF metadata, with llama.cpp's defaults.

Architectures differ only in the fields below (norm placement, qk-norm, biases, rope style,
sliding window, activation, embedding scale); the shared model code reads these flags and
never asks which architecture it is running.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import TpError

# Far beyond any model (the largest have ~130 layers), small enough that per-layer tables stay
# cheap: a hostile block_count must not make the tensor table or the plan take minutes.
MAX_LAYERS = 4096


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size (GGUF attention.key_length)
    head_dim_v: int  # value head size (attention.value_length)
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope_dim: int  # leading dims of each head that are rotated
    rope_neox: bool  # rotate (i, i + d/2) pairs; False: adjacent (2i, 2i + 1) pairs
    attn_scale: float
    rope_freq_scale: float = 1.0  # linear rope scaling: positions are multiplied by this
    rope_base_swa: float | None = None  # sliding-window layers' own rope base (Gemma 3)
    sliding_window: int = 0  # 0: none
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    activation: str = "silu"  # gated FFN activation: silu | gelu_tanh
    embed_scale: float = 1.0
    qk_norm: bool = False  # RMSNorm on each q/k head before rope (Qwen3, Gemma 3)
    attn_bias: bool = False  # q/k/v biases (Qwen2)
    sandwich_norm: bool = False  # extra norms after attention and FFN (Gemma 2/3)
    extra: dict[str, Any] = field(default_factory=dict)

    def layer_uses_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def layer_rope_base(self, il: int) -> float:
        if self.layer_uses_swa(il) and self.rope_base_swa is not None:
            return self.rope_base_swa
        return self.rope_base

    def layer_rope_freq_scale(self, il: int) -> float:
        # llama.cpp applies the file's rope scaling to full-attention layers only when a
        # separate SWA base exists (Gemma 3): its local layers keep freq_scale_swa = 1.
        if self.layer_uses_swa(il) and self.rope_base_swa is not None:
            return 1.0
        return self.rope_freq_scale


class Metadata:
    """Typed access to one architecture's GGUF keys; every problem names the file and key."""

    def __init__(self, md: dict[str, Any], arch: str, path: str):
        self.md, self.arch, self.path = md, arch, path

    def _err(self, msg: str) -> TpError:
        return TpError(f"{self.path}: {msg}")

    def _get(self, key: str, kind: type, default: Any, required: bool) -> Any:
        full = key.replace("{arch}", self.arch)
        if full not in self.md:
            if required:
                raise self._err(f"missing metadata key {full!r}")
            return default
        v = self.md[full]
        if isinstance(v, list):
            # Per-layer arrays (e.g. head counts) are accepted when uniform.
            if not v or any(x != v[0] for x in v):
                raise self._err(f"metadata {full!r}: per-layer values {v[:8]} are not supported")
            v = v[0]
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
        if kind is int and isinstance(v, bool) or not isinstance(v, kind):
            raise self._err(f"metadata {full!r} should be {kind.__name__}, got {type(v).__name__}")
        return v

    def get_int(self, key: str, default: int | None = None, required: bool = False, minimum: int = 1,
                maximum: int | None = None) -> int:
        v = self._get(key, int, default, required)
        if v is not None and v < minimum:
            raise self._err(f"metadata {key.replace('{arch}', self.arch)!r} = {v} (must be >= {minimum})")
        if v is not None and maximum is not None and v > maximum:
            raise self._err(f"metadata {key.replace('{arch}', self.arch)!r} = {v} (must be <= {maximum})")
        return v

    def get_float(self, key: str, default: float | None = None, required: bool = False,
                  positive: bool = False, minimum: float | None = None) -> float:
        v = self._get(key, float, default, required)
        full = key.replace("{arch}", self.arch)
        if v is not None and not math.isfinite(v):
            raise self._err(f"metadata {full!r} is not finite")
        # A zero or negative rope base or scale, or a negative epsilon, turns every logit into NaN.
        if v is not None and positive and v <= 0:
            raise self._err(f"metadata {full!r} = {v} (must be > 0)")
        if v is not None and minimum is not None and v < minimum:
            raise self._err(f"metadata {full!r} = {v} (must be >= {minimum})")
        return v

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self._get(key, str, default, False)


def base_hparams(m: Metadata, n_vocab: int) -> dict[str, Any]:
    """The keys every llama-like architecture shares, with llama.cpp's defaults."""
    n_embd = m.get_int("{arch}.embedding_length", required=True)
    n_head = m.get_int("{arch}.attention.head_count", required=True)
    n_head_kv = m.get_int("{arch}.attention.head_count_kv", default=n_head)
    if n_head % n_head_kv:
        raise m._err(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    if f"{m.arch}.attention.key_length" not in m.md and n_embd % n_head:
        raise m._err(f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
    head_dim = m.get_int("{arch}.attention.key_length", default=n_embd // n_head)
    rope_dim = m.get_int("{arch}.rope.dimension_count", default=head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise m._err(f"rope.dimension_count {rope_dim} must be even and <= head size {head_dim}")
    scaling = m.get_str("{arch}.rope.scaling.type", default="none")
    factor = m.get_float("{arch}.rope.scaling.factor", default=0.0, minimum=0.0)
    if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
        raise m._err(f"rope scaling {scaling!r} is not supported (none, linear)")
    freq_scale = 1.0 / factor if scaling == "linear" and factor > 0 else 1.0
    if f"{m.arch}.rope.scale_linear" in m.md:  # older files
        freq_scale = 1.0 / m.get_float("{arch}.rope.scale_linear", positive=True)
    return dict(
        arch=m.arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=m.get_int("{arch}.block_count", required=True, maximum=MAX_LAYERS),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=m.get_int("{arch}.attention.value_length", default=head_dim),
        n_ff=m.get_int("{arch}.feed_forward_length", required=True),
        n_ctx_train=m.get_int("{arch}.context_length", required=True),
        norm_eps=m.get_float("{arch}.attention.layer_norm_rms_epsilon", required=True, minimum=0.0),
        rope_base=m.get_float("{arch}.rope.freq_base", default=10000.0, positive=True),
        rope_dim=rope_dim,
        rope_freq_scale=freq_scale,
        attn_scale=1.0 / math.sqrt(head_dim),
        rope_neox=True,
    )


ConfigBuilder = Callable[[Metadata, int], ModelConfig]
