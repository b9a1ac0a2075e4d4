"""Weight matrices kept on the GPU as their stored GGUF blocks.

Decode reads every weight byte once per token, so its speed is the stored size: a Q4_K matrix
is 3.6x fewer bytes than its bf16 dequantization. A few tokens go through the quantized GEMV
kernels (tpruntime.kernels.gemv; gemv_q8 for one token of 16-bit activations); a prefill batch
dequantizes the matrix a slice at a time into a scratch buffer and runs the tensor-core matmul
there, where the math, not the bytes, is the cost (and no dequantized copy stays behind).
"""

from __future__ import annotations

import os
import weakref
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
# Elements dequantized at once for a prefill matmul: bounds the scratch at 128 MiB of bf16
# whatever the weight (a 152k-row vocabulary head would otherwise need 1.5 GB).
SCRATCH_ELEMENTS = 1 << 26

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
# Batches of up to this many tokens (and more than GEMV_MAX_TOKENS) go through the matmul that
# dequantizes in its K loop (kernels/qmatmul.py) instead of the scratch + cuBLAS path; 0: never.
def env_tokens(name: str) -> int:
    """A token-count knob from the environment (unset: 0)."""
    text = os.environ.get(name, "0")
    if not text.strip().isdigit():
        raise TpError(f"{name}: {text!r} is not a token count (a whole number, 0 for off)")
    return int(text)


def env_level(name: str, top: int) -> int:
    """A knob from the environment taking 0 (unset) to top."""
    text = os.environ.get(name, "0")
    if text.strip() not in [str(v) for v in range(top + 1)]:
        raise TpError(f"{name}: {text!r} is not one of {', '.join(map(str, range(top + 1)))}")
    return int(text)


QMATMUL_MAX_TOKENS = env_tokens("TPRUNTIME_QMATMUL_MAX")
# The dequantizing of a prefill slice streams HBM while its matmul is tensor-core bound (ub >=
# 512), so they can share the GPU: 1 dequantizes the next slice on a side stream, into a second
# scratch buffer, while the current one is multiplied; 2 also starts on the first slice of the
# matrix that came next in the previous chunk (the call order of a forward pass repeats). 0: one
# stream, one buffer. Not in a CUDA-graph capture (prefill is not captured; a capture falls back).
PREFILL_OVERLAP = env_level("TPRUNTIME_PREFILL_OVERLAP", 2)
if "TPRUNTIME_SCRATCH_ELEMENTS" in os.environ:  # slice size for A/B runs (smaller: more overlap)
    SCRATCH_ELEMENTS = env_tokens("TPRUNTIME_SCRATCH_ELEMENTS") or SCRATCH_ELEMENTS


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
        # the matrix that the last prefill called after this one (TPRUNTIME_PREFILL_OVERLAP=2)
        self.next_prefill: weakref.ref | None = None

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
        if x.shape[0] <= QMATMUL_MAX_TOKENS and self._fused_prefill(x):
            from .kernels.qmatmul import qmatmul
            return qmatmul(x, self.raw, self.qtype, self.n_out, self.k_in)
        out = torch.empty(x.shape[0], self.n_out, dtype=torch.float32, device=x.device)
        if PREFILL_OVERLAP and x.is_cuda and not torch.cuda.is_current_stream_capturing():
            _pipeline(x.device, self.dtype).matmul(self, x, out)
            return out
        key = (x.device, self.dtype)
        need = self._slices()[0][1] * self.k_in
        if key not in _scratch or _scratch[key].numel() < need:
            _scratch[key] = torch.empty(need, dtype=self.dtype, device=x.device)
        for r0, r1 in self._slices():
            w = self._dequantize(r0, r1, _scratch[key])
            # The stream orders this matmul's read of the scratch before the next slice's write.
            _slice_matmul(x, w, out[:, r0:r1])
        return out

    def _slices(self) -> list[tuple[int, int]]:
        """Row ranges dequantized at once for a prefill matmul."""
        # Whole multiples of 128 rows: an output slice whose row stride is not 16-byte aligned
        # sends cuBLAS to its pre-Hopper kernels (measured 3x slower on an H200).
        rows = max(128, SCRATCH_ELEMENTS // self.k_in // 128 * 128)
        return [(r0, min(r0 + rows, self.n_out)) for r0 in range(0, self.n_out, rows)]

    def _dequantize(self, r0: int, r1: int, scratch: torch.Tensor) -> torch.Tensor:
        from .kernels.dequant import dequantize_rows
        return dequantize_rows(self.raw[r0:r1], self.qtype, r1 - r0, self.k_in, dtype=self.dtype, out=scratch)


class _Pipeline:
    """Prefill matmuls of one device and dtype with the dequantizing on a side stream
    (PREFILL_OVERLAP): two scratch buffers taken in turn (twice the one-stream path's scratch,
    outside the memory plan like it); each has the event of the last matmul that read it, which
    the side stream waits for before writing it again. Weights are held by weak references only:
    the learned order must not keep a dropped model's matrices on the GPU."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.side = torch.cuda.Stream(device)
        self.bufs: list[torch.Tensor] = []
        self.read = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0  # the buffer the next matrix's first slice goes into
        self.ahead: tuple | None = None  # (weight ref, rows, event): a first slice started early
        self.last: weakref.ref | None = None  # the previous call's matrix (level 2 learns the order)
        self.seen: weakref.WeakSet = weakref.WeakSet()  # matrices whose bytes the side stream waited for

    def _reserve(self, w: QuantWeight) -> None:
        need = w._slices()[0][1] * w.k_in
        if self.bufs and self.bufs[0].numel() >= need:
            return
        self.bufs = [torch.empty(need, dtype=self.dtype, device=self.device) for _ in range(2)]
        for b in self.bufs:  # when replaced, freed only after the side stream's work on them
            b.record_stream(self.side)
        # The allocator orders the new memory after the main stream's earlier use of it only.
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        self.ahead = None

    def _dequantize(self, w: QuantWeight, rows: tuple[int, int], buf: int) -> torch.cuda.Event:
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.side):
            if w not in self.seen:  # its bytes were written on the main stream (load, concatenation)
                self.side.wait_stream(main)
                self.seen.add(w)
            self.side.wait_event(self.read[buf])
            w._dequantize(*rows, self.bufs[buf])
            done = torch.cuda.Event()
            done.record(self.side)
        return done

    def matmul(self, w: QuantWeight, x: torch.Tensor, out: torch.Tensor) -> None:
        main = torch.cuda.current_stream(self.device)
        self._reserve(w)
        last = self.last() if self.last is not None else None
        if PREFILL_OVERLAP >= 2 and last is not None and last is not w:
            last.next_prefill = weakref.ref(w)
        self.last = weakref.ref(w)
        slices = w._slices()
        buf = self.turn
        if self.ahead is not None and self.ahead[0]() is w and self.ahead[1] == slices[0]:
            ready = self.ahead[2]
        else:
            ready = self._dequantize(w, slices[0], buf)
        self.ahead = None
        for i, (r0, r1) in enumerate(slices):
            main.wait_event(ready)
            _slice_matmul(x, self.bufs[buf].view(-1)[:(r1 - r0) * w.k_in].view(r1 - r0, w.k_in), out[:, r0:r1])
            self.read[buf].record(main)
            buf ^= 1
            if i + 1 < len(slices):
                ready = self._dequantize(w, slices[i + 1], buf)
        self.turn = buf
        nxt = w.next_prefill() if w.next_prefill is not None else None
        if PREFILL_OVERLAP >= 2 and nxt is not None and nxt.n_out and nxt.k_in:
            self._reserve(nxt)  # (new buffers, if any: the ahead slice goes into them)
            rows = nxt._slices()[0]
            self.ahead = (weakref.ref(nxt), rows, self._dequantize(nxt, rows, buf))


_pipelines: dict[tuple[torch.device, torch.dtype], _Pipeline] = {}


def _pipeline(device: torch.device, dtype: torch.dtype) -> _Pipeline:
    key = (device, dtype)
    if key not in _pipelines:
        _pipelines[key] = _Pipeline(device, dtype)
    return _pipelines[key]


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
