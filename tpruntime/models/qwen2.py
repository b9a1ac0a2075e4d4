"""qwen2: llama block with q/k/v biases and neox-style rope."""

from ..config import Metadata, ModelConfig, base_hparams


def config(m: Metadata, n_vocab: int) -> ModelConfig:
    return ModelConfig(**base_hparams(m, n_vocab), attn_bias=True)
