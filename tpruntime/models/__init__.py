"""Architectures: each is a config builder over the shared dense decoder (see model.py)."""

from ..config import Metadata, ModelConfig
from ..errors import TpError
from ..gguf_file import GGUFFile
from . import gemma3, llama, qwen2, qwen3

ARCHITECTURES = {
    "llama": llama.config,
    "qwen2": qwen2.config,
    "qwen3": qwen3.config,
    "gemma3": gemma3.config,
}


def model_config(gf: GGUFFile) -> ModelConfig:
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise TpError(f"{gf.path}: architecture {arch!r} is not supported "
                      f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    m = Metadata(gf.metadata, arch, gf.path)
    return ARCHITECTURES[arch](m, _n_vocab(gf, m))


def _n_vocab(gf: GGUFFile, m: Metadata) -> int:
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    n_tok = len(tokens) if isinstance(tokens, list) else None
    n = m.get_int("{arch}.vocab_size", default=n_tok)
    if n is None and "token_embd.weight" in gf.tensors:
        n = gf.tensors["token_embd.weight"].dims[-1]
    if n is None:
        raise TpError(f"{gf.path}: cannot tell the vocabulary size (no tokens, no vocab_size)")
    if n_tok is not None and n_tok != n:
        raise TpError(f"{gf.path}: vocab_size {n} disagrees with {n_tok} tokenizer tokens")
    return n
