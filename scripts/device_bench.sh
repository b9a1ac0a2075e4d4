#!/usr/bin/env bash
# Device-tool run (one GPU; TP stages where NPS lists 2, under each --all-reduce of ARMODES): GPU kernel tests, then issue 12's
# sweep-bench table on synthetic qwen3-8b / qwen3-32b files (Q4_K weights, Q6_K output, gpt-2
# vocabulary), the kernel path against the dequantized-bf16 torch path, and a decode profile.
#   STAGES="tests bench8 base8 bench32 long32 profile" bash scripts/device_bench.sh
# (also: pdlab, envab, pprof, dqbench, q8bench, qmmbench, kbench, ncu; allreduce on a multi-GPU kind)
# (carry .whl and .dev/ggml-vocab-gpt-2.gguf). Logs under $OUT; the last lines are a summary.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; W=/tmp/tpcheck; mkdir -p "$OUT" "$W"
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
ln -sfn ../kernels tpruntime/kernels
export PYTHONPATH=/tmp/site:$PWD
STAGES=${STAGES:-tests bench8 base8 bench32}
NPS=${NPS:-1}
SWEEP=${SWEEP:--c 8192 -ub 2048 -b 2048 -n 128}  # the issue's llama-sweep-bench flags
SUM=$OUT/summary.txt; : > "$SUM"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUM"

model() {  # model SHAPE -> path of the synthetic file (written once per machine)
  local q=$W/$1-q4_k.gguf
  if [ ! -f "$q" ]; then
    local t0=$SECONDS
    python3 -m tpruntime synth -o "$q" --shape "$1" --qtype Q4_K --output-qtype Q6_K \
        --vocab .dev/ggml-vocab-gpt-2.gguf > /dev/null 2>&1
    echo "synth $1: $((SECONDS - t0)) s" >> "$SUM"
  fi
  echo "$q"
}

sweep() {  # sweep LABEL SHAPE NP [extra flags]
  local label=$1 shape=$2 np=$3; shift 3
  local m; m=$(model "$shape")
  echo "--- $label: $shape np=$np $* ($SWEEP)" | tee -a "$SUM"
  local t0=$SECONDS
  timeout 400 python3 -m tpruntime launch --nproc-per-node "$np" sweep-bench -m "$m" $SWEEP \
      --device cuda --dtype bf16 "$@" > "$OUT/$label-$shape-np$np.txt" 2>&1
  echo "rc $? after $((SECONDS - t0)) s" >> "$OUT/$label-$shape-np$np.txt"
  grep -E "^\||rror|^rc " "$OUT/$label-$shape-np$np.txt" | tail -9 | tee -a "$SUM"
}

armode() {  # armode CMD... : CMD under --all-reduce $ar; "fused" is one-shot ending in the norm
  if [ "$ar" = fused ]; then TPRUNTIME_FUSED_AR=1 "$@" --all-reduce one-shot; else "$@" --all-reduce "$ar"; fi
}

for st in $STAGES; do case $st in
  tests)  # TESTS narrows the GPU test files
    timeout 300 python3 -m pytest -q -m gpu ${TESTS:-tests/test_fused_kernels.py tests/test_decode_attention.py \
        tests/test_dequant_kernel.py tests/test_gemv_q8.py tests/test_kernels.py tests/test_models.py} > "$OUT/gpu_tests.txt" 2>&1
    echo "gpu tests: $(tail -1 "$OUT/gpu_tests.txt")" | tee -a "$SUM" ;;
  bench8)  for np in $NPS; do for ar in ${ARMODES:-nccl}; do armode sweep kernels-$ar qwen3-8b "$np"; done; done ;;
  base8)   sweep torch-bf16 qwen3-8b 1 --dense-weights --no-fused-ops ;;
  bench32) for np in $NPS; do for ar in ${ARMODES:-nccl}; do armode sweep kernels-$ar qwen3-32b "$np"; done; done ;;
  long32)  # decode at depth 32768 (the long-context target): prefill 32k, then time decode
    timeout 300 python3 scripts/profile_decode.py "$(model qwen3-32b)" --depth 32768 --steps 20 --no-profile \
        > "$OUT/long32.txt" 2>&1; grep -E "t/s|rror" "$OUT/long32.txt" | tee -a "$SUM" ;;
  profile)
    for sh in ${DSHAPES:-qwen3-8b}; do
      timeout 200 python3 scripts/profile_decode.py "$(model $sh)" --depth 512 > "$OUT/profile-$sh.txt" 2>&1
      grep -E "t/s|GPU kernel time|rror" "$OUT/profile-$sh.txt" | tee -a "$SUM"; done ;;
  pdlab)  # decode t/s with programmatic dependent launch off and on (TPRUNTIME_PDL)
    for sh in ${DSHAPES:-qwen3-8b}; do for v in 0 1; do
      TPRUNTIME_PDL=$v timeout 200 python3 scripts/profile_decode.py "$(model $sh)" --depth 512 --steps 50 \
          --no-profile > "$OUT/pdl$v-$sh.txt" 2>&1
      echo "$sh PDL=$v: $(grep -E "graphs|rror" "$OUT/pdl$v-$sh.txt" | tail -1)" | tee -a "$SUM"; done; done ;;
  envab)  # decode t/s (depth 512, graphs) under each value of a knob: ABVAR=TPRUNTIME_Q8_PPS ABVALS="0 16";
    # or under each set of knobs: ABSETS="VAR=V+VAR2=V2 VAR=V" (one run per set, in order);
    # PUB=512: prefill chunks of PUB tokens (at depth 0 and PUB, the warm pair) instead of decode
    sets=${ABSETS:-}; [ -n "$sets" ] || for v in ${ABVALS:-0 1}; do sets="$sets ${ABVAR:-TPRUNTIME_PDL}=$v"; done
    if [ -n "${PUB:-}" ]; then run="--prefill $PUB --depth $PUB"; pat="^prefill|rror"; last=2
    else run="--depth 512 --steps 50"; pat="graphs|rror"; last=1; fi
    for sh in ${DSHAPES:-qwen3-8b}; do i=0; for s in $sets; do i=$((i + 1))
      env ${s//+/ } timeout 200 python3 scripts/profile_decode.py "$(model $sh)" $run --no-profile \
          > "$OUT/ab-$i-$sh.txt" 2>&1
      echo "$sh $s: $(grep -E "$pat" "$OUT/ab-$i-$sh.txt" | tail -$last | tr '\n' ' ')" | tee -a "$SUM"; done; done ;;
  pprof)  # where a prefill chunk's time goes (ub PPUB, default 2048, at depth 0 and PPUB)
    for sh in ${PSHAPES:-qwen3-8b qwen3-32b}; do ub=${PPUB:-2048}
      timeout 300 python3 scripts/profile_decode.py "$(model $sh)" --prefill $ub --depth $ub > "$OUT/pprof-$sh-$ub.txt" 2>&1
      grep -E "^prefill|rror|_kernel |aten::mm " "$OUT/pprof-$sh-$ub.txt" | tee -a "$SUM"; done ;;
  dqbench)
    timeout 200 python3 scripts/bench_kernels.py --dequant --out "$OUT" > "$OUT/dqbench.txt" 2>&1
    tail -40 "$OUT/dqbench.txt" | tee -a "$SUM" ;;
  q8bench)  # the int8-x GEMV on the decode shapes of qwen3-32b and qwen3-8b (Q4_K), old kernel beside
    SH=${Q8SHAPES:-10240x5120 51200x5120 5120x25600 5120x8192 6144x4096 24576x4096 4096x12288 4096x4096}
    timeout 250 python3 scripts/bench_kernels.py --q8 --types Q4_K --shapes $SH ${Q8SWEEP:-} --out "$OUT/q8" > "$OUT/q8bench.txt" 2>&1
    grep -E "^\| Q4_K \| [0-9]+x|rror" "$OUT/q8bench.txt" | tee -a "$SUM"
    [ "${Q8OLD:-1}" = 1 ] && timeout 200 python3 scripts/bench_kernels.py --types Q4_K --shapes $SH --out "$OUT/f" > "$OUT/fbench.txt" 2>&1 &&
    grep -E "^\| Q4_K \| [0-9]+x|rror" "$OUT/fbench.txt" | tee -a "$SUM" ;;
  allreduce)  # issue 13's latency table (needs a multi-GPU kind): NCCL, both one-shot paths, torch's bare op
    # (AR_ARGS: more flags of scripts/bench_allreduce.py, e.g. "--sizes 2M 8M --one-shot-max 64M")
    NP=${AR_NP:-2}; timeout 200 python3 -m torch.distributed.run --nproc-per-node "$NP" scripts/bench_allreduce.py \
        --out "$OUT/ar" ${AR_ARGS:-} > "$OUT/allreduce.txt" 2>&1
    grep -E "^\|" "$OUT/allreduce.txt" | tee -a "$SUM" ;;
  arworker)  # tests/allreduce_worker.py alone, each mode, stacks dumped on a hang (AR_WORKER_TIMEOUT)
    mkdir -p "$OUT/arw"; for m in ${ARMODES:-nccl one-shot symm-mem}; do for rt in ${ARTYPES:-f32}; do
      AR_WORKER_TIMEOUT=${AR_WORKER_TIMEOUT:-60} timeout 120 python3 -m torch.distributed.run --standalone \
          --nproc-per-node "${AR_NP:-2}" tests/allreduce_worker.py "$m" "$rt" > "$OUT/arw/$m-$rt.txt" 2>&1
      echo "worker $m $rt rc=$?: $(grep -E '^(ok|rank|start)' "$OUT/arw/$m-$rt.txt" | tr '\n' ';')" | tee -a "$SUM"
    done; done ;;
  ncu)  # Nsight Compute sections for the first NCU_COUNT kernels of one eager decode step (per DSHAPES)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for sh in ${DSHAPES:-qwen3-8b}; do
      timeout 400 "$NCU" --profile-from-start off --clock-control none --launch-count "${NCU_COUNT:-24}" \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
          --section WarpStateStats --section SchedulerStats ${NCU_ARGS:-} \
          python3 scripts/profile_decode.py "$(model $sh)" --depth 512 --ncu > "$OUT/ncu-$sh.txt" 2>&1
      echo "ncu $sh: rc $?" | tee -a "$SUM"
      grep -E "^  [a-z_0-9]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
          "$OUT/ncu-$sh.txt" | head -200 >> "$SUM"; done ;;
  qmmbench)  # the prefill matmul dequantizing in its K loop against dequantize + cuBLAS (QMMARGS: more flags)
    timeout ${QMMTIME:-420} python3 scripts/bench_qmatmul.py --out "$OUT/qmm" ${QMMARGS:-} > "$OUT/qmmbench.txt" 2>&1
    grep -E "^best|rror" "$OUT/qmmbench.txt" | tail -40 | tee -a "$SUM" ;;
  kbench)
    timeout 200 python3 scripts/bench_attention.py > "$OUT/bench_attention.txt" 2>&1
    tail -20 "$OUT/bench_attention.txt" | tee -a "$SUM" ;;
esac; done
echo "=== summary"; cat "$SUM"
