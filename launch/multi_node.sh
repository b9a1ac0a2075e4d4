#!/usr/bin/env bash
# Run on every host with the same HEAD (host:port reachable by all) and NNODES, and this
# host's NODE_RANK (0 .. NNODES-1):
#   HEAD=10.0.0.1:29500 NNODES=2 NODE_RANK=0 launch/multi_node.sh model.gguf "Hello" -n 64
set -euo pipefail
model=$1; prompt=$2; shift 2
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
exec tpruntime launch --nproc-per-node "$ngpu" --nnodes "${NNODES:?}" --node-rank "${NODE_RANK:?}" \
    --rdzv-endpoint "${HEAD:?}" --rdzv-id "${RUN_ID:-tpruntime}" \
    generate -m "$model" -p "$prompt" --device cuda "$@"
