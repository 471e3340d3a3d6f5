"""Stage split (min-max over layer costs, measured in the stage processes) and packed CPU weights."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from conftest import hf_generate, left_padded, random_prompts, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import tdpipe_hf
from tdpipe_hf.controller.cost import REFIT_EVERY, StageTimeModel
from tdpipe_hf.runtime import attention, spawn
from tdpipe_hf.runtime.attention import AttentionContext
from tdpipe_hf.runtime.batched_attention import BatchedContext
from tdpipe_hf.runtime.kv_budget import kv_geometry
from tdpipe_hf.config import TDPipeConfig
from tdpipe_hf.runtime import packed_linear
from tdpipe_hf.runtime import stage as stage_module
from tdpipe_hf.runtime.packed_linear import PackedLinears, available
from tdpipe_hf.runtime.split import StageCosts, probe_stage, size_costs, split_layers
from tdpipe_hf.runtime.stage import StageSetup, build_stages


def brute_force_slowest(costs: StageCosts, num_stages: int) -> float:
    n = len(costs.layers)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *cuts, n]
        best = min(best, costs.slowest([range(a, b) for a, b in zip(bounds, bounds[1:])]))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=9), st.floats(0.0, 30.0), st.integers(1, 9))
def test_split_minimises_the_slowest_stage(layers, head, num_stages):
    costs = StageCosts(tuple(layers), head, "measured")
    if num_stages > len(layers):
        with pytest.raises(ValueError, match="num_stages must be between 1 and"):
            split_layers(costs, num_stages)
        return
    ranges = split_layers(costs, num_stages)
    assert [i for r in ranges for i in r] == list(range(len(layers)))  # contiguous, every layer once
    assert all(len(r) > 0 for r in ranges)
    assert costs.slowest(ranges) == pytest.approx(brute_force_slowest(costs, num_stages))


def test_a_heavy_head_moves_layers_to_the_first_stage():
    light = StageCosts((1.0,) * 10, 0.0, "measured")
    heavy = StageCosts((1.0,) * 10, 4.0, "measured")
    assert split_layers(light, 2) == [range(0, 5), range(5, 10)]
    assert split_layers(heavy, 2) == [range(0, 7), range(7, 10)]


def test_size_costs_weigh_layers_and_head_by_bytes():
    model = tiny_model("llama", seed=3)
    costs = size_costs(model)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert costs.layers == (float(layer_bytes),) * 4
    assert costs.head == model.lm_head.weight.numel() * model.lm_head.weight.element_size()


@pytest.mark.parametrize("backend", ["paged-sdpa", "paged-batched"])
def test_probe_times_a_stage_with_its_own_cache(backend):
    """Timed with the metadata of the attention backend the stage will serve with."""
    model = tiny_model("llama", seed=4)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=20, attention_backend=backend)
    setup = StageSetup(20, 4, *kv_geometry(model), pack_weights=True)
    first, last = build_stages(model, 2)
    built = []

    def build(*args):
        built.append(attention.backend(backend).build(*args))
        return built[-1]

    try:
        for stage in (first, last):
            setup.apply(stage)
        per_layer, head = probe_stage(first, build)
        assert per_layer > 0 and head is None
        per_layer, head = probe_stage(last, build)
        assert per_layer > 0 and head > 0
        assert not last.kv.keys.any() and not last.kv.values.any()  # the scratch use leaves no trace
        expected = BatchedContext if backend == "paged-batched" else AttentionContext
        assert len(built) == 2 and all(type(ctx) is expected for ctx in built)
    finally:
        for stage in (first, last):
            stage.release()
        tdpipe_hf.unwrap(model)


def test_measured_costs_resplit_the_stage_processes(monkeypatch):
    """When the workers' timings call for another split, the running workers swap to the new
    stages (no restart) and the tokens stay HF's."""
    model = tiny_model("llama", seed=5)
    ids, mask = left_padded(random_prompts(6, low=2, high=20, seed=6))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    head_heavy = StageCosts((1.0,) * 4, 2.0, "measured")
    monkeypatch.setattr(spawn, "measured_costs", lambda num_layers, probes: head_heavy)
    tdpipe_hf.wrap(model, num_stages=2, executor="distributed")
    try:
        engine = model.tdpipe_engine
        assert engine.stage_layers == [range(0, 2), range(2, 4)]  # by weight bytes
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert engine.stage_layers == [range(0, 3), range(3, 4)]
        assert engine.executor.costs is head_heavy
        assert len(engine.executor._procs) == 2 and all(p.is_alive() for p in engine.executor._procs)
        assert {e[0] for e in engine.last_stats.timeline if e[1] == "compute"} == {0, 1}
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)


@pytest.mark.skipif(not available(torch.zeros(1)), reason="needs oneDNN on CPU")
def test_packed_linears_serve_only_inside_the_stage():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    x = torch.randn(5, 7, 48)
    reference = torch.nn.functional.linear(x, linear.weight, linear.bias)
    packed = PackedLinears([linear])
    assert torch.equal(linear(x), reference)  # outside a stage: the module's own weights
    with packed.active():
        inside = linear(x)
    assert inside.shape == reference.shape
    torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        linear.weight.zero_()
    assert torch.count_nonzero(linear(x) - linear.bias) == 0  # plain calls see the new weights
    packed.restore()
    assert "forward" not in linear.__dict__


@pytest.mark.skipif(not available(torch.zeros(1)), reason="needs oneDNN on CPU")
def test_wrap_packs_stage_weights_and_unwrap_gives_them_back():
    model = tiny_model("llama", seed=8)
    gate = model.model.layers[0].mlp.gate_proj
    tdpipe_hf.wrap(model, num_stages=2, pack_weights=False)
    assert "forward" not in gate.__dict__
    tdpipe_hf.wrap(model, num_stages=2, pack_weights=True)
    assert "forward" in gate.__dict__
    stage = model.tdpipe_engine.executor.stages[0]
    with pytest.raises(RuntimeError, match="packed weights stays in its process"):
        pickle.dumps(stage)
    tdpipe_hf.wrap(model, num_stages=1, pack_weights=True)  # re-wrapping: the new packing survives the old close
    assert "forward" in gate.__dict__
    tdpipe_hf.unwrap(model)
    assert "forward" not in gate.__dict__
    tdpipe_hf.wrap(model, num_stages=2, pack_weights=True)
    tdpipe_hf.wrap(model, num_stages=2, pack_weights=False)
    assert "forward" not in gate.__dict__
    tdpipe_hf.unwrap(model)


@pytest.mark.skipif(not available(torch.zeros(1)), reason="needs oneDNN on CPU")
@pytest.mark.parametrize("pays", [True, False])
def test_auto_packing_follows_the_measurement(monkeypatch, pays):
    """The default, "auto", packs exactly when timing one of the stage's own weights says it pays,
    and the answers are HF's either way."""
    asked = []

    def verdict(weight):
        asked.append(tuple(weight.shape))
        return pays

    monkeypatch.setattr(stage_module, "packing_pays", verdict)
    model = tiny_model("llama", seed=9)
    ids, mask = left_padded(random_prompts(4, low=2, high=12, seed=10))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    gate = model.model.layers[0].mlp.gate_proj
    tdpipe_hf.wrap(model, num_stages=2)
    try:
        assert model.tdpipe_engine.config.pack_weights == "auto"
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert ("forward" in gate.__dict__) is pays
        mlp_weight = tuple(gate.weight.shape)
        assert len(asked) == 2 and all(shape == mlp_weight for shape in asked)  # each stage's largest linear
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)


@pytest.mark.skipif(not available(torch.zeros(1)), reason="needs oneDNN on CPU")
def test_packing_pays_times_both_products_once_per_shape(monkeypatch):
    monkeypatch.setattr(packed_linear, "_verdicts", {})
    weight = torch.randn(64, 32)
    first = packed_linear.packing_pays(weight, repeats=1)
    assert isinstance(first, bool) and len(packed_linear._verdicts) == 1
    monkeypatch.setattr(packed_linear, "best_seconds", lambda fn, repeats: pytest.fail("timed twice"))
    assert packed_linear.packing_pays(weight) is first  # the verdict is kept for the process
    assert packed_linear.packing_pays(weight.to(torch.bfloat16)) is False  # float32 only


@pytest.mark.parametrize("bad", [1, "yes", None, 0.5])
def test_pack_weights_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="pack_weights must be True, False or 'auto'"):
        TDPipeConfig(pack_weights=bad)


def test_stage_time_model_refits_every_few_samples():
    cost = StageTimeModel()
    for rows in (2, 4, 8, 16):
        cost.observe("decode", rows, rows, 10 * rows, 0.010 + 0.001 * rows)
    fitted = cost.decode_time(10, 100)
    assert fitted == pytest.approx(0.020)
    for _ in range(REFIT_EVERY - 1):
        cost.observe("decode", 32, 32, 320, 1.0)
    assert cost.decode_time(10, 100) == fitted  # not refitted yet
    cost.observe("decode", 32, 32, 320, 1.0)
    assert cost.decode_time(10, 100) != pytest.approx(fitted)


def test_greedy_pick_is_argmax_with_ties_to_the_first():
    from tdpipe_hf.runtime.sampler import greedy_tokens

    logits = torch.randn(6, 50)
    logits[1, 7] = logits[1, 30] = 100.0
    logits[4] = 0.0
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    assert greedy_tokens(logits)[1] == 7 and greedy_tokens(logits)[4] == 0


def test_a_local_executor_on_the_cpu_tunes_malloc_for_its_process(monkeypatch):
    """The stages compute in the caller's process: it gets the malloc settings the stage workers
    and the ``tdpipe`` command have (without them large activations page-fault in every step)."""
    from tdpipe_hf.runtime import local

    calls = []
    monkeypatch.setattr(local, "tune_glibc_malloc", lambda: calls.append(1) or True)
    model = tiny_model("llama", seed=11)
    tdpipe_hf.wrap(model, num_stages=1)
    try:
        model.generate_batch([[1, 2, 3]], max_new_tokens=2)
    finally:
        tdpipe_hf.unwrap(model)
    assert calls
