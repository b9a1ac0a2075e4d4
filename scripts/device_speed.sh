#!/usr/bin/env bash
# Device-tool run (nvidia-h200-x2): CUDA-graph decode against eager, TP 1 and 2, on a
# synthetic qwen3-8b Q4_K (written here): greedy ids must agree (f32), then sweep-bench.
#   bash scripts/device_speed.sh   (carry .whl and .dev/ggml-vocab-gpt-2.gguf)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; W=/tmp/tpcheck; mkdir -p "$OUT" "$W"
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
SHAPE=${SHAPE:-qwen3-8b}; Q=$W/$SHAPE-q4_k.gguf
[ -f "$Q" ] || python3 -m tpruntime synth -o "$Q" --shape "$SHAPE" --qtype Q4_K --output-qtype Q6_K \
    --vocab .dev/ggml-vocab-gpt-2.gguf 2>&1 | tail -1
TP="python3 -m tpruntime launch --nproc-per-node"
P="The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
{
echo "=== greedy ids, f32, 48 tokens (md5 of the id list)"
for np in ${NPS:-1 2}; do for g in "" "--no-cuda-graphs"; do
  ids=$(timeout 200 $TP $np generate -m "$Q" -p "$P" -n 48 --temp 0 -c 1024 --device cuda --dtype f32 \
        --print-ids --ignore-eos $g 2>&1 >/dev/null | grep -E "^ids|^generation|error")
  echo "np=$np ${g:-graphs} $(echo "$ids" | grep ^ids | md5sum | cut -c1-8) $(echo "$ids" | grep -v ^ids)"
done; done
echo "=== sweep-bench bf16 -c ${CTX:=2048} -ub ${UB:=512} -n ${NTG:=64}"
for np in ${NPS:-1 2}; do for g in "" "--no-cuda-graphs"; do
  echo "--- np=$np ${g:-graphs}"
  timeout 300 $TP $np sweep-bench -m "$Q" -c $CTX -ub $UB -n $NTG --device cuda --dtype bf16 $g 2>&1 | grep -E "^\||error"
done; done
} 2>&1 | tee "$OUT/speed.txt"
