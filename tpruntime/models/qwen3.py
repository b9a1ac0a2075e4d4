"""qwen3: llama block with per-head RMSNorm on q and k, neox-style rope."""

from ..config import Metadata, ModelConfig, base_hparams


def config(m: Metadata, n_vocab: int) -> ModelConfig:
    return ModelConfig(**base_hparams(m, n_vocab), qk_norm=True)
