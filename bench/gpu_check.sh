#!/usr/bin/env bash
# GPU readiness in one command: greedy == generate() on cuda, the tiny pipeline end to end on cuda, and the
# benchmark suite's generate / ppo / grpo / score parts on cuda. Results (JSON + logs) under $OUT (default bench/results/gpu-<date>).
#   bench/gpu_check.sh            # full (~10 min on one GPU)
#   QUICK=1 bench/gpu_check.sh    # greedy check + tiny pipeline + tiny PPO bench (~3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: this script checks the GPU paths"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
echo "== 1. greedy Hybrid Engine == transformers generate() on cuda (fp32 exact; bf16 agreement reported)"
"$PY" bench/gpu_greedy.py --device cuda --out "$OUT/greedy.json" 2>&1 | tee "$OUT/greedy.log"
echo "== 2. the tiny pipeline (SFT -> reward -> PPO -> eval -> report) on cuda, bf16 where supported"
"$PY" -m chatrl pipeline --config configs/tiny-pipeline.yaml run_dir="$OUT/tiny-pipeline" model.dtype=auto \
    2>&1 | tee "$OUT/pipeline.log" | tail -5
test -f "$OUT/tiny-pipeline/report.html"
echo "== 3. benchmarks (the suite's parts pick the GPU when there is one)"
if [[ -n "${QUICK:-}" ]]; then
  "$PY" bench/run.py --quick --out-dir "$OUT/bench-quick" generate ppo 2>&1 | tee "$OUT/bench-quick.log" | tail -20
else
  "$PY" bench/run.py --out-dir "$OUT/bench" generate ppo grpo score 2>&1 | tee "$OUT/bench.log" | tail -30
fi
echo "gpu_check: all passed; results in $OUT"
