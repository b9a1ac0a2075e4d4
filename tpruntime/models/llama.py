"""llama (and mistral-style files, which llama.cpp also names `llama`): the plain block."""

from ..config import Metadata, ModelConfig, base_hparams


def config(m: Metadata, n_vocab: int) -> ModelConfig:
    # llama.cpp's converter permutes Q/K rows for llama so that adjacent pairs rotate.
    return ModelConfig(**{**base_hparams(m, n_vocab), "rope_neox": False})
