#!/usr/bin/env bash
# Tensor-parallel generation on every GPU of this host.
#   launch/single_node.sh model.gguf "The capital of France is" [extra generate flags...]
set -euo pipefail
model=$1; prompt=$2; shift 2
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
exec tpruntime launch --nproc-per-node "$ngpu" \
    generate -m "$model" -p "$prompt" --device cuda "$@"
# The same with plain torchrun:
#   torchrun --standalone --nproc-per-node "$ngpu" -m tpruntime generate -m "$model" -p "$prompt" --device cuda
