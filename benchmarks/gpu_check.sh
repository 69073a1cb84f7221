#!/usr/bin/env bash
# The GPU rows of docs/performance.md: peak matmul rates, the train step's MFU (DiT-S/2 and
# DiT-XL/2), ours vs the PyTorch DiT on the same GPU, and the jitted sampler vs a per-step Python
# loop. Each benchmark runs under its own time limit, so one that stalls costs only its own rows;
# every log goes to OUT_DIR. On an H200 "train" took about 4 minutes and "compare" about 7 (most
# of it compiling), so a 10-minute call holds one part.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [train|compare|all]    (runs/gpu_check, all)
set -uo pipefail
out=${1:-runs/gpu_check}
part=${2:-all}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

run() {  # run LIMIT_S NAME COMMAND...: one benchmark, its output to the terminal and OUT_DIR/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e Warning -e warn -e "^ *$" | tee "$out/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.log"
python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(), "flax",
  flax.__version__, "optax", optax.__version__, "torch", torch.__version__)' 2>&1 | tee -a "$out/gpu.log"

if [[ $part == train || $part == all ]]; then
  run 60 peak python3 benchmarks/peak.py --sizes=4096,8192 --seconds=2
  run 300 train_step python3 benchmarks/train_step.py --cases=dit_s2:256,dit_xl2:64 \
    --variants=f32,bf16 --peak_size=8192 --steps=10
fi
if [[ $part == compare || $part == all ]]; then
  # One process per model and dtype: JAX's allocator and PyTorch's caching allocator each keep
  # what they once held, and JAX must leave memory to PyTorch (no 75 % preallocation).
  for case in dit_s2:256 dit_xl2:64; do
    for dtype in bfloat16 float32; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false run 150 "vs_reference_${case%%:*}_$dtype" python3 \
        benchmarks/vs_reference.py --only=train --train_cases="$case" --dtypes="$dtype" --steps=10
    done
  done
  run 120 vs_reference_sampler python3 benchmarks/vs_reference.py --only=sampler \
    --sampler_batches=1,16,128 --steps=5
fi
