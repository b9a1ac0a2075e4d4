"""GPU kernels (Triton / CUDA), imported as ``tpruntime.kernels``; each beside a torch reference."""

_LAZY = {"qgemv": "gemv", "qgemv_reference": "gemv"}


def __getattr__(name):
    # Lazy, so that importing the package does not need triton (only calling a kernel does).
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
