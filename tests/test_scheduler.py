"""Controller and scheduler against a fake executor: phases, pipeline occupancy, KV blocks, preemption.

The fake executor is a toy "model" over a paged store: the next token is a function of the whole
context, read back through the block table. A wrong block table or a block shared by two live
requests therefore changes the tokens, and the comparison with a direct computation catches it.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdpipe_hf.controller import BlockManager, Controller, Request, Scheduler
from tdpipe_hf.controller.request import Status
from tdpipe_hf.plan import MicroBatch, StepResult, fill_forwarded
from tdpipe_hf.policies import AdmitWhileFits, ReadyPoolBatcher, ThresholdSwitch

VOCAB = 50
EOS = 0


def next_token(context: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % VOCAB


def reference(prompt: list[int], max_new: int) -> list[int]:
    out = []
    while len(out) < max_new:
        out.append(next_token(prompt + out))
        if out[-1] == EOS:
            break
    return out


class FakePipeline:
    def __init__(self, num_stages: int, block_size: int, relays_tokens: bool = False,
                 salts: dict[int, str | None] | None = None):
        self.num_stages = num_stages
        self.relays_tokens = relays_tokens  # runs steps planned ahead: hands tokens to "stage 0"
        self.sampled: dict[int, dict[int, int]] = {}
        self.planned_ahead = 0  # rows that were
        self.block_size = block_size
        # a slot's "KV": the salt of the request that computed it and every token up to its own,
        # as real KV depends on the whole prefix (a block taken after another start shows)
        self.store: dict[tuple[int, int], tuple[str | None, tuple[int, ...]]] = {}
        self.salts = salts or {}
        self.queue: deque[MicroBatch] = deque()
        self.max_in_flight = 0
        self.log: list[tuple[str, int]] = []  # (phase, in flight at submit)
        self.submitted: list[MicroBatch] = []

    def submit(self, batch: MicroBatch) -> None:
        self.submitted.append(batch)
        self.queue.append(batch)
        self.max_in_flight = max(self.max_in_flight, len(self.queue))
        self.log.append((batch.phase, len(self.queue)))

    def collect(self) -> StepResult:
        batch = self.queue.popleft()
        self.planned_ahead += sum(seq.follows is not None for seq in batch.seqs)
        fill_forwarded(batch, self.sampled.__getitem__)
        tokens = {}
        for seq in batch.seqs:
            if batch.phase == "decode":
                assert len(seq.token_ids) == 1
            salt = self.salts.get(seq.request_id)
            slot = lambda p: (seq.block_table[p // self.block_size], p % self.block_size)  # noqa: E731
            prefix = self.store[slot(seq.start - 1)][1] if seq.start else ()
            for offset, token in enumerate(seq.token_ids):
                prefix += (token,)
                self.store[slot(seq.start + offset)] = (salt, prefix)
            for p in range(seq.context_len):  # every slot read was computed after this context, same tenant
                assert self.store[slot(p)] == (salt, prefix[:p + 1]), f"request {seq.request_id}: stale KV at {p}"
            tokens[seq.request_id] = next_token(list(prefix))
        if batch.forward_tokens:
            self.sampled[batch.batch_id] = tokens
        return StepResult(batch.batch_id, tokens)

    def close(self) -> None:
        pass


def run(prompts, max_new, num_stages=2, num_blocks=64, block_size=4, chunk=32, fraction=0.5, admission=None,
        fill=0, ahead=False, caching=False, salts=None):
    blocks = BlockManager(num_blocks, block_size, prefix_caching=caching)
    scheduler = Scheduler(blocks, num_stages, admission or AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(fraction),
                          prefill_chunk_tokens=chunk, decode_fill_tokens=fill, plan_ahead=ahead)
    salts = dict(enumerate(salts or []))
    pipeline = FakePipeline(num_stages, block_size, relays_tokens=ahead, salts=salts)
    requests = [Request(i, p, max_new, frozenset({EOS}), cache_salt=salts.get(i)) for i, p in enumerate(prompts)]
    stats = Controller(pipeline, scheduler).run(requests)
    return requests, stats, pipeline, blocks


prompt_lists = st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=20), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(prompts=prompt_lists, max_new=st.integers(1, 20), num_stages=st.integers(1, 4),
       num_blocks=st.integers(11, 40), fraction=st.floats(0, 1), fill=st.sampled_from([0, 0, 3, 12]),
       ahead=st.booleans())
def test_every_request_gets_exactly_its_tokens(prompts, max_new, num_stages, num_blocks, fraction, fill, ahead):
    """Any schedule, with or without decode fills (prompt chunks riding decode micro-batches) and
    decode steps planned ahead (a void step of a request that stopped writes KV blocks that may
    already be another request's: the pipeline's order must make that harmless)."""
    requests, stats, pipeline, blocks = run(prompts, max_new, num_stages, num_blocks, fraction=fraction, fill=fill,
                                            ahead=ahead)
    for request, prompt in zip(requests, prompts):
        assert request.output_ids == reference(prompt, max_new)
        assert request.status is Status.FINISHED
        assert request.finish_reason == ("stop" if request.output_ids[-1] == EOS else "length")
    assert blocks.num_free == blocks.num_blocks, "KV blocks leaked"
    assert pipeline.max_in_flight <= num_stages + ahead  # one step planned ahead at a time
    assert stats.generated_tokens == sum(len(r.output_ids) for r in requests)


# few token values, so that equal blocks after different starts (which must not match) are common
few_tokens = st.integers(1, 3)
shared_starts = st.lists(st.lists(few_tokens, min_size=0, max_size=14), min_size=1, max_size=3)


@settings(max_examples=80, deadline=None)
@given(starts=shared_starts, picks=st.lists(st.tuples(st.integers(0, 2), st.lists(few_tokens, max_size=9),
                                                     st.sampled_from([None, None, "a", "b"])), min_size=1, max_size=12),
       max_new=st.integers(1, 12), num_stages=st.integers(1, 3), num_blocks=st.integers(12, 40),
       fill=st.sampled_from([0, 5]), ahead=st.booleans())
def test_prompts_sharing_their_start_take_it_from_the_cache_and_get_exactly_their_tokens(
        starts, picks, max_new, num_stages, num_blocks, fill, ahead):
    """Prompts made of a few shared starts and their own ends (repeats too), some under a cache
    salt, with the prefix cache: every request's tokens are what its own context gives (the fake
    pipeline computes each token from the KV its blocks hold and checks that each slot read was
    computed after the same tokens for the same salt, so a wrong, shifted, overwritten or other
    tenant's block shows), no block leaks, and cached tokens are never computed."""
    prompts = [starts[i % len(starts)] + end or [1] for i, end, _ in picks]
    salts = [salt for _, _, salt in picks]
    requests, stats, pipeline, blocks = run(prompts, max_new, num_stages, num_blocks, fill=fill, ahead=ahead,
                                            caching=True, salts=salts)
    for request, prompt in zip(requests, prompts):
        assert request.output_ids == reference(prompt, max_new)
    assert blocks.num_free == blocks.num_blocks, "KV blocks leaked"
    assert stats.cached_tokens == blocks.cached_tokens
    _, plain_stats, plain, _ = run(prompts, max_new, num_stages, num_blocks, fill=fill, ahead=ahead, salts=salts)
    if not (stats.preemptions or plain_stats.preemptions or ahead):  # else they compute different (void) steps
        assert computed_tokens(pipeline) + stats.cached_tokens == computed_tokens(plain)


def computed_tokens(pipeline: FakePipeline) -> int:
    return sum(len(seq.token_ids) for batch in pipeline.submitted for seq in batch.seqs)


def test_a_shared_system_prompt_is_taken_from_the_cache():
    """Twelve prompts of 14 tokens that start with the same three blocks, two to a prefill
    micro-batch, two stages: the first two micro-batches are in the pipeline before the first
    comes back, and the eight prompts admitted after it take the three blocks from the cache and
    share one micro-batch, packed by the two tokens each still computes."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8] + [i + 1, i + 2] for i in range(12)]
    requests, stats, pipeline, _ = run(prompts, 6, num_stages=2, num_blocks=60, chunk=28, caching=True)
    assert [r.output_ids for r in requests] == [reference(p, 6) for p in prompts]
    starts = [seq.start for batch in pipeline.submitted if batch.phase == "prefill" for seq in batch.seqs]
    assert starts == [0] * 4 + [12] * 8 and stats.cached_tokens == 8 * 12
    assert stats.micro_batches["prefill"] == 3


def test_a_repeated_prompt_takes_every_full_block_but_its_last_token():
    """Two identical prompts of three full blocks, the second admitted after the first is
    computed: it takes two blocks (its last block holds its last token, which must be computed
    for its logits), shares them, and each block returns to the pool once both are done."""
    blocks = BlockManager(8, 4, prefix_caching=True)
    first, second = Request(0, list(range(1, 13)), 4), Request(1, list(range(1, 13)), 4)
    assert blocks.take_cached_prefix(first) == 0
    blocks.reserve(first, 12)
    first.num_cached = 12
    blocks.cache_computed_blocks(first)
    assert blocks.take_cached_prefix(second) == 8 and second.num_cached == 8
    assert second.block_table == first.block_table[:2] and blocks.num_free == 5
    blocks.reserve(second, 12)
    assert second.block_table[2] != first.block_table[2] and blocks.num_free == 4
    blocks.release(first)
    assert blocks.num_free == 5  # the two shared blocks are still held by the second
    blocks.release(second)
    assert blocks.num_free == 8 and blocks.cached_tokens == 8


def test_a_cached_block_matches_only_after_the_same_tokens():
    """A block is found by its tokens and everything before them: the same block of tokens after
    a different start is not a hit; a cached block no one holds is reused last, and then forgotten."""
    blocks = BlockManager(3, 2, prefix_caching=True)
    owner = Request(0, [5, 6, 7, 8, 9], 1)
    blocks.reserve(owner, 5)
    owner.num_cached = 5
    blocks.cache_computed_blocks(owner)  # blocks for [5, 6] and [5, 6, 7, 8]
    blocks.release(owner)
    assert blocks.num_free == 3
    assert blocks.take_cached_prefix(Request(1, [1, 2, 7, 8, 9], 1)) == 0  # [7, 8] after another start
    assert blocks.take_cached_prefix(Request(6, [5, 6, 7, 8, 1, 2], 1, cache_salt="tenant")) == 0  # another salt
    assert blocks.take_cached_prefix(Request(7, [5, 6, 7, 8, 1, 2], 1, cache_salt="\ud800")) == 0  # JSON allows it
    hit = Request(2, [5, 6, 7, 8, 1, 2], 1)
    assert blocks.take_cached_prefix(hit) == 4
    blocks.release(hit)
    filler = Request(3, [9] * 6, 1)
    blocks.reserve(filler, 6)  # the plain free block first, then the cached ones, oldest first
    blocks.release(filler)
    assert blocks.take_cached_prefix(Request(4, [5, 6, 7, 8, 1], 1)) == 0
    assert not BlockManager(3, 2).take_cached_prefix(Request(5, [5, 6, 7], 1))  # caching off


def test_a_salt_spelling_a_block_cannot_shift_the_chain():
    """A salt whose bytes are one block's tokens must not make its chain start where that
    block's ends: it would take the next block, computed for other positions, as its first."""
    from array import array

    blocks = BlockManager(4, 4, prefix_caching=True)
    owner = Request(0, [0x41, 0x42, 0x43, 0x44, 7, 8, 9, 10, 3], 1)
    blocks.reserve(owner, 9)
    owner.num_cached = 9
    blocks.cache_computed_blocks(owner)
    blocks.release(owner)
    salt = array("q", [0x41, 0x42, 0x43, 0x44]).tobytes().decode()
    assert blocks.take_cached_prefix(Request(1, [7, 8, 9, 10, 5, 6], 1, cache_salt=salt)) == 0


def test_decode_steps_are_planned_ahead_of_their_tokens():
    """``plan_ahead``: most decode rows ride a step sent before the token it computes came back,
    the pipeline holds one such step beyond its slots, and the answers are unchanged."""
    prompts = [[(5 * i + j) % 49 + 1 for j in range(6)] for i in range(10)]
    plain, _, _, _ = run(prompts, 24, num_blocks=200)
    ahead, stats, pipeline, blocks = run(prompts, 24, num_blocks=200, ahead=True)
    assert [r.output_ids for r in ahead] == [r.output_ids for r in plain]
    decode_rows = sum(len(r.output_ids) - 1 for r in ahead)
    assert pipeline.planned_ahead >= decode_rows // 2
    assert pipeline.max_in_flight == 3
    assert blocks.num_free == blocks.num_blocks


def test_a_request_aborted_while_a_step_is_planned_ahead_is_retired_once():
    scheduler = Scheduler(BlockManager(100, 4), 2, AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(0.5),
                          prefill_chunk_tokens=64, plan_ahead=True)
    pipeline = FakePipeline(2, 4, relays_tokens=True)
    finished = []
    controller = Controller(pipeline, scheduler, on_finish=finished.append)
    requests = [Request(i, [i + 1] * 5, 30, frozenset({EOS})) for i in range(6)]
    for request in requests:
        controller.add(request)
    while pipeline.planned_ahead == 0 or not any(seq.follows is not None for b in pipeline.queue for seq in b.seqs):
        controller.step()
    victim = next(seq.request_id for b in pipeline.queue for seq in b.seqs if seq.follows is not None)
    controller.abort(victim)
    while controller.has_work:
        controller.step()
    assert [r.request_id for r in finished].count(victim) == 1
    assert requests[victim].finish_reason == "abort"
    assert all(r.output_ids == reference(r.prompt_ids, 30) for r in requests if r.request_id != victim)
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks


def test_tight_budget_preempts_and_recomputes():
    prompts = [[(7 * i + j) % 49 + 1 for j in range(10)] for i in range(8)]
    roomy, roomy_stats, _, _ = run(prompts, 30, num_blocks=200)
    tight, tight_stats, _, blocks = run(prompts, 30, num_blocks=14)
    assert roomy_stats.preemptions == 0 and tight_stats.preemptions > 0
    assert [r.output_ids for r in tight] == [r.output_ids for r in roomy]
    assert blocks.num_free == blocks.num_blocks


def test_phases_are_temporally_disaggregated():
    """All prompts fit: one prefill phase, then decode with num_stages micro-batches in flight."""
    prompts = [[i % 40 + 1] * (3 + i % 5) for i in range(16)]
    _, stats, pipeline, _ = run(prompts, 12, num_stages=3, num_blocks=200, chunk=16)
    phases = [phase for phase, _ in pipeline.log]
    first_decode = phases.index("decode")
    assert set(phases[:first_decode]) == {"prefill"} and first_decode >= 3
    assert "prefill" not in phases[first_decode:]
    assert stats.phase_switches == 1
    # the pipeline stays full in decode while there is enough work for every stage
    steady = [inflight for phase, inflight in pipeline.log[first_decode:first_decode + 20]]
    assert max(steady) == 3


def test_decode_hands_back_to_prefill_when_work_drains():
    """More requests than fit: the scheduler alternates phases rather than draining decode to zero."""
    prompts = [[i % 40 + 1] * 8 for i in range(24)]
    requests, stats, pipeline, _ = run(prompts, 16, num_stages=2, num_blocks=30, chunk=64)
    assert stats.phase_switches >= 3
    assert all(r.status is Status.FINISHED for r in requests)


def test_block_manager_accounting():
    blocks = BlockManager(5, 4)
    request = Request(0, [1] * 6, 10)
    assert blocks.blocks_for(6) == 2 and blocks.extra_blocks(request, 6) == 2
    blocks.reserve(request, 6)
    assert len(request.block_table) == 2 and blocks.num_free == 3
    blocks.reserve(request, 8)  # still within two blocks
    assert blocks.num_free == 3
    assert not blocks.can_hold(request, 21)
    with pytest.raises(RuntimeError, match="needs 4 KV blocks, 3 free"):
        blocks.reserve(request, 24)
    blocks.release(request)
    assert blocks.num_free == 5 and request.block_table == []
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 4)


@pytest.mark.parametrize("packing, first", [("first-fit", [0, 2]), ("fcfs", [0])])
def test_prefill_packing_fills_the_room_the_head_leaves(packing, first):
    """Prompts of 6, 9 and 3 tokens, 10 per micro-batch: first-fit adds the 3-token request
    after the 6 (an even 9 | 9 split); fcfs stops at the 9 (6 | 9 | 3)."""
    blocks = BlockManager(64, 4)
    scheduler = Scheduler(blocks, 2, AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(),
                          prefill_chunk_tokens=10, prefill_packing=packing)
    for i, size in enumerate((6, 9, 3)):
        scheduler.add(Request(i, [1] * size, 4, frozenset({EOS})))
    assert [seq.request_id for seq in scheduler.schedule().seqs] == first


class CountingAdmission(AdmitWhileFits):
    """The baseline rule, counting how often the scheduler asks it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def admit(self, *args) -> int:
        self.calls += 1
        return super().admit(*args)


def test_prefill_phase_asks_admission_once_per_decision():
    """Admission (a KV simulation for greedy prefill) is decided once for a prefill phase, not
    again for every micro-batch; the scheduler asks again when that decision is used up, or when
    the queue's head changes under it (an abort)."""
    admission = CountingAdmission()
    scheduler = Scheduler(BlockManager(64, 4), 4, admission, ReadyPoolBatcher(), ThresholdSwitch(),
                          prefill_chunk_tokens=8)
    for i in range(4):
        scheduler.add(Request(i, [1] * 8, 4, frozenset({EOS})))
    batches = [scheduler.schedule() for _ in range(3)]
    assert [[seq.request_id for seq in b.seqs] for b in batches] == [[0], [1], [2]]
    assert admission.calls == 1
    scheduler.add(Request(4, [1] * 8, 4, frozenset({EOS})))
    scheduler.abort(3)  # the head of the queue changed: the decision is stale
    assert [seq.request_id for seq in scheduler.schedule().seqs] == [4]
    assert admission.calls == 2


def test_decode_fill_carries_prompt_chunks_in_small_decode_batches():
    """Two requests decode while three more wait; the threshold switch would not hand back to
    prefill yet (2 decoding of a peak of 2), so without a fill the waiting ones start only when
    decode drains. With ``decode_fill_tokens=6`` a decode micro-batch of one row carries up to 5
    prompt tokens: a 7-token prompt is split over two micro-batches and samples only at the end."""
    def first_fill(fill):
        blocks = BlockManager(64, 4)
        scheduler = Scheduler(blocks, 2, AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(0.5),
                              prefill_chunk_tokens=64, decode_fill_tokens=fill)
        pipeline = FakePipeline(2, 4)
        controller = Controller(pipeline, scheduler)
        for i, size in enumerate((3, 3)):
            controller.add(Request(i, [i + 1] * size, 30))
        controller.step()  # the prefill of both; then more requests arrive
        for i, size in ((2, 7), (3, 2), (4, 2)):
            controller.add(Request(i, [i + 1] * size, 30))
        while len(pipeline.submitted) < 8 and controller.has_work:
            controller.step()
        return [(b.phase, [(s.request_id, len(s.token_ids), s.sample) for s in b.seqs]) for b in pipeline.submitted[1:]]

    assert all(phase == "decode" for phase, _ in first_fill(0)[:4])
    filled = first_fill(6)
    chunks = [seq for _, seqs in filled for seq in seqs if seq[0] == 2]
    assert chunks[:2] == [(2, 5, False), (2, 2, True)]  # split at the budget; samples once, at the end
    assert any(phase == "mixed" for phase, _ in filled)
    assert all(sum(n for _, n, _ in seqs) <= 6 for phase, seqs in filled if phase == "mixed")


def test_decode_fill_setting_is_checked():
    with pytest.raises(ValueError, match="decode_fill_tokens"):
        Scheduler(BlockManager(8, 4), 2, AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(), decode_fill_tokens=-3)


def test_a_prompt_cut_by_a_decode_fill_keeps_moving():
    """A 40-token prompt cut by decode fills of 8 tokens must finish its prefill although the
    short prompts queued behind it, admitted by later fills, become decode rows that use up every
    micro-batch's budget: a cut prompt holds KV for all its tokens, so it moves on regardless (it
    used to wait for hundreds of micro-batches)."""
    scheduler = Scheduler(BlockManager(2048, 4), 4, AdmitWhileFits(), ReadyPoolBatcher(), ThresholdSwitch(0.5),
                          prefill_chunk_tokens=64, decode_fill_tokens=8)
    pipeline = FakePipeline(4, 4)
    controller = Controller(pipeline, scheduler)
    for i in range(4):
        controller.add(Request(i, [i + 1] * 3, 150, frozenset({EOS})))
    controller.step()
    cut = Request(99, [7] * 40, 5, frozenset({EOS}))
    controller.add(cut)
    for i in range(4, 34):
        controller.add(Request(i, [i % 40 + 1], 150, frozenset({EOS})))
    while cut.status in (Status.WAITING, Status.PREFILLING):
        controller.step()
        assert len(pipeline.submitted) < 100, "the cut prompt stalled"
    while controller.has_work:
        controller.step()
    assert cut.output_ids == reference(cut.prompt_ids, 5)


def test_a_switch_that_ignores_admission_never_admits_on_a_stale_decision():
    """A plugin switch may hand back to prefill without reading ``admissible``; the prefill phase
    must then ask the admission afresh, not reuse what a decode fill was told steps earlier when
    more KV was free (that over-reserved blocks and crashed the run)."""
    class AfterEightSteps:
        def should_prefill(self, state):
            return state.decode_steps >= 8

    for num_blocks in range(18, 26):
        scheduler = Scheduler(BlockManager(num_blocks, 4), 1, AdmitWhileFits(), ReadyPoolBatcher(), AfterEightSteps(),
                              prefill_chunk_tokens=64, decode_fill_tokens=4)
        pipeline = FakePipeline(1, 4)
        controller = Controller(pipeline, scheduler)
        requests = [Request(i, [i + 1] * 4, 20, frozenset({EOS})) for i in range(2)]
        for request in requests:
            controller.add(request)
        while not any(b.phase == "decode" for b in pipeline.submitted):
            controller.step()
        late = [Request(i, [i + 1] * 16, 2, frozenset({EOS})) for i in range(2, 6)]
        for request in late:
            controller.add(request)
        while controller.has_work:
            controller.step()
        for request in requests + late:
            assert request.output_ids == reference(request.prompt_ids, request.max_new_tokens)


def test_micro_batch_ids_are_never_reused_by_a_later_run():
    """Stage 0 finds a step planned ahead's tokens by the id of the batch it follows, in relays
    that outlive a run: a later run reusing an id could take the earlier run's tokens."""
    prompts = [[3, 4, 5], [6, 7]]
    _, _, first, _ = run(prompts, 6, ahead=True)
    _, _, second, _ = run(prompts, 6, ahead=True)
    assert not {b.batch_id for b in first.submitted} & {b.batch_id for b in second.submitted}
