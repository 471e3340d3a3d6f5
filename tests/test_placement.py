"""Stage devices: validation, the default spread over GPUs, moving a stage without disturbing the
model's other stages, per-device KV budgets, and the choice between gloo and NCCL.

This machine has no GPU: the "meta" device stands in for a second device where a test only
needs to see where tensors went, and CUDA device objects (which need no GPU to exist) test the
transport rule. ``test_gpu.py`` runs the same paths on real GPUs when there are some."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_generate, left_padded, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf.config import TDPipeConfig
from tdpipe_hf.runtime.attention import register as register_attention
from tdpipe_hf.runtime.kv_budget import (
    default_kv_bytes,
    kv_blocks_on_devices,
    kv_geometry,
)
from tdpipe_hf.runtime.local import LocalExecutor
from tdpipe_hf.runtime.placement import (
    GLOO,
    GLOO_AND_NCCL,
    activation_backend,
    parse_devices,
    stage_devices,
    torchrun_device,
    wire_device,
)
from tdpipe_hf.runtime.stage import Stage, StageSetup, build_stages

CPU, META = torch.device("cpu"), torch.device("meta")


def cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


@pytest.mark.parametrize("devices, message", [
    ("cuda:0", "this machine has 0 CUDA devices"),
    ("cpu,tpu", "'tpu' is not a device name"),
    ("cpu,xpu", "only cpu and cuda devices are supported"),
    ("cpu,cpu,cpu", "lists 3 devices for 2 stages"),
    ("", "is not a device name"),
])
def test_bad_devices_are_refused_naming_the_entry(devices, message):
    if torch.cuda.is_available() and devices == "cuda:0":
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=message):
        TDPipeConfig(num_stages=2, devices=devices)


def test_devices_accept_a_string_a_list_or_one_for_all():
    assert TDPipeConfig(num_stages=2, devices="cpu, cpu").devices == ("cpu", "cpu")
    assert TDPipeConfig(num_stages=2, devices=["cpu", "cpu"]).devices == ("cpu", "cpu")
    assert parse_devices(None) is None
    assert stage_devices(CPU, 3, ("cpu",)) == [CPU] * 3


def test_default_devices_keep_the_model_device_or_spread_over_gpus(monkeypatch):
    assert stage_devices(CPU, 2, None) == [CPU, CPU]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert stage_devices(cuda(0), 3, None) == [cuda(0), cuda(1), cuda(0)]
    assert stage_devices(cuda(1), 2, None) == [cuda(1), cuda(0)]  # from the model's own GPU
    assert stage_devices(CPU, 3, ("cuda",)) == [cuda(0), cuda(1), cuda(0)]  # plain "cuda": one GPU each in turn
    assert stage_devices(CPU, 2, ("cuda:1",)) == [cuda(1), cuda(1)]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 3 on its node's second GPU
    assert torchrun_device(CPU, 3, ("cuda",)) == cuda(1)
    assert torchrun_device(cuda(0), 3, None) == cuda(1)
    assert torchrun_device(CPU, 3, None) == CPU
    assert torchrun_device(CPU, 3, ("cpu", "cpu", "cpu", "cuda:0")) == cuda(0)


def test_nccl_carries_activations_only_between_distinct_gpus():
    assert activation_backend([cuda(0), cuda(1)]) == GLOO_AND_NCCL
    assert activation_backend([cuda(0), cuda(0)]) == GLOO  # NCCL refuses two ranks on one GPU
    assert activation_backend([cuda(0), CPU]) == GLOO
    assert activation_backend([CPU, CPU]) == GLOO
    assert activation_backend([cuda(0), cuda(0)], hosts=["node-a", "node-b"]) == GLOO_AND_NCCL
    assert wire_device(GLOO_AND_NCCL, cuda(1)) == cuda(1)
    assert wire_device(GLOO, cuda(1)) == CPU


def test_a_moved_stage_takes_copies_of_modules_it_may_share():
    """SmolLM2-style tied embeddings: stage 1 moving its LM head must not move stage 0's embedding."""
    model = tiny_model("llama", seed=3, tie_word_embeddings=True)
    inner = model.model
    assert model.lm_head.weight is inner.embed_tokens.weight
    first, last = build_stages(model, 2)
    last.place(META)
    assert last.device == META and all(p.device == META for layer in last.layers for p in layer.parameters())
    assert last.lm_head.weight.device == META and last.norm.weight.device == META
    assert last.rotary.inv_freq.device == META
    assert inner.embed_tokens.weight.device == CPU and model.lm_head.weight.device == CPU
    assert first.device == CPU and first.rotary.inv_freq.device == CPU
    assert first.embed is inner.embed_tokens
    model.set_attn_implementation(register_attention())
    StageSetup(4, 4, *kv_geometry(model)).apply(last)
    assert last.kv.keys.device == META
    with pytest.raises(RuntimeError, match="before its KV cache is allocated"):
        last.place(CPU)


def test_kv_budget_is_sized_per_device_for_the_layers_it_holds():
    model = tiny_model("llama", seed=5)  # 4 layers: 2 + 2
    stages = build_stages(model, 2)
    one = kv_blocks_on_devices(model, stages, 16, {0: CPU, 1: CPU})
    two = kv_blocks_on_devices(model, stages, 16, {0: CPU, 1: META})
    assert 2 * one <= two <= 2 * one + 1  # each device holds half the layers' share of a block
    assert kv_blocks_on_devices(model, stages, 16, {0: CPU, 1: META}, budget_bytes=10**6) == \
        kv_blocks_on_devices(model, stages, 16, {0: CPU, 1: CPU}, budget_bytes=10**6)  # a given budget is for all


def test_weights_about_to_arrive_count_against_the_budget():
    model = tiny_model("llama", seed=6, tie_word_embeddings=True)
    first, last = build_stages(model, 2)

    def size(*modules):
        return sum(p.numel() * p.element_size() for m in modules for p in [*m.parameters(), *m.buffers()])

    assert first.bytes_to_place(CPU) == 0
    inner = model.model
    assert first.bytes_to_place(META) == size(*inner.layers[:2], inner.embed_tokens, inner.rotary_emb)
    assert last.bytes_to_place(META) == size(*inner.layers[2:], inner.norm, model.lm_head, inner.rotary_emb)
    one_stage, = build_stages(model, 1)  # a tied embedding and LM head are placed once
    assert one_stage.bytes_to_place(META) == size(model)


def test_explicit_devices_run_the_pipeline_with_hf_tokens():
    model = tiny_model("llama", seed=7)
    ids, mask = left_padded(random_prompts(6, seed=8))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for executor in ("local", "distributed"):
        tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=64, executor=executor, devices="cpu,cpu")
        try:
            actual = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
            if executor == "distributed":
                assert model.tdpipe_engine.executor.backend == GLOO
        finally:
            tdpipe_hf.unwrap(model)
        assert torch.equal(actual, expected), executor


def test_rewrap_releases_the_old_stages_before_building_new_ones(monkeypatch):
    """The new engine sizes its KV and places its stages with the old engine's memory and
    modules already given back; a failed re-wrap keeps the old engine usable."""
    import importlib

    wrap_module = importlib.import_module("tdpipe_hf.wrap")  # the package exports the function under that name

    model = tdpipe_hf.wrap(tiny_model("llama", seed=9), num_stages=2, block_size=4, kv_blocks=32)
    prompts = random_prompts(4, seed=10)
    expected = model.generate_batch(prompts, max_new_tokens=6)
    old = model.tdpipe_engine
    seen = []

    class Recording(wrap_module.TDPipeEngine):
        def __init__(self, *args, **kwargs):
            seen.append([stage.kv is None for stage in old.executor.stages])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(wrap_module, "TDPipeEngine", Recording)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=32)
    assert seen == [[True, True]]
    assert model.generate_batch(prompts, max_new_tokens=6) == expected
    with pytest.raises(ValueError, match="smaller than one block"):
        tdpipe_hf.wrap(model, num_stages=2, kv_cache_bytes=1)
    assert model.generate_batch(prompts, max_new_tokens=6) == expected
    tdpipe_hf.unwrap(model)


def test_models_dispatched_by_accelerate():
    """Dispatch hooks (which move inputs to accelerate's devices) are removed so stages can place
    their modules, and put back by unwrap; weights offloaded to the CPU or disk are refused
    before anything changes."""
    from accelerate import cpu_offload, dispatch_model

    def hooked(module):
        return any(hasattr(m, "_hf_hook") for m in module.modules())

    model = tiny_model("llama", seed=12)
    ids, mask = left_padded(random_prompts(4, seed=13))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    dispatch_model(model, {"": "cpu"}, force_hooks=True)
    assert hooked(model)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=32)
    assert not hooked(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)
    tdpipe_hf.unwrap(model)
    assert hooked(model) and model.hf_device_map == {"": "cpu"}
    with pytest.raises(ValueError, match="smaller than one block"):
        tdpipe_hf.wrap(model, num_stages=2, kv_cache_bytes=1)
    assert hooked(model)  # a failed wrap leaves the dispatch as it was

    offloaded = cpu_offload(tiny_model("llama", seed=12), execution_device="cpu")
    with pytest.raises(TypeError, match=r"weights \(the first: model\.embed_tokens\.weight\) are offloaded"):
        tdpipe_hf.wrap(offloaded, num_stages=2)
    assert hooked(offloaded)  # left as it was


def test_free_memory_counts_the_weights_about_to_arrive():
    gib = 1 << 30
    assert default_kv_bytes(cuda(0), arriving=6 * gib, available=10 * gib) == 2 * gib
    assert default_kv_bytes(cuda(0), arriving=12 * gib, available=10 * gib) == 0
    assert default_kv_bytes(CPU, arriving=1 * gib, available=6 * gib) == 1 * gib


def test_one_placed_stage_keeps_a_tied_embedding_and_head_as_one_tensor():
    model = tiny_model("llama", seed=14, tie_word_embeddings=True)
    stage, = build_stages(model, 1)
    stage.place(META)
    assert stage.embed.weight is stage.lm_head.weight and stage.embed.weight.device == META
    assert model.model.embed_tokens.weight.device == CPU


def test_a_stage_that_fails_to_get_ready_leaves_none_half_placed(monkeypatch):
    model = tdpipe_hf.wrap(tiny_model("llama", seed=15), num_stages=2, block_size=4, kv_blocks=16)
    stages = model.tdpipe_engine.executor.stages
    tdpipe_hf.unwrap(model)
    model.set_attn_implementation(register_attention())
    calls = []

    def allocate_or_fail(stage, *args):
        calls.append(stage)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("no room for stage 1's cache")
        original(stage, *args)

    original = Stage.allocate_kv
    monkeypatch.setattr(Stage, "allocate_kv", allocate_or_fail)
    with pytest.raises(torch.OutOfMemoryError, match="stage 1's cache"):
        LocalExecutor(stages, StageSetup(16, 4, *kv_geometry(model)), [CPU, CPU])
    assert calls == stages and all(stage.kv is None for stage in stages)  # stage 0's cache released too
