"""Architectures: each is a config builder over the shared dense decoder (see model.py)."""

from ..config import Metadata, ModelConfig
from ..errors import TpError
from ..gguf_file import GGUFFile
from ..tensors import check_shapes, dense_tensor_table
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
    cfg = ARCHITECTURES[arch](m, _n_vocab(gf, m))
    # Every layer has tensors: a larger count is a corrupt field, refused before per-layer tables
    # are built for it (files without tensors, e.g. vocab files, still give their config).
    if gf.tensors and cfg.n_layer > len(gf.tensors):
        raise TpError(f"{gf.path}: metadata '{arch}.block_count' = {cfg.n_layer}, more layers than the "
                      f"file has tensors ({len(gf.tensors)})")
    # Before the plan divides heads and FFN blocks by these numbers: metadata that disagrees
    # with the tensors is reported as that, not as an odd split.
    check_shapes(gf, dense_tensor_table(cfg))
    return cfg


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
