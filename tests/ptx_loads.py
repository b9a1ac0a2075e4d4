"""Compile kernels/gemv_q8.py's int8-x GEMV for sm_90a (no GPU needed: Triton's own ptxas) and
print the global loads in its PTX as JSON. Run by tests/test_gemv_q8.py in a process without
TRITON_INTERPRET (under the interpreter @triton.jit gives functions that cannot be compiled).

    python tests/ptx_loads.py BN BB
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpruntime.kernels.gemv_q8 import _q4k_kernel


def main() -> None:
    bn, bb = int(sys.argv[1]), int(sys.argv[2])
    args = {"xq_ptr": "*i8", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*u8", "y_ptr": "*fp32",
            "N": "i32", "NB": "i32", "row_bytes": "i32"}
    consts = dict(BN=bn, BB=bb, SPLIT_K=1, MASK=False, I64=False, ASM=True, PDL=True)
    sig = dict(args, **{k: "constexpr" for k in consts})
    # What Triton's launcher specializes for qwen3-32b's q/k/v (10240 rows of 2880 bytes, 20 blocks):
    # 16-byte divisibility of the pointers, N and row_bytes, not of NB.
    names = list(args)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a not in ("NB",)}
    kernel = triton.compile(ASTSource(fn=_q4k_kernel, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, "num_stages": 1})
    ptx = kernel.asm["ptx"]
    print(json.dumps({"version": triton.__version__, "global_loads": ptx.count("ld.global"),
                      "vector_loads": ptx.count("ld.global.v4")}))


if __name__ == "__main__":
    main()
