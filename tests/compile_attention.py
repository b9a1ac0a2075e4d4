"""Compile kernels/attention.py's split kernel for sm_90a in each prologue variant (no GPU needed:
Triton's own ptxas), as decode_attention / decode_attention_qkv launch it for a qwen3 cache.
Triton's interpreter runs code that the compiler rejects (a branch that gives a variable a new
shape, say), so the CPU tests also need this. Run by tests/test_decode_attention.py in a process
without TRITON_INTERPRET; prints one JSON line per variant.

    python tests/compile_attention.py
"""

import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpruntime.kernels import attention as A


def main() -> None:
    args = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", n_keys_ptr="*i64", part_ptr="*fp32", qk_scale="fp32",
                n_ctx="i32", window="i32", n_splits="i32", min_chunk="i32", stride_qh="i32", stride_kh="i32",
                stride_kn="i32", stride_vh="i32", stride_vn="i32", bias_ptr="*fp32", qn_ptr="*fp32", kn_ptr="*fp32",
                cos_ptr="*fp32", sin_ptr="*fp32", stride_cos="i32", eps="fp32")
    names = list(args)
    # What Triton's launcher specializes at run time: 16-divisible pointers, strides, n_ctx and
    # min_chunk (without them the tile loads are scalar and not software-pipelined at all).
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names
             if a.endswith("_ptr") or a.startswith("stride_") or a in ("n_ctx", "min_chunk")}
    for dtype, head_dim, qkv, rope, neox, bias, norm in [
            (torch.bfloat16, 128, False, 0, False, False, False),
            (torch.bfloat16, 128, True, 128, True, False, True),    # qwen3
            (torch.bfloat16, 64, True, 32, False, True, False),     # qwen2-like: bias, pairs, part of the head
            (torch.float32, 128, True, 128, True, True, True)]:     # f32 cache: the FMA path
        p = A.plan(64, 8, 8192, head_dim, head_dim, dtype, torch.device("cpu"))
        ty = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        sig = dict(args, q_ptr="*fp32" if qkv else ty, k_ptr=ty, v_ptr=ty)
        consts = dict(G=p["group"], D=head_dim, DV=head_dim, PART=p["part"], BLOCK_H=p["block_h"],
                      BLOCK_D=p["block_d"], BLOCK_DV=p["block_dv"], BLOCK_N=p["block_n"], DOT=p["dot"],
                      IEEE=False, WIDEN=False, PDL=True, QKV=qkv, ROPE=rope, NEOX=neox, HAS_BIAS=bias, PREFETCH=qkv,
                      HAS_NORM=norm, RNE=False)
        sig.update({k: "constexpr" for k in consts})
        kernel = triton.compile(ASTSource(fn=A._split_kernel, signature=sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": A.NUM_WARPS, "num_stages": A.NUM_STAGES if p["dot"] else 1})
        ptx = kernel.asm["ptx"]
        first_copy = ptx.find("cp.async.cg")
        before = ptx[:first_copy] if first_copy >= 0 else ""
        # the writer's K/V stores, then a CTA barrier, then the first tile copy
        ordered = "st.global" in before and "bar.sync" in before[before.rfind("st.global"):]
        print(json.dumps({"dtype": str(dtype), "qkv": qkv, "cubin_bytes": len(kernel.asm["cubin"]),
                          "cp_async": ptx.count("cp.async.cg"), "prefetch": ptx.count("prefetch.global.L2"),
                          "store_barrier_copy": ordered}))


if __name__ == "__main__":
    main()
