"""The GPU paths: stages on CUDA devices, activations over NCCL between distinct GPUs.

Skipped on machines without a GPU (this project's CI machine has none); ``benchmarks/gpu_check.sh``
runs them when a GPU machine is lent. Greedy tokens are compared with HF ``generate`` on the same
GPU, float32, TF32 off (PyTorch's default for matmuls)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_generate, left_padded, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf.runtime.placement import GLOO, GLOO_AND_NCCL

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")


def _same_tokens_as_hf(model_device: str, executor: str, num_stages: int, **options):
    model = tiny_model("llama", seed=11).to(model_device)
    ids, mask = left_padded(random_prompts(12, low=2, high=40, seed=12))
    ids, mask = ids.to(model_device), mask.to(model_device)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    tdpipe_hf.wrap(model, num_stages=num_stages, block_size=4, kv_blocks=40, executor=executor,
                   admission="fits", **options)  # a small budget forces preemption
    try:
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        engine = model.tdpipe_engine
        stats = engine.last_stats
        backend = getattr(engine.executor, "backend", None)
        devices = [stage.device for stage in engine.executor.stages] if executor == "local" else None
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual.cpu(), expected.cpu())
    assert stats.preemptions > 0
    return backend, devices


@pytest.mark.parametrize("attention", ["paged-sdpa", "paged-batched"])
@pytest.mark.parametrize("executor", ["local", "distributed"])
def test_two_stages_on_one_gpu_match_hf(executor, attention):
    backend, _ = _same_tokens_as_hf("cuda:0", executor, 2, devices="cuda:0", attention_backend=attention)
    assert backend in (None, GLOO)  # one GPU: activations go through the host


def test_stages_loaded_on_cpu_move_to_the_gpu():
    _, devices = _same_tokens_as_hf("cpu", "local", 2, devices="cuda:0")
    assert devices == [torch.device("cuda", 0)] * 2


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
@pytest.mark.parametrize("executor", ["local", "distributed"])
def test_stages_spread_over_gpus_match_hf(executor):
    backend, devices = _same_tokens_as_hf("cuda:0", executor, 2)
    if executor == "distributed":
        assert backend == GLOO_AND_NCCL
    else:
        assert devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
