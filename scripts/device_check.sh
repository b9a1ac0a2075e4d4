#!/usr/bin/env bash
# Device-tool check, part 2: greedy tokens on CUDA equal the CPU path (one GPU), and TP=2
# equals TP=1 (two GPUs), with tokens/s and per-rank memory against the plan.
# Needs scripts/device_prep.sh to have left the demo model's parts in /tmp/gemma.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; W=/tmp/tpcheck; mkdir -p "$OUT" "$W"
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cat /tmp/gemma/gemma-3-270m-q4_k_m.gguf.part0{0,1,2,3} > "$W/gemma.gguf"
sha256sum "$W/gemma.gguf" | tee "$OUT/gpus.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpus.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpus.txt"
while pgrep -f "tpruntime synth" > /dev/null; do sleep 2; done
cat "$W/synth.log" | tail -2
Q=$W/qwen3-8b-q4_k.gguf

section() { echo; echo "=== $*"; }
section "CUDA dequantizers equal CPU bit for bit"
python3 -m pytest -q -m gpu tests/test_quants.py 2>&1 | tail -2 | tee "$OUT/pytest_gpu.txt"

if [ "${SKIP_SINGLE:-0}" != 1 ]; then
section "one GPU: CPU f32 vs CUDA f32/bf16"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 scripts/gpu_check.py --gemma "$W/gemma.gguf" \
    --reference .dev/gemma3_270m_reference.json --synth "$Q" --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" | tail -12
fi

section "TP=1 vs TP=2 (NCCL), greedy ids, tokens/s, memory"
P="The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
for model in gemma qwen3; do
  m=$W/gemma.gguf; [ $model = qwen3 ] && m=$Q
  for dt in bf16 f32; do
    for np in 1 2; do
      log=$W/tp_${model}_${dt}_np${np}.log
      timeout 240 python3 -m tpruntime launch --nproc-per-node $np generate -m "$m" -p "$P" -n 64 --temp 0 \
          -c 1024 --device cuda --dtype $dt --print-ids --report-memory --no-display-prompt --ignore-eos \
          > "$log.out" 2> "$log"
      echo "$model $dt np=$np rc=$? $(grep -h '^generation' "$log") $(grep -h '^ids' "$log" | md5sum | cut -c1-8)"
      grep -h "^rank" "$log"
      { echo "### $log"; cat "$log" "$log.out"; } >> "$OUT/tp_all.log"
    done
  done
done 2>&1 | tee "$OUT/tp_summary.txt"
