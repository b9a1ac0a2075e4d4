"""GPU kernels (Triton / CUDA), imported as ``tpruntime.kernels``; each beside a torch reference."""

from gguf.constants import GGMLQuantizationType as _Q

# The types the GEMV and dequantization kernels read straight from their blocks; the loader
# asks this without importing triton.
QUANT_KERNEL_TYPES = frozenset({_Q.Q4_K, _Q.Q5_K, _Q.Q6_K, _Q.Q8_0, _Q.Q4_0, _Q.Q5_0})

_LAZY = {"qgemv": "gemv", "qgemv_reference": "gemv", "dequantize_rows": "dequant",
         "decode_attention": "attention",
         "add_rms_norm": "fused", "rms_norm": "fused", "qk_norm_rope_store": "fused", "act_mul": "fused"}


def __getattr__(name):
    # Lazy, so that importing the package does not need triton (only calling a kernel does).
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
