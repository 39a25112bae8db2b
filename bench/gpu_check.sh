#!/usr/bin/env bash
# The GPU checks of DoGraph's cost (issue: DoGraph at the paper's cost or below), one command for a lent
# device machine, every part time-boxed so that a slow part cannot take the rest with it:
#   1. bench/overhead.py: model-node DoGraph against uniform at GPT-2 small, bf16, in one process, on a
#      synthetic corpus with GPT-2's vocabulary (no data or hub needed). The cheap arm sketches 8 of the 32
#      sequences of a micro-batch: the quarter that `cheap` is at nano (4 of 16); `cheap4` takes 4 of 32; `online`
#      is `cheap` re-clustering from the training features (recluster_from: online); `shipped` is params.yaml's
#      dograph_model as it is (4 sequences of each micro-batch sketched, re-clustering from training features).
#   2. bench/train_loop.py at small, eager then compiled: tokens/s and MFU of the engine and the bare loop,
#      and the bare loop with the vocabulary padded to a multiple of 64 (logits cut back before the loss).
#   3. bench/overhead.py at medium.
# Before them, a check that the GPU's sketch paths agree with the CPU's (the CountSketch is a matrix product
# on a GPU, a scatter on the CPU). PARTS (default "overhead train_loop") picks the benchmarks.
# Logs land in OUT_DIR; each benchmark's last line is its JSON. Usage: bash bench/gpu_check.sh [OUT_DIR]
# Where the machine lacks the project's pure-Python needs (pydantic, pyomo, ripopt), put their cp312 wheels
# in .whl/ (see the device notes); they are installed into /tmp/site first.
set -uo pipefail
out="${1:-${OUT:-bench-out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
"$py" - <<'PY' 2>&1 | tee "$out/env.log" || exit 1
import torch, transformers, pydantic, pyomo, highspy, numpy, sklearn
from dograph_core.optimize import _pyomo_solver
_pyomo_solver("ripopt"); _pyomo_solver("highs")
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "transformers", transformers.__version__, "pydantic", pydantic.VERSION,
      "numpy", numpy.__version__, torch.cuda.get_device_name(0))
PY
"$py" - <<'PY' 2>&1 | tee "$out/selfcheck.log" || exit 1
import torch
from dograph_core.gradients import Projection, output_features
g = torch.Generator().manual_seed(0)
B, T, H, V = 4, 64, 96, 50257
hidden, logits = torch.randn(B, T, H, generator=g), torch.randn(B, T, V, generator=g)
y = torch.randint(0, V, (B, T), generator=g)
for sketch in ("dense", "count"):
    cpu = output_features(hidden, logits, y, Projection(V, H, 32, 16, 3, sketch))
    gpu = output_features(hidden.cuda(), logits.cuda(), y.cuda(), Projection(V, H, 32, 16, 3, sketch)).cpu()
    err = float((cpu - gpu).norm() / cpu.norm())
    print(f"sketch {sketch}: relative difference GPU vs CPU {err:.2e}")
    assert err < 1e-4, err
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv | tee -a "$out/env.log"
cheap=progress_from=batch,recluster_every=250   # the cheap profile's settings besides the sketched sequences
arms=(--variant "cheap:feature_sequences=8,$cheap")
# SHORT=1: only the cheap arm and `shipped` (params.yaml's dograph_model exactly), for a call with little time
[[ ${SHORT:-0} == 1 ]] && arms+=(--no-default) || arms+=(
    --variant "cheap4:feature_sequences=4,$cheap"
    --variant "online:feature_sequences=8,$cheap,recluster_from=online")
arms+=(--variant "shipped:feature_sequences=4,$cheap,recluster_from=online")
ov=(bench/overhead.py --device cuda --dtype bf16 --batch 32 --seq-len 512 --vocab 50257 --blocks 6 --block-steps 5
    "${arms[@]}")
parts="${PARTS:-overhead train_loop}"
if [[ $parts == *overhead* ]]; then
    timeout 180 "$py" "${ov[@]}" --scales small 2>&1 | tee "$out/overhead_small.log"
fi
tl=(bench/train_loop.py --device cuda --scale small --dtype bf16 --batch 32 --seq-len 512 --vocab 50257
    --skip-rss --skip-tracking --pad-vocab 64 --default-tokens 2000000)
if [[ $parts == *train_loop* ]]; then
    timeout 90 "$py" "${tl[@]}" --steps 25 --warmup 5 --reps 2 2>&1 | tee "$out/train_loop_eager.log"
    timeout 150 "$py" "${tl[@]}" --steps 25 --warmup 8 --reps 1 --compile 2>&1 | tee "$out/train_loop_compile.log"
fi
if [[ $parts == *overhead* && ${SHORT:-0} != 1 ]]; then
    timeout 140 "$py" "${ov[@]}" --scales medium 2>&1 | tee "$out/overhead_medium.log"
fi
