#!/usr/bin/env bash
# Device-tool helper, part 1 of a check that spans calls (see scripts/device_check.sh).
# The demo model (253 MB) exceeds one call's transfer limit, so each call carries one of its
# four parts (.dev/gemma/partNN) and leaves it in /tmp/gemma. The first call also installs
# the carried gguf wheel and starts writing the synthetic model in the background.
#   bash scripts/device_prep.sh 0   (then 1, 2, ...)
set -euo pipefail
i=$1
mkdir -p /tmp/gemma /tmp/tpcheck
for f in .dev/gemma/*.part*; do cp "$f" /tmp/gemma/; done
if [ "$i" = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    rm -rf /tmp/repo && mkdir -p /tmp/repo && cp -r tpruntime kernels scripts tests .dev/ggml-vocab-gpt-2.gguf /tmp/repo/
    cd /tmp/repo
    PYTHONPATH=/tmp/site:/tmp/repo setsid nohup python3 -m tpruntime synth -o /tmp/tpcheck/qwen3-8b-q4_k.gguf \
        --shape qwen3-8b --qtype Q4_K --output-qtype Q6_K --vocab ggml-vocab-gpt-2.gguf \
        > /tmp/tpcheck/synth.log 2>&1 < /dev/null &
fi
ls -la /tmp/gemma; nvidia-smi -L
