"""The TD-Pipe phase machine: micro-batches are all-prefill or all-decode, phases alternate.

PREFILL fills the pipeline with prefill micro-batches of newly admitted requests until admission
stops; DECODE keeps ``num_stages`` decode micro-batches circulating until the switch policy hands
back to PREFILL. Requests whose KV no longer fits are preempted (youngest first) and recomputed.
With ``decode_fill_tokens`` (ours, off by default) small decode micro-batches also carry prompt
chunks, so the DECODE phase may hold mixed micro-batches.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..plan import DECODE, MIXED, PREFILL, MicroBatch
from .base import ABORTED, BaseScheduler, StepOutput, stop_reason
from .cost import StageTimeModel
from .kv import BlockManager
from .request import Request, Status

__all__ = ["ABORTED", "DecodeState", "Phase", "Scheduler", "StepOutput", "stop_reason"]


class Phase(enum.Enum):
    PREFILL = PREFILL
    DECODE = DECODE


PREFILL_PACKINGS = ("first-fit", "fcfs")


class DecodeState:
    """What a switch policy sees when deciding whether to leave decode.

    ``admissible`` (waiting requests a prefill phase would admit now), ``admissible_tokens``
    (their tokens to prefill) and ``can_admit`` run the admission policy, which costs a KV
    simulation: given as numbers, or computed from ``admission()`` on first read, so a policy
    that decides without them (most decode steps) never pays for it.
    """

    def __init__(self, num_stages: int, num_decoding: int, peak_decoding: int, num_waiting: int,
                 decode_steps: int, decode_context: int = 0, prefill_chunk_tokens: int = 512,
                 cost: StageTimeModel | None = None, can_admit: bool | None = None, admissible: int | None = None,
                 admissible_tokens: int | None = None,
                 admission: Callable[[], tuple[int, int]] | None = None):
        self.num_stages = num_stages
        self.num_decoding = num_decoding
        self.peak_decoding = peak_decoding
        self.num_waiting = num_waiting
        self.decode_steps = decode_steps  # decode micro-batches formed in this decode phase
        self.decode_context = decode_context  # context tokens of the decoding requests (KV attention reads)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.cost = cost  # stage times fitted to this run
        self._admission = admission
        self._admissible = admissible
        self._admissible_tokens = admissible_tokens
        self._can_admit = can_admit

    def _admit(self) -> None:
        if self._admissible is None:
            self._admissible, self._admissible_tokens = self._admission() if self._admission else (0, 0)

    @property
    def admissible(self) -> int:
        self._admit()
        return self._admissible

    @property
    def admissible_tokens(self) -> int:
        if self._admissible_tokens is None:
            self._admit()
        return self._admissible_tokens

    @property
    def computed_admissible(self) -> int | None:
        """``admissible`` if a policy already paid for it, else None (for the scheduler to reuse)."""
        return self._admissible

    @property
    def can_admit(self) -> bool:
        return self._can_admit if self._can_admit is not None else self.admissible > 0


class Scheduler(BaseScheduler):
    """TD-Pipe's scheduler: an ``AdmissionPolicy`` admits prefills, a ``DecodeBatcher`` forms the
    decode micro-batches and a ``SwitchPolicy`` ends each decode phase."""

    def __init__(self, blocks: BlockManager, num_stages: int, admission, batcher, switch,
                 prefill_chunk_tokens: int = 512, max_num_seqs: int = 256, prefill_packing: str = "first-fit",
                 decode_fill_tokens: int = 0, plan_ahead: bool = False):
        """``decode_fill_tokens``: a decode micro-batch of fewer rows than this carries chunks of
        admitted prompts up to that many tokens in all (0: never; see ``_fill``). ``plan_ahead``:
        decode micro-batches ask the last stage to hand their tokens to stage 0, and the
        controller may plan their next step before they come back (``follow_up``)."""
        super().__init__(blocks, num_stages, admission, prefill_chunk_tokens, max_num_seqs)
        self.plan_ahead = plan_ahead
        if isinstance(decode_fill_tokens, bool) or not isinstance(decode_fill_tokens, int) or decode_fill_tokens < 0:
            raise ValueError(f"decode_fill_tokens must be a non-negative integer, got {decode_fill_tokens!r}")
        self.decode_fill_tokens = decode_fill_tokens
        self.batcher = batcher
        self.switch = switch
        if prefill_packing not in PREFILL_PACKINGS:
            raise ValueError(f"prefill_packing must be one of {PREFILL_PACKINGS}, got {prefill_packing!r}")
        self.prefill_packing = prefill_packing
        self.phase = Phase.PREFILL
        self.num_phase_switches = 0
        self._peak_decoding = 0
        self._decode_steps = 0
        # waiting requests at the queue's head that the admission's last decision let in and no
        # micro-batch has taken yet (in a prefill phase, or for the decode fill): its KV
        # simulation runs once per decision, not once per micro-batch (0 or None: ask again)
        self._quota: int | None = None
        self._quota_step = 0  # ``_decode_steps`` when the admission last decided

    def _set_quota(self, count: int) -> None:
        self._quota, self._quota_step = count, self._decode_steps

    def on_leave(self, request: Request) -> None:
        self.batcher.forget(request)

    def requeue(self, request: Request) -> None:
        super().requeue(request)
        self._quota = None  # the queue's head changed under the admission's decision

    def abort(self, request_id: int) -> Request | None:
        self._quota = None
        return super().abort(request_id)

    def schedule(self) -> MicroBatch | None:
        """The next micro-batch to dispatch, or None if nothing can run before a result returns."""
        if self.phase is Phase.PREFILL:
            batch = self._prefill_batch()
            if batch is not None:
                return batch
            self._enter(Phase.DECODE)
            return self._decode_batch(self._decoding())
        decoding = self._decoding()
        if self.waiting:
            state = self._decode_state(decoding)
            switch = self.switch.should_prefill(state)
            if state.computed_admissible is not None:  # fresh: the decode fill may use it as well
                self._set_quota(state.computed_admissible)
            elif switch:
                self._quota = None  # a fill's earlier decision is stale: the prefill phase asks afresh
            if switch:
                batch = self._prefill_batch()
                if batch is not None:
                    self._enter(Phase.PREFILL)
                    return batch
        return self._decode_batch(decoding)

    def _decoding(self) -> tuple[int, int, list[Request]]:
        """(decoding requests, their context tokens, those not in flight), in one pass over the
        running set: the controller does this for every decode micro-batch."""
        count, context, ready = 0, 0, []
        for request in self.running:
            if request.status is Status.DECODING:
                count += 1
                context += request.num_tokens
                if not request.in_flight:
                    ready.append(request)
        return count, context, ready

    def _enter(self, phase: Phase) -> None:
        if phase is not self.phase:
            self.phase = phase
            self.num_phase_switches += 1
        if phase is Phase.DECODE:
            # the prefill phase ends when the admission has just said "no more" (or nothing waits),
            # so the decode fill asks again only after a round of the pipeline has changed the KV
            self._peak_decoding = 0
            self._decode_steps = 0
            self._set_quota(0)

    def _decode_state(self, decoding: tuple[int, int, list[Request]]) -> DecodeState:
        """What the switch policy sees; ``decoding`` is ``_decoding()``'s summary."""
        num_decoding, context, _ = decoding

        def admission() -> tuple[int, int]:
            count = self.admissible()
            return count, sum(self.waiting[i].num_tokens for i in range(count))

        return DecodeState(
            num_stages=self.num_stages,
            num_decoding=num_decoding,
            peak_decoding=self._peak_decoding,
            num_waiting=len(self.waiting),
            decode_steps=self._decode_steps,
            decode_context=context,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            cost=self.cost,
            admission=admission,
        )

    def _prefill_batch(self) -> MicroBatch | None:
        """Up to ``prefill_chunk_tokens`` of admitted requests (a longer prompt goes alone, whole).
        ``prefill_packing="first-fit"`` fills the room the queue's head leaves with later admitted
        requests that fit, so micro-batches come out even (in a pipeline the longest one stalls the
        stages behind it); "fcfs" stops at the first request that does not fit (vLLM's rule).
        Either way the batch holds only requests the admission let in, and only while their
        prompts' KV fits now. Prompts a decode fill cut short go first, the rest of each whole,
        packed the same way."""
        partial = self._partially_prefilled()
        if partial:
            rests, tokens = [], 0
            for request in partial:
                size = len(request.pending_ids)
                if not rests or tokens + size <= self.prefill_chunk_tokens:
                    rests.append(request)
                    tokens += size
            return self.new_batch(PREFILL, [self.plan(r) for r in rests])
        if not self._quota:
            self._set_quota(self.admissible())
        count = min(self._quota, len(self.waiting))
        picked, tokens, free = [], 0, self.blocks.num_free
        for i in range(count):
            request = self.waiting[i]
            need = self.blocks.extra_blocks(request, request.num_tokens)
            if need > free:  # the decision is older than the KV it saw: stop, ask again next time
                count = i
                break
            size = request.num_tokens - self.blocks.cached_prefix_tokens(request)  # what it will compute
            if not picked or tokens + size <= self.prefill_chunk_tokens:
                picked.append(i)
                tokens += size
                free -= need
            elif self.prefill_packing == "fcfs" or tokens >= self.prefill_chunk_tokens:
                break
        chosen = [self.waiting[i] for i in picked]
        for i in reversed(picked):
            del self.waiting[i]
        self._quota = count - len(chosen)
        for request in chosen:
            self.admit(request)
        return self.new_batch(PREFILL, [self.plan(r) for r in chosen]) if chosen else None

    def _decode_batch(self, decoding: tuple[int, int, list[Request]]) -> MicroBatch | None:
        num_decoding, context, ready = decoding
        chosen = []
        if ready:
            self._peak_decoding = max(self._peak_decoding, num_decoding)
            chosen = self.take_decodes(self.batcher.select(ready, num_decoding, self.num_stages, cost=self.cost,
                                                           context=context))
        chunks = self._fill(len(chosen)) if self.decode_fill_tokens else []
        if not chosen and not chunks:
            return None
        if chosen:
            self._decode_steps += 1
        seqs = [self.plan(r) for r in chosen] + [self.plan(r, size) for r, size in chunks]
        batch = self.new_batch(MIXED if chosen and chunks else DECODE if chosen else PREFILL, seqs)
        batch.forward_tokens = self.plan_ahead and batch.phase == DECODE
        return batch

    def follow_up(self, batch: MicroBatch) -> MicroBatch | None:
        """The next decode step of ``batch``'s rows, planned before ``batch`` comes back
        (``plan_ahead``), so that stage 0 can start it as soon as the last stage hands over the
        tokens: the controller's turn-around leaves the path from one decode step to the next.

        Each row still decoding after ``batch`` computes the token ``batch`` samples for it (stage
        0 fills it in). A request that stops on that token (EOS, a stop criterion, an abort) is
        computed once in vain and its extra token dropped (collected before the run ends); one
        that reaches ``max_new_tokens`` with it, or has logits processors or warpers (they read
        its history, which lacks that token), or whose next KV block is not free is left out and
        planned after the result, as without ``plan_ahead``: so are sampled requests with
        temperature or top-k. Carried rows keep their blocks ahead of older requests not in
        flight (no preemption here). Decoding requests not in flight join as they would join any
        decode micro-batch. None when the switch policy asks for prefill (the slot is then
        planned after the result, as without ``plan_ahead``, prefill or, if none can form yet,
        decode) or nothing would run."""
        if self.phase is not Phase.DECODE or not batch.forward_tokens:
            return None
        decoding = self._decoding()
        if self.waiting and self.switch.should_prefill(self._decode_state(decoding)):
            return None
        running = {r.request_id: r for r in self.running}
        carried = [request for seq in batch.seqs if (request := running.get(seq.request_id)) is not None
                   and request.status is Status.DECODING and not request.cancelled
                   and not request.sampling.needs_history and len(request.output_ids) + 1 < request.max_new_tokens]
        num_decoding, context, ready = decoding
        self._peak_decoding = max(self._peak_decoding, num_decoding)
        # the batcher shares the decode work out as for any micro-batch: rows it leaves out
        # (work stealing) are planned after the result, in another micro-batch
        chosen = self.batcher.select(carried + ready, num_decoding, self.num_stages, cost=self.cost,
                                     context=context) if carried or ready else []
        ahead = {request.request_id for request in carried}
        seqs = []
        for request in chosen:
            if request.request_id not in ahead:
                continue
            blocks, need = self.kv_of(request), request.num_tokens + 1
            if not blocks.can_hold(request, need):
                continue
            blocks.reserve(request, need)
            seqs.append(self.plan(request, follows=batch.batch_id))
        seqs += [self.plan(r) for r in self.take_decodes([r for r in chosen if r.request_id not in ahead])]
        if not seqs:
            return None
        self._decode_steps += 1
        follow = self.new_batch(DECODE, seqs)
        follow.forward_tokens = True
        return follow

    def _partially_prefilled(self) -> list[Request]:
        """Admitted requests whose prompt a decode fill has started and nothing is computing now."""
        return [r for r in self.running if r.status is Status.PREFILLING and not r.in_flight]

    def _fill(self, rows: int) -> list[tuple[Request, int]]:
        """Prompt chunks for a decode micro-batch of ``rows`` rows: (request, tokens) pairs, up to
        ``decode_fill_tokens`` tokens with the rows.

        Why: a decode step reads every weight of its stage for a few rows; while the rows are
        fewer than the tokens at which the products turn compute-bound, more tokens in the same
        step cost little, so prompts computed there are nearly free, and the prefill phase they
        would have needed (with its fill and drain bubbles) comes later or not at all. Requests
        come first from prompts a fill cut short (each at least a block's worth, even past the
        budget: once admitted prompts have become decode rows, the rows alone can use it up, and a
        cut prompt holds KV for all its tokens), then from the head of the queue within the
        admission's last decision (the switch policy's when it asked, so no second simulation); an
        admitted request holds KV for its whole prompt, as in a prefill phase. Without a fresh
        decision the fill asks the admission policy itself, once a round of the pipeline. A cut
        prompt goes on in the next decode micro-batch formed while it is not in flight, or first in
        the next prefill phase."""
        budget = self.decode_fill_tokens - rows
        chunks: list[tuple[Request, int]] = []
        for request in self._partially_prefilled():
            size = min(len(request.pending_ids), max(budget, self.blocks.block_size))
            chunks.append((request, size))
            budget -= size
        if budget > 0 and not self._quota and self.waiting and self._decode_steps - self._quota_step >= self.num_stages:
            self._set_quota(self.admissible())  # at most once a round of the pipeline: a KV simulation
        while budget > 0 and self._quota and self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self.blocks.can_hold(request, request.num_tokens):
                self._quota = 0
                break
            self.waiting.popleft()
            self._quota -= 1
            self.admit(request)
            size = min(request.num_tokens - request.num_cached, budget)
            chunks.append((request, size))
            budget -= size
        return chunks
