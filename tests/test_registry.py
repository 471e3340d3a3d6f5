"""The one registry: every kind of part is an entry-point group declared in pyproject, every
built-in satisfies its protocol, code-registered parts of any kind are used, broken ones are
named; the variants table is valid everywhere it is read; aborts lose nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from conftest import random_prompts, tiny_model
from test_scheduler import EOS, FakePipeline, reference

import tdpipe_hf
from tdpipe_hf import TDPipeConfig, plugins, protocols
from tdpipe_hf.controller import BlockManager, Controller, Request, Scheduler, Status
from tdpipe_hf.controller.base import ABORTED, BaseScheduler
from tdpipe_hf.plan import PHASES, Executor, MicroBatch
from tdpipe_hf.policies import AdmitWhileFits, ReadyPoolBatcher, ThresholdSwitch
from tdpipe_hf.predictors import ConstantPredictor
from tdpipe_hf.scheduling import build_scheduler
from tdpipe_hf.variants import ENGINE_VARIANTS, VARIANTS, variant

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_every_builtin_in_its_group():
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"]
    assert {group: dict(entries) for group, entries in declared.items()} == plugins.BUILTINS


@pytest.mark.parametrize("group", [plugins.SCHEDULERS, plugins.ADMISSION, plugins.DECODE_BATCHERS,
                                   plugins.SWITCH_POLICIES, plugins.PREDICTORS, plugins.ATTENTION_BACKENDS])
def test_every_builtin_builds_and_meets_its_protocol(group):
    config = TDPipeConfig(predictor="constant")
    args = {plugins.SCHEDULERS: (config, BlockManager(32, 4), 2, ConstantPredictor(8.0)),
            plugins.ADMISSION: (config, ConstantPredictor(8.0)),
            plugins.DECODE_BATCHERS: (config,)}.get(group, ())
    for name in plugins.BUILTINS[group]:
        part = plugins.build(group, name, *args)
        assert isinstance(part, protocols.PROTOCOLS[group]), (group, name)


def test_executors_meet_the_executor_protocol():
    from tdpipe_hf.runtime.local import LocalExecutor
    from tdpipe_hf.runtime.spawn import DistributedExecutor
    from tdpipe_hf.runtime.torchrun import TorchrunExecutor
    from tdpipe_hf.sim.executor import SimExecutor

    methods = [name for name in protocols.members(Executor) if name != "num_stages"]
    for cls in (LocalExecutor, DistributedExecutor, TorchrunExecutor, SimExecutor):
        assert all(callable(getattr(cls, name, None)) for name in methods), cls
    assert isinstance(SimExecutor(2, lambda seqs: [0.0, 0.0]), Executor)


def test_unknown_names_are_rejected_at_config_listing_what_exists():
    with pytest.raises(ValueError, match=r"TDPipeConfig.admission must be one of .*'greedy'.*got 'psychic'"):
        TDPipeConfig(admission="psychic")
    with pytest.raises(ValueError, match=r"TDPipeConfig.decode_batcher must be one of .*'steal-rows'"):
        TDPipeConfig(decode_batcher="telepathy")
    with pytest.raises(ValueError, match=r"TDPipeConfig.policy must be one of .*'hybrid'"):
        TDPipeConfig(policy="vibes")
    with pytest.raises(ValueError, match=r"unknown plugin group"):
        plugins.available("tdpipe_hf.nothing")


class HalfBudget:
    """Admits while the prompts fit in half the free KV; counts what it saw."""

    admitted = 0
    observed = 0

    def admit(self, waiting, running, blocks, max_running):
        free, count = blocks.num_free // 2, 0
        for request in waiting:
            need = blocks.extra_blocks(request, request.num_tokens)
            if need > free or len(running) + count >= max_running:
                break
            free, count = free - need, count + 1
        count = count or (1 if not running and waiting else 0)  # never stall an empty engine
        HalfBudget.admitted += count
        return count

    def observe(self, request):
        HalfBudget.observed += 1


def test_code_registered_admission_policy_is_used_and_tokens_unchanged():
    model = tiny_model("llama", seed=71)
    prompts = random_prompts(10, seed=72)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40)
    expected = model.generate_batch(prompts, max_new_tokens=12)
    plugins.register_admission("half-budget", lambda config, predictor: HalfBudget())
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40, admission="half-budget")
    assert model.generate_batch(prompts, max_new_tokens=12) == expected
    assert HalfBudget.admitted >= len(prompts)
    assert HalfBudget.observed == len(prompts)
    tdpipe_hf.unwrap(model)


def test_code_registered_scheduler_is_used():
    """A scheduler kind from code: TD-Pipe's phase machine with vLLM's prefill packing, built
    from the registry's own parts."""
    from tdpipe_hf.scheduling import build_admission, build_batcher, build_switch

    built = []

    def fcfs_tdpipe(config, blocks, num_stages, predictor):
        built.append(config.policy)
        return Scheduler(blocks, num_stages, build_admission(config, predictor), build_batcher(config),
                         build_switch(config), prefill_chunk_tokens=config.prefill_chunk_tokens,
                         prefill_packing="fcfs")

    plugins.register_scheduler("fcfs-tdpipe", fcfs_tdpipe)
    model = tiny_model("llama", seed=73)
    prompts = random_prompts(8, seed=74)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40)
    expected = model.generate_batch(prompts, max_new_tokens=10)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40, policy="fcfs-tdpipe")
    assert model.generate_batch(prompts, max_new_tokens=10) == expected
    assert built and set(built) == {"fcfs-tdpipe"}
    tdpipe_hf.unwrap(model)


def test_parts_missing_a_method_are_named_at_wrap():
    class NoObserve:
        def admit(self, waiting, running, blocks, max_running):
            return len(waiting)

    plugins.register_admission("no-observe", lambda config, predictor: NoObserve())
    model = tiny_model("llama", seed=75)
    with pytest.raises(TypeError, match=r"admission policy 'no-observe' \(NoObserve\) has no observe"):
        tdpipe_hf.wrap(model, num_stages=1, kv_blocks=16, admission="no-observe")
    plugins.register_scheduler("empty", lambda config, blocks, num_stages, predictor: object())
    with pytest.raises(TypeError, match=r"scheduler 'empty' \(object\) has no .*schedule.*update_from_output"):
        tdpipe_hf.wrap(model, num_stages=1, kv_blocks=16, policy="empty")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_a_valid_config_for_every_reader(name):
    spec = variant(name)
    config = TDPipeConfig(num_stages=2, kv_blocks=64, **spec.options)
    scheduler = build_scheduler(config, 64, 2, ConstantPredictor(8.0))
    assert isinstance(scheduler, protocols.SchedulerPolicy)
    assert spec.summary and spec.parallel in ("pp", "tp")
    assert (name in ENGINE_VARIANTS) == spec.in_engine


def test_every_phase_name_is_declared_once():
    assert PHASES == ("prefill", "decode", "mixed")
    with pytest.raises(ValueError, match=r"phase must be one of"):
        MicroBatch(0, "chunked", [])


def test_base_scheduler_leaves_schedule_to_subclasses():
    with pytest.raises(NotImplementedError):
        BaseScheduler(BlockManager(8, 4), 1, AdmitWhileFits()).schedule()


def test_abort_retires_waiting_idle_and_in_flight_requests_and_loses_nothing_else():
    prompts = [[(5 * i + j) % 49 + 1 for j in range(4 + i % 3)] for i in range(8)]
    blocks = BlockManager(64, 4)
    scheduler = Scheduler(blocks, 2, AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(),
                          prefill_chunk_tokens=8)
    finished: list[Request] = []
    controller = Controller(FakePipeline(2, 4), scheduler, on_finish=finished.append)
    requests = [Request(i, p, 12, frozenset({EOS})) for i, p in enumerate(prompts)]
    for request in requests:
        controller.add(request)
    controller.abort(7)  # still waiting: retired at once
    assert finished[-1].request_id == 7 and finished[-1].finish_reason == ABORTED
    controller.step()  # some micro-batches are now in flight
    in_flight = next(r for r in requests if r.in_flight)
    controller.abort(in_flight.request_id)
    assert in_flight.status is not Status.FINISHED  # its blocks are being written: retired on return
    controller.abort(12345)  # unknown ids are ignored
    while not any(r.status is Status.DECODING and not r.in_flight for r in scheduler.running):
        controller.step()
    idle = next(r for r in scheduler.running if r.status is Status.DECODING and not r.in_flight)
    controller.abort(idle.request_id)  # holds KV but is not in the pipeline: retired at once
    assert finished[-1] is idle and idle not in scheduler.running
    while controller.has_work:
        controller.step()
    aborted = {7, in_flight.request_id, idle.request_id}
    assert {r.request_id for r in finished if r.finish_reason == ABORTED} == aborted
    assert sorted(r.request_id for r in finished) == list(range(8))
    for request, prompt in zip(requests, prompts):
        if request.request_id not in aborted:
            assert request.output_ids == reference(prompt, 12)
    assert blocks.num_free == blocks.num_blocks, "an aborted request kept its KV blocks"
