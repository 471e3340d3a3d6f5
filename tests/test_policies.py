"""Decode-phase policies and baseline schedules on the fake paged pipeline of test_scheduler:
tokens stay exact under every policy, work stealing rebalances, the intensity switch weighs
measured stage times, and misbehaving switch plugins are named."""

from __future__ import annotations

import pytest
from test_scheduler import EOS, FakePipeline, reference

from tdpipe_hf.controller import BlockManager, Controller, Request, Scheduler
from tdpipe_hf.controller.cost import StageTimeModel
from tdpipe_hf.controller.hybrid import HybridScheduler
from tdpipe_hf.controller.scheduler import DecodeState
from tdpipe_hf.plan import StepResult
from tdpipe_hf.policies import (
    AdmitWhileFits,
    IntensitySwitch,
    ReadyPoolBatcher,
    StaticBatcher,
    ThresholdSwitch,
)
from tdpipe_hf.policies.baselines import AdmitWholeGroup, DrainSwitch
from tdpipe_hf.policies.switch import CheckedSwitch
from tdpipe_hf.predictors import ConstantPredictor


def scheduler_for(policy: str, blocks: BlockManager, num_stages: int, chunk: int) -> Scheduler:
    common = dict(prefill_chunk_tokens=chunk)
    if policy == "hybrid":
        return HybridScheduler(blocks, num_stages, AdmitWhileFits(), **common)
    if policy == "naive":
        return Scheduler(blocks, num_stages, AdmitWholeGroup(), StaticBatcher(), DrainSwitch(), **common)
    batcher = StaticBatcher() if policy == "tdpipe-nosteal" else ReadyPoolBatcher()
    switch = ThresholdSwitch() if policy == "tdpipe-threshold" else IntensitySwitch()
    return Scheduler(blocks, num_stages, AdmitWhileFits(), batcher, switch, **common)


POLICIES = ["tdpipe", "tdpipe-nosteal", "tdpipe-threshold", "hybrid", "naive"]


def run_policy(policy, prompts, max_new, num_stages=2, num_blocks=40, block_size=4, chunk=16, pipeline=None):
    blocks = BlockManager(num_blocks, block_size)
    pipeline = pipeline or FakePipeline(num_stages, block_size)
    requests = [Request(i, p, max_new, frozenset({EOS})) for i, p in enumerate(prompts)]
    stats = Controller(pipeline, scheduler_for(policy, blocks, num_stages, chunk)).run(requests)
    assert blocks.num_free == blocks.num_blocks, "KV blocks leaked"
    return requests, stats, pipeline


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_blocks", [200, 30], ids=["roomy", "tight"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_every_policy_gives_every_request_its_tokens(policy, num_blocks, num_stages):
    prompts = [[(5 * i + j) % 49 + 1 for j in range(3 + i % 11)] for i in range(20)]
    requests, stats, pipeline = run_policy(policy, prompts, 24, num_stages, num_blocks)
    assert [r.output_ids for r in requests] == [reference(p, 24) for p in prompts]
    assert pipeline.max_in_flight <= num_stages


def test_hybrid_mixes_chunked_prefill_with_decode():
    prompts = [[i % 40 + 1] * 20 for i in range(12)]
    _, stats, pipeline = run_policy("hybrid", prompts, 16, chunk=12)
    assert stats.micro_batches.get("mixed", 0) > 0, "hybrid must put prefill chunks next to decodes"
    assert stats.phase_switches == 0


def test_naive_admits_a_new_group_only_when_the_last_is_done():
    prompts = [[i % 40 + 1] * 6 for i in range(12)]
    requests, stats, pipeline = run_policy("naive", prompts, 10, num_blocks=16)  # 4 per group (4 blocks each)
    assert stats.preemptions == 0
    phases = [phase for phase, _ in pipeline.log]
    assert phases.count("prefill") >= 3 and stats.phase_switches >= 5


class ScriptedPipeline(FakePipeline):
    """Request i emits EOS after ``lengths[i]`` tokens: a controllable wave of finishes."""

    def __init__(self, num_stages, block_size, prompt_len, lengths):
        super().__init__(num_stages, block_size)
        self.prompt_len, self.lengths = prompt_len, lengths

    def collect(self) -> StepResult:
        batch = self.queue.popleft()
        tokens = {}
        for seq in batch.seqs:
            generated = seq.context_len - self.prompt_len + 1
            tokens[seq.request_id] = EOS if generated >= self.lengths[seq.request_id] else 7
        return StepResult(batch.batch_id, tokens)


@pytest.mark.parametrize("policy, balanced", [("tdpipe", True), ("tdpipe-nosteal", False)])
def test_work_stealing_rebalances_after_a_wave_of_finishes(policy, balanced):
    """20 requests in two decode micro-batches of 10; 8 of the first batch finish at step 4.
    With stealing, after the wave every pair of consecutive decode batches is within one request."""
    lengths = [4 if i < 8 else 30 for i in range(20)]
    pipeline = ScriptedPipeline(2, 4, 3, lengths)
    _, stats, _ = run_policy(policy, [[1, 2, 3]] * 20, 40, num_blocks=400, chunk=64, pipeline=pipeline)
    sizes = [rows for rows, _ in stats.decode_batches]
    assert sizes[:2] == [10, 10]
    wave = next(i for i, size in enumerate(sizes) if size < 10)
    after = sizes[wave + 2:-2]  # settled, before the final drain
    spread = max(abs(a - b) for a, b in zip(after, after[1:]))
    assert (spread <= 1) == balanced, sizes


def kv_bound_cost() -> StageTimeModel:
    """Decode time 2 ms + 0.01 ms per row + 0.1 ms per 100 context tokens (KV reads dominate)."""
    cost = StageTimeModel()
    for rows, context in ((4, 400), (8, 4000), (16, 1600), (32, 12800), (64, 3200)):
        cost.observe("decode", rows, rows, context, 0.002 + 1e-5 * rows + 1e-6 * context)
    return cost


def batch_time(batch) -> float:
    return 0.002 + 1e-5 * len(batch) + 1e-6 * sum(r.num_tokens for r in batch)


def test_time_balanced_stealing_evens_out_kv_heavy_batches():
    """Ten old requests (1 000 context tokens) ahead of ten new ones (100): equal rows would put
    all the KV in one batch; balancing by estimated time splits it."""
    ready = [Request(i, [1] * (1000 if i < 10 else 100), 8, frozenset({EOS})) for i in range(20)]
    context = sum(r.num_tokens for r in ready)
    by_rows = ReadyPoolBatcher(balance="rows").select(ready, 20, 2, cost=kv_bound_cost(), context=context)
    assert [r.request_id for r in by_rows] == list(range(10))
    batcher = ReadyPoolBatcher()
    first = batcher.select(ready, 20, 2, cost=kv_bound_cost(), context=context)
    rest = [r for r in ready if r not in first]
    assert max(batch_time(first), batch_time(rest)) / min(batch_time(first), batch_time(rest)) < 1.25
    # the requests it left in the pool ride in the next micro-batch, ahead of any that return
    returned = [Request(20 + i, [1] * 1000, 8, frozenset({EOS})) for i in range(10)]
    second = batcher.select(returned + rest, 20, 2, cost=kv_bound_cost(), context=context)
    assert set(r.request_id for r in rest) <= set(r.request_id for r in second)


def test_time_balanced_stealing_falls_back_to_rows_without_timings():
    ready = [Request(i, [1] * (1000 if i < 10 else 100), 8, frozenset({EOS})) for i in range(20)]
    chosen = ReadyPoolBatcher().select(ready, 20, 2, cost=StageTimeModel(), context=11000)
    assert len(chosen) == 10


def state(**overrides) -> DecodeState:
    cost = StageTimeModel()
    for rows in (2, 4, 8, 16, 32):  # decode: 10 ms fixed + 1 ms per row
        cost.observe("decode", rows, rows, rows * 50, 0.010 + 0.001 * rows)
    values = dict(num_stages=2, num_decoding=8, peak_decoding=64, num_waiting=100, can_admit=True,
                  decode_steps=4, admissible=56, admissible_tokens=56 * 50, decode_context=8 * 50,
                  prefill_chunk_tokens=512, cost=cost)
    values.update(overrides)
    return DecodeState(**values)


def test_intensity_switch_last_call_admits_the_rest_of_the_queue():
    """Three waiting requests, all admissible: the paper's rule sees too little gain to pay a
    switch, but that switch is due anyway; last_call takes it now rather than in a thin tail."""
    rest = dict(num_decoding=60, num_waiting=3, admissible=3, admissible_tokens=150, decode_context=60 * 50)
    assert not IntensitySwitch(last_call=False).should_prefill(state(**rest))
    assert IntensitySwitch().should_prefill(state(**rest))
    assert not IntensitySwitch().should_prefill(state(**dict(rest, num_waiting=4)))


def test_intensity_switch_weighs_lost_decode_intensity_against_switch_bubble():
    switch = IntensitySwitch()
    # 4 rows per micro-batch run at 4/14 rows/ms vs 32/42 after refilling: spatial 0.37 < temporal 0.85
    assert switch.should_prefill(state())
    # a full batch loses nothing by decoding on
    assert not switch.should_prefill(state(num_decoding=60, admissible=4, admissible_tokens=200))
    # only checked every num_stages decode steps, never without something to admit
    assert not switch.should_prefill(state(decode_steps=3))
    assert not switch.should_prefill(state(can_admit=False, admissible=0, admissible_tokens=0))


def test_intensity_switch_falls_back_to_the_threshold_until_it_has_timings():
    switch = IntensitySwitch()
    assert switch.should_prefill(state(cost=StageTimeModel(), num_decoding=8, peak_decoding=64))
    assert not switch.should_prefill(state(cost=StageTimeModel(), num_decoding=40, peak_decoding=64))


def test_stage_time_model_recovers_linear_costs():
    cost = StageTimeModel()
    for rows, context in [(4, 100), (8, 900), (16, 300), (32, 2000), (12, 50)]:
        cost.observe("decode", rows, rows, context, 0.002 + 0.0005 * rows + 1e-6 * context)
    assert cost.decode_time(20, 1000) == pytest.approx(0.002 + 0.01 + 0.001)
    assert cost.prefill_time(100) is None  # no prefill timings yet


def test_switch_plugin_errors_name_the_plugin():
    class Chatty:
        def should_prefill(self, state):
            return "yes"

    with pytest.raises(TypeError, match=r"switch policy 'chatty' returned 'yes'"):
        CheckedSwitch(Chatty(), "chatty").should_prefill(state())
    with pytest.raises(TypeError, match=r"switch policy 'mute' .* has no should_prefill"):
        CheckedSwitch(object(), "mute")


@pytest.mark.parametrize("paper_rules", [False, True])
def test_paper_rules_select_the_papers_three_rules(paper_rules):
    from tdpipe_hf import TDPipeConfig
    from tdpipe_hf.scheduling import build_scheduler

    scheduler = build_scheduler(TDPipeConfig(paper_rules=paper_rules, predictor="constant"), 64, 2,
                                predictor=ConstantPredictor(8.0))
    assert scheduler.batcher.balance == ("rows" if paper_rules else "time")
    assert scheduler.prefill_packing == ("fcfs" if paper_rules else "first-fit")
    assert scheduler.switch.policy.last_call is not paper_rules
    with pytest.raises(ValueError, match="TDPipeConfig.paper_rules"):
        TDPipeConfig(paper_rules="yes")
