"""tpruntime: tensor-parallel inference for GGUF language models."""

from .errors import TpError

__version__ = "0.1.0"


def load_tokenizer(path):
    """The tokenizer described by a GGUF file's metadata (``encode`` / ``decode``)."""
    from .gguf_file import GGUFFile
    from .tokenizer import Tokenizer

    gf = GGUFFile(path)
    try:
        return Tokenizer.from_metadata(gf.metadata)
    except TpError as e:
        raise TpError(f"{gf.path}: {e}") from None


__all__ = ["TpError", "load_tokenizer", "__version__"]
