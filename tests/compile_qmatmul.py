"""Compile kernels/qmatmul.py for sm_90a (no GPU needed: Triton's own ptxas), every supported type
in its default tiles and with the weights as the right-hand operand, with the integer arguments
specialized as Triton's launcher does for a qwen3 layer. Triton's interpreter runs code that the
compiler rejects, so the CPU tests also need this. Run by tests/test_qmatmul.py in a process
without TRITON_INTERPRET; prints one JSON line per variant: Hopper MMA instructions in the PTX,
and (where Triton ships cuobjdump) registers and stack bytes per thread, a stack meaning spills.

    python tests/compile_qmatmul.py
"""

import json
import os
import re
import subprocess
import tempfile

import triton
from gguf.constants import GGMLQuantizationType as Q
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpruntime.kernels import qmatmul as QM


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    found = {k: re.search(rf"{k}:(\d+)", out) for k in ("REG", "STACK")}
    return {k.lower(): int(v.group(1)) for k, v in found.items() if v}


def main() -> None:
    args = dict(x_ptr="*bf16", w_ptr="*u8", out_ptr="*fp32", M="i32", N="i32", NB="i32", row_bytes="i32",
                stride_x="i32", stride_o="i32", n_m="i32", n_steps="i32")
    names = list(args)
    for qtype in sorted(QM.SUPPORTED, key=int):
        for cfg in ({}, {"W_LEFT": False}):
            n, k, m = 6144, 4096, 512
            _, (nb, row_bytes, n_m, n_steps), _, kw = QM._plan(qtype, n, k, m, True, tuple(sorted(cfg.items())))
            values = dict(M=m, N=n, NB=nb, row_bytes=row_bytes, stride_x=k, stride_o=n, n_m=n_m, n_steps=n_steps)
            attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names
                     if a.endswith("_ptr") or values[a] % 16 == 0}
            options = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages")}
            sig = dict(args, **{c: "constexpr" for c in kw})
            kernel = triton.compile(ASTSource(fn=QM._qmm_kernel, signature=sig, constexprs=kw, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options=options)
            print(json.dumps(dict(type=Q(qtype).name, w_left=kw["W_LEFT"],
                                  wgmma=kernel.asm["ptx"].count("wgmma.mma_async"),
                                  **resources(kernel.asm["cubin"]))), flush=True)


if __name__ == "__main__":
    main()
