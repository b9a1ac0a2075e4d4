"""gemma3: sandwich norms, gelu-tanh gated FFN, scaled embeddings, q/k norm, and
interleaved sliding-window layers with their own rope base (5 local : 1 global)."""

import math

from ..config import Metadata, ModelConfig, base_hparams

SWA_PATTERN = 6  # llama.cpp: every 6th layer attends globally
ROPE_BASE_SWA = 10000.0


def config(m: Metadata, n_vocab: int) -> ModelConfig:
    hp = base_hparams(m, n_vocab)
    n_layer = hp["n_layer"]
    # llama.cpp: the 27B model (62 layers) scales queries by n_embd / n_head instead of head size.
    attn_scale = (1.0 / math.sqrt(hp["n_embd"] / hp["n_head"]) if n_layer == 62
                  else 1.0 / math.sqrt(hp["head_dim"]))
    return ModelConfig(**{
        **hp,
        "attn_scale": attn_scale,
        "sliding_window": m.get_int("{arch}.attention.sliding_window", required=True),
        "swa_layers": tuple((il + 1) % SWA_PATTERN != 0 for il in range(n_layer)),
        "rope_base_swa": ROPE_BASE_SWA,
        "activation": "gelu_tanh",
        "embed_scale": math.sqrt(hp["n_embd"]),
        "qk_norm": True,
        "sandwich_norm": True,
    })
