"""Weight matrices kept on the GPU as their stored GGUF blocks.

Decode reads every weight byte once per token, so its speed is the stored size: a Q4_K matrix
is 3.6x fewer bytes than its bf16 dequantization. A few tokens go through the quantized GEMV
kernels (tpruntime.kernels.gemv; gemv_q8 for one token of 16-bit activations); a prefill batch
dequantizes the matrix a slice at a time into a scratch buffer and runs the tensor-core matmul
there, where the math, not the bytes, is the cost. Where memory allows (--dense-prefill), a
matrix also keeps its dequantized copy, which prefill batches multiply directly: no dequantize
pass per chunk, decode still reading the blocks.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from .errors import TpError
from .kernels import QUANT_KERNEL_TYPES
from .tensors import TensorSpec

# Up to this many tokens a GEMV (bytes-bound) beats dequantize + matmul.
GEMV_MAX_TOKENS = 8
# Elements dequantized at once for a prefill matmul: bounds the scratch at 256 MiB of bf16
# whatever the weight (a 152k-row vocabulary head would otherwise need 1.5 GB). Fewer, larger
# matmuls pay: qwen3-32b ub-512 chunks on an H100 86.6 ms at 128 MiB, 82.6 at 256, 83.0 at 512
# (its gate|up in 2 slices instead of 4, down in 1 instead of 2); at 32 MiB, small enough to
# stay in L2, 110.5 (docs/benchmarks.md, thirteenth session).
# TPRUNTIME_PREFILL_SCRATCH_MB=<MiB> sets it, for A/B runs.
SCRATCH_ELEMENTS = 1 << 27

# One token of 16-bit activations goes through the int8-x kernel (kernels/gemv_q8.py) where
# it reads the type; tests switch it off to compare with the exact float kernel.
INT8_ACTIVATIONS = True

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
# The prefill matmul writes float32 itself (torch.mm's out_dtype) instead of a 16-bit product
# copied into the float32 output: qwen3-32b prefill chunks on an H100 131.9 -> 87.5 ms at ub 512,
# 274.1 -> 247.8 ms at ub 2048 (docs/benchmarks.md, tenth session). TPRUNTIME_MM_F32_OUT=0 for A/B.
# (torch.mm takes out_dtype from torch 2.8 on; older ones keep the copy.)
F32_OUT = (os.environ.get("TPRUNTIME_MM_F32_OUT", "1") != "0"
           and "dtype_out" in torch.ops.aten.mm.overloads())


def env_tokens(name: str, what: str = "a token count (a whole number, 0 for off)", least: int = 0) -> int | None:
    """A whole-number knob of at least `least` from the environment (None when unset)."""
    if name not in os.environ:
        return None
    text = os.environ[name]
    if not text.strip().isdigit() or int(text) < least:
        raise TpError(f"{name}: {text!r} is not {what}")
    return int(text)


_SCRATCH_MB = env_tokens("TPRUNTIME_PREFILL_SCRATCH_MB", "a size in MiB (a whole number, at least 1)", least=1)
if _SCRATCH_MB is not None:
    SCRATCH_ELEMENTS = _SCRATCH_MB << 19  # 2-byte elements


# Measured on an H100 (docs/benchmarks.md, twelfth session) on qwen3-32b's Q4_K matrices: the
# K-loop matmul beats dequantize + cuBLAS per layer by 2.5x at 16 tokens, 27% at 64 and 7% at
# 128, and loses by 57% at 512 (the dequantize pass costs the same for any batch; the fused
# kernel's own matmul is slower than cuBLAS's). So Q4_K batches of up to 128 tokens take it by
# default (instead of the scratch + cuBLAS path below; more than GEMV_MAX_TOKENS); the other
# types are untimed and stay on dequantize + cuBLAS.
# TPRUNTIME_QMATMUL_MAX=<tokens> sets the limit for every type (0: never).
QMATMUL_DEFAULT_MAX = {Q.Q4_K: 128}
QMATMUL_MAX_TOKENS = env_tokens("TPRUNTIME_QMATMUL_MAX")


# From this many tokens a matrix's dequantized copy (where it keeps one) beats the K-loop kernel:
# cuBLAS reads the copy's 2 bytes a weight at HBM speed, about the K-loop kernel's time at 16
# tokens on an H100 (twelfth session: 2.5x faster than dequantize + cuBLAS there, where the
# dequantize pass alone costs as much as that read); below it the kernel's 0.56 bytes win.
COPY_MIN_TOKENS = 16


def qmatmul_max_tokens(qtype: Q) -> int:
    """The largest batch of this type's matrices that goes through kernels/qmatmul.py."""
    return QMATMUL_MAX_TOKENS if QMATMUL_MAX_TOKENS is not None else QMATMUL_DEFAULT_MAX.get(qtype, 0)


class Int8Request(NamedTuple):
    """What a GEMV that rounds its one-token input to int8 (kernels/gemv_q8.py) asks of the kernel
    that produces that input: write it in the int8 form too (one launch fewer per matrix), and
    zero the first n_zero values of the GEMV's output for its split-K atomics (0: none)."""
    n_zero: int


class QuantizedX(NamedTuple):
    """A one-token activation x [1, K] together with its int8 form: xq int8 [K], xd f32 [K/32]
    (scale per 32), xs f32 [K/16] (sums per 16), and y, the consumer's zeroed output (or None)."""
    x: torch.Tensor
    xq: torch.Tensor
    xd: torch.Tensor
    xs: torch.Tensor
    y: torch.Tensor | None


def dense(x: "torch.Tensor | QuantizedX") -> torch.Tensor:
    """The activation itself, whether or not it comes with its int8 form."""
    return x.x if isinstance(x, QuantizedX) else x


def keeps_quantized(spec: TensorSpec, qtype: Q, kernels: bool) -> bool:
    """Whether the loader keeps this tensor as stored blocks for the kernels (else it
    dequantizes it at load). The token embedding is always kept as stored rows (looked up,
    not multiplied), whatever the path."""
    return (kernels and len(spec.shape) == 2 and not spec.keeps_f32
            and qtype in QUANT_KERNEL_TYPES and spec.name != "token_embd.weight")


class QuantWeight:
    """raw: uint8 [n_out, row_bytes] on the GPU, rows of k_in values in `qtype` blocks."""

    def __init__(self, raw: torch.Tensor, qtype: Q, n_out: int, k_in: int, dtype: torch.dtype):
        block, type_size = GGML_QUANT_SIZES[Q(qtype)]
        # Explicit row bytes: a rank outside a layer holds 0-row or 0-column slices.
        self.raw = raw.reshape(n_out, k_in // block * type_size)
        self.qtype, self.n_out, self.k_in = Q(qtype), n_out, k_in
        self.dtype = dtype  # the compute dtype of the prefill matmul
        self.copy: torch.Tensor | None = None  # the dequantized matrix, for prefill (keep_copy)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_out, self.k_in

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @staticmethod
    def cat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Rows of several matrices of one type and input size as one (fused q/k/v, gate/up)."""
        return QuantWeight(torch.cat([p.raw for p in parts]), parts[0].qtype,
                           sum(p.n_out for p in parts), parts[0].k_in, parts[0].dtype)

    @property
    def copy_bytes(self) -> int:
        """The size its dequantized copy takes (held or not)."""
        return self.n_out * self.k_in * self.dtype.itemsize

    def keep_copy(self) -> None:
        """Dequantize once and keep the result for prefill batches (exactly the values the
        per-chunk dequantize pass would give)."""
        from .kernels.dequant import dequantize_rows
        if self.copy is None:
            self.copy = dequantize_rows(self.raw, self.qtype, self.n_out, self.k_in, dtype=self.dtype)

    def takes_int8(self, n_tokens: int) -> bool:
        """Whether a step of n_tokens goes through the int8-x GEMV: one token of a 16-bit model
        (x rounded to int8, as llama.cpp does; also where x arrives in float32, as the attention
        output does) meets the weights in integer dot products; a float32 model keeps the exact
        float kernel."""
        from .kernels.gemv_q8 import SUPPORTED, X_DTYPES
        return (INT8_ACTIVATIONS and n_tokens == 1 and self.dtype in X_DTYPES and self.qtype in SUPPORTED
                and self.n_out > 0 and self.k_in > 0)

    def int8_request(self, n_tokens: int) -> Int8Request | None:
        """What to ask of the kernel producing this matrix's input (None: a plain tensor)."""
        if not self.takes_int8(n_tokens):
            return None
        from .kernels.gemv_q8 import split_k
        return Int8Request(self.n_out if split_k(self.qtype, self.n_out, self.k_in) > 1 else 0)

    def _fused_prefill(self, x: torch.Tensor) -> bool:
        from .kernels.common import interpreting
        from .kernels.qmatmul import SUPPORTED, X_DTYPES
        return self.qtype in SUPPORTED and x.dtype in X_DTYPES and (x.is_cuda or interpreting())

    def __call__(self, x: "torch.Tensor | QuantizedX") -> torch.Tensor:
        """x [T, k_in] (or one token with its int8 form) -> float32 [T, n_out]."""
        from .kernels.dequant import dequantize_rows
        from .kernels.gemv import qgemv
        from .kernels.gemv_q8 import qgemv_q8

        if self.takes_int8(dense(x).shape[0]):
            return qgemv_q8(x, self.raw, self.qtype, self.n_out, self.k_in)
        x = dense(x)
        if self.n_out == 0 or self.k_in == 0:  # an empty slice adds nothing, as with F.linear
            return x.new_zeros(x.shape[0], self.n_out, dtype=torch.float32)
        if x.shape[0] <= GEMV_MAX_TOKENS:
            return qgemv(x, self.raw, self.qtype, self.n_out, self.k_in)
        x = x.to(self.dtype)
        fused = x.shape[0] <= qmatmul_max_tokens(self.qtype) and self._fused_prefill(x)
        if self.copy is not None and (x.shape[0] >= COPY_MIN_TOKENS or not fused):
            out = torch.empty(x.shape[0], self.n_out, dtype=torch.float32, device=x.device)
            _slice_matmul(x, self.copy, out)
            return out
        if fused:
            from .kernels.qmatmul import qmatmul
            return qmatmul(x, self.raw, self.qtype, self.n_out, self.k_in)
        # Whole multiples of 128 rows: an output slice whose row stride is not 16-byte aligned
        # sends cuBLAS to its pre-Hopper kernels (measured 3x slower on an H200).
        rows = max(128, SCRATCH_ELEMENTS // self.k_in // 128 * 128)
        key = (x.device, self.dtype)
        need = min(rows, self.n_out) * self.k_in
        if key not in _scratch or _scratch[key].numel() < need:
            _scratch[key] = torch.empty(need, dtype=self.dtype, device=x.device)
        out = torch.empty(x.shape[0], self.n_out, dtype=torch.float32, device=x.device)
        for r0 in range(0, self.n_out, rows):
            r1 = min(r0 + rows, self.n_out)
            w = dequantize_rows(self.raw[r0:r1], self.qtype, r1 - r0, self.k_in, dtype=self.dtype,
                                out=_scratch[key])
            # The stream orders this matmul's read of the scratch before the next slice's write.
            _slice_matmul(x, w, out[:, r0:r1])
        return out


def _slice_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out (float32, a column slice) = x @ w.T for 16-bit x and w."""
    if F32_OUT and x.is_cuda and w.dtype != torch.float32:
        # cuBLAS writes its f32 accumulators straight into the output's column slice: no
        # 16-bit product rounded, then widened and copied by a second kernel.
        torch.mm(x, w.t(), out_dtype=torch.float32, out=out)
    else:
        out.copy_(F.linear(x, w))


def matmul(x: "torch.Tensor | QuantizedX", w: "torch.Tensor | QuantWeight") -> torch.Tensor:
    """x @ w.T in float32 for a dense or a quantized weight."""
    if isinstance(w, QuantWeight):
        return w(x)
    return F.linear(dense(x).to(w.dtype), w).float()


def int8_request(weights: list, n_tokens: int) -> Int8Request | None:
    """The request for an input that all of `weights` read: one matrix's own, or, for several
    (Q4_K_M's mixed q/k/v), the int8 form without a zeroed output if any of them takes it."""
    if len(weights) == 1:
        return weights[0].int8_request(n_tokens) if isinstance(weights[0], QuantWeight) else None
    if any(isinstance(w, QuantWeight) and w.takes_int8(n_tokens) for w in weights):
        return Int8Request(0)
    return None
