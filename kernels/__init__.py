"""GPU kernels (Triton / CUDA), imported as ``tpruntime.kernels``; each beside a torch reference."""
