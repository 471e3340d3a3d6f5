#!/usr/bin/env bash
# The six paper setups (4 GPUs, 2 000 ShareGPT-like requests, seed 0) under every schedule the
# README compares; rows into benchmarks/sim/, then the tables of the README and docs/simulator.md. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
policies=tdpipe,tdpipe-ahead,tdpipe-fill,tdpipe-oracle,tdpipe-no-overbook,tdpipe-fits,tdpipe-paper,vllm-v0-pp,vllm-v1-pp,vllm-v1-pp-capped,hybrid,hybrid-throttled,tp
for gpu in a100-pcie l20; do
  for model in llama2-13b llama2-70b qwen2.5-32b; do
    tdpipe simulate --gpu "$gpu" --model "$model" --gpus 4 --requests 2000 --no-plots \
      --policies "$policies" --json "benchmarks/sim/$gpu-$model.json" >/dev/null
  done
done
python benchmarks/sim_tables.py benchmarks/sim
