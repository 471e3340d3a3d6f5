"""vLLM's pipeline-parallel schedules as real schedulers: exact tokens on the fake pipeline (and
HF-identical in test_equality_tiny, which runs every engine variant), and the behaviour that
defines each: v0's split KV pools, pinned engines and prefill priority, v1's free micro-batch
membership and the micro-batch cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import EOS, VOCAB, FakePipeline, reference

from tdpipe_hf import TDPipeConfig
from tdpipe_hf.controller import Controller, Request, Status
from tdpipe_hf.predictors import ConstantPredictor
from tdpipe_hf.scheduling import build_scheduler

KINDS = ["vllm-v0-pp", "vllm-v1-pp", "vllm-v1-pp-capped", "hybrid-throttled"]
EVERY_KIND = ["tdpipe", "hybrid", "naive", *KINDS]


class CheckedBlocks:
    """Wraps a scheduler's block pools: fails the moment a block still held is handed out as a
    new one, a block is freed by a request that does not hold it, or the budget is exceeded.
    Blocks taken from the prefix cache are held by every request that took them."""

    def __init__(self, scheduler):
        self.holders: dict[int, set[int]] = {}
        pools = getattr(scheduler.blocks, "pools", [scheduler.blocks])
        for pool in pools:
            self._watch(pool)

    def _watch(self, pool):
        reserve, release, take = pool.reserve, pool.release, pool.take_cached_prefix

        def checked_reserve(request, num_tokens):
            before = len(request.block_table)
            reserve(request, num_tokens)
            for block in request.block_table[before:]:
                assert not self.holders.get(block), f"block {block} handed out while {self.holders[block]} hold it"
                self.holders[block] = {request.request_id}
            assert pool.num_used <= pool.num_blocks

        def checked_take(request):
            before = len(request.block_table)
            taken = take(request)
            for block in request.block_table[before:]:
                self.holders.setdefault(block, set()).add(request.request_id)  # shared, or idle until now
            return taken

        def checked_release(request):
            for block in request.block_table:
                assert request.request_id in self.holders.get(block, ()), f"block {block} freed by a non-holder"
                self.holders[block].discard(request.request_id)
            release(request)

        pool.reserve, pool.release, pool.take_cached_prefix = checked_reserve, checked_release, checked_take


@pytest.mark.parametrize("kind", EVERY_KIND)
@settings(max_examples=20, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=14), min_size=1, max_size=10),
       limits=st.lists(st.integers(1, 14), min_size=10, max_size=10), num_stages=st.integers(1, 3),
       num_blocks=st.integers(30, 60), aborts=st.sets(st.integers(0, 9), max_size=3),
       start=st.lists(st.integers(1, VOCAB - 1), max_size=9), shares=st.lists(st.booleans(), min_size=10, max_size=10))
def test_no_scheduler_kind_leaks_double_frees_overbooks_or_starves(kind, prompts, limits, num_stages, num_blocks,
                                                                    aborts, start, shares):
    """Random prompts (some after a shared start, so that cached blocks have several holders),
    lengths, budgets and aborts mid-run: every block goes to its holders only and comes back, no
    request waits forever, every survivor gets its exact tokens."""
    prompts = [start + p if share else p for p, share in zip(prompts, shares)]
    config = TDPipeConfig(policy=kind, num_stages=num_stages, block_size=4, kv_blocks=num_blocks,
                          prefill_chunk_tokens=16, predictor="constant")
    scheduler = build_scheduler(config, num_blocks, num_stages, ConstantPredictor(4.0))
    watch = CheckedBlocks(scheduler)
    controller = Controller(Recording(num_stages, 4), scheduler)
    requests = [Request(i, p, limits[i], frozenset({EOS})) for i, p in enumerate(prompts)]
    for request in requests:
        controller.add(request)
    steps = 0
    while controller.has_work:
        controller.step()
        steps += 1
        if steps == 3:
            for request_id in aborts:
                controller.abort(request_id)
        assert steps < 10_000, "a request is starved"
    for request, prompt in zip(requests, prompts):
        assert request.status is Status.FINISHED
        if request.finish_reason != "abort":
            assert request.output_ids == reference(prompt, limits[request.request_id])
    assert not any(watch.holders.values()) and scheduler.blocks.num_used == 0


class Recording(FakePipeline):
    """The fake pipeline, keeping every micro-batch's phase and request ids."""

    def __init__(self, *args):
        super().__init__(*args)
        self.batches: list[tuple[str, list[int]]] = []
        self.blocks_of: dict[int, set[int]] = {}

    def submit(self, batch):
        self.batches.append((batch.phase, [s.request_id for s in batch.seqs]))
        for seq in batch.seqs:
            self.blocks_of.setdefault(seq.request_id, set()).update(seq.block_table)
        super().submit(batch)


def run(kind, prompts, max_new, num_stages=2, num_blocks=64, block_size=4, chunk=16, max_num_seqs=256):
    config = TDPipeConfig(policy=kind, num_stages=num_stages, block_size=block_size, kv_blocks=num_blocks,
                          prefill_chunk_tokens=chunk, max_num_seqs=max_num_seqs)
    scheduler = build_scheduler(config, num_blocks, num_stages)
    pipeline = Recording(num_stages, block_size)
    requests = [Request(i, p, max_new, frozenset({EOS})) for i, p in enumerate(prompts)]
    Controller(pipeline, scheduler).run(requests)
    return requests, scheduler, pipeline


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=12), min_size=1, max_size=10),
       max_new=st.integers(1, 12), num_stages=st.integers(1, 3), num_blocks=st.integers(24, 60))
def test_every_request_gets_exactly_its_tokens_and_no_block_leaks(kind, prompts, max_new, num_stages, num_blocks):
    requests, scheduler, pipeline = run(kind, prompts, max_new, num_stages, num_blocks)
    for request, prompt in zip(requests, prompts):
        assert request.output_ids == reference(prompt, max_new)
        assert request.status is Status.FINISHED
    assert scheduler.blocks.num_used == 0, "KV blocks leaked"
    assert pipeline.max_in_flight <= num_stages


def test_v0_splits_the_cache_and_pins_requests_to_the_least_loaded_engine():
    prompts = [[(3 * i + j) % 40 + 1 for j in range(5)] for i in range(8)]
    _, scheduler, pipeline = run("vllm-v0-pp", prompts, 6, num_stages=2, num_blocks=64)
    assert [pool.num_blocks for pool in scheduler.blocks.pools] == [32, 32]
    engine = {i: i % 2 for i in range(8)}  # added one by one: the least loaded engine alternates
    for phase, ids in pipeline.batches:
        assert len({engine[i] for i in ids}) == 1, f"a {phase} micro-batch mixes engines: {ids}"
    for request_id, blocks in pipeline.blocks_of.items():  # each request's KV is in its engine's pool
        pool = range(32 * engine[request_id], 32 * engine[request_id] + 32)
        assert blocks <= set(pool), (request_id, sorted(blocks))


def test_v0_prefills_first_and_never_mixes_phases():
    prompts = [[i + 1] * 4 for i in range(6)]
    _, _, pipeline = run("vllm-v0-pp", prompts, 8, num_stages=2, num_blocks=80, chunk=8)
    phases = [phase for phase, _ in pipeline.batches]
    assert set(phases) <= {"prefill", "decode"}
    first_decode = phases.index("decode")
    assert phases[:first_decode] == ["prefill"] * first_decode
    for phase, ids in pipeline.batches:
        if phase == "prefill":
            assert len(ids) * 4 <= 8  # the per-engine token budget (max_num_batched_tokens)


def test_v1_lets_any_idle_request_join_and_the_cap_limits_a_micro_batch():
    prompts = [[i % 40 + 1] * 3 for i in range(12)]
    _, _, free = run("vllm-v1-pp", prompts, 10, num_stages=2, num_blocks=120, chunk=64, max_num_seqs=12)
    _, _, capped = run("vllm-v1-pp-capped", prompts, 10, num_stages=2, num_blocks=120, chunk=64, max_num_seqs=12)
    assert max(len(ids) for _, ids in free.batches) == 12  # vllm#28270: everything in one micro-batch
    assert max(len(ids) for _, ids in capped.batches) <= 6  # PR #28286: max_num_seqs / pp


def test_throttling_spreads_decodes_and_prefill_evenly_over_the_micro_batches():
    prompts = [[i % 40 + 1] * 20 for i in range(12)]
    _, _, free = run("vllm-v1-pp", prompts, 10, num_stages=3, num_blocks=200, chunk=512)
    _, _, throttled = run("hybrid-throttled", prompts, 10, num_stages=3, num_blocks=200, chunk=512)
    decode_rows = lambda p: [len(ids) for phase, ids in p.batches if phase == "decode"]  # noqa: E731
    assert max(decode_rows(free)) >= 8  # v1: whatever is not in flight joins one micro-batch
    assert max(decode_rows(throttled)) <= 4  # about a third of the 12 decoding requests each
    # prefill: 240 prompt tokens over 3 stages, at most 80 (a third) per micro-batch, not 512 at once
    first = throttled.batches[0][1]
    assert len(first) * 20 <= 80 and len(free.batches[0][1]) == 12
