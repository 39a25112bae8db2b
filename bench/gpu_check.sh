#!/usr/bin/env bash
# The GPU check of DoGraph's cost (issue: DoGraph at the paper's cost or below), one command for a lent
# device machine: model-node DoGraph against uniform at GPT-2 small and medium shapes, bf16, in one
# process (bench/overhead.py), on a synthetic corpus with GPT-2's vocabulary (no data or hub needed).
# The cheap arm sketches 8 of the 32 sequences of a micro-batch: the quarter that `cheap` is at nano (4 of 16).
# The last line of the log is the benchmark's JSON. Usage: bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
out="${1:-${OUT:-bench-out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py="${PYTHON:-python}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
"$py" bench/overhead.py --device cuda --dtype bf16 --scales small,medium --batch 32 --seq-len 512 \
    --vocab 50257 --blocks 6 --block-steps 5 \
    --variant cheap:feature_sequences=8,progress_from=batch,recluster_every=250 2>&1 | tee "$out/overhead_gpu.log"
