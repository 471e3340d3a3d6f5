"""What every scheduler shares: request bookkeeping, applying results, KV room and preemption.

A scheduler is the only writer of request state. Subclasses decide *what* runs next
(``schedule``) from these public parts:

- ``admissible()``: how many waiting requests the admission policy lets in now;
- ``admit(request, tokens)``: a request leaves the queue, takes its cached prefix and gets KV for ``tokens`` more;
- ``take_decodes(candidates)``: reserve the next token's KV for as many candidates as fit,
  preempting younger requests where needed (``make_room``, ``preempt``);
- ``plan(request, max_tokens)`` and ``new_batch(phase, plans)``: write the micro-batch;
- ``on_leave(request)``: a hook called whenever a request stops decoding (finished or preempted).

``update_from_output`` applies a returned micro-batch: tokens appended, stops decided, finished
requests retired. Preemption is recompute: a victim's KV is freed and it waits at the head of the
queue to be prefilled again (prompt plus what it generated so far).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from ..plan import MicroBatch, SequencePlan, StepResult
from ..protocols import PlansWithStageTimes
from .cost import StageTimeModel
from .kv import BlockManager
from .request import Request, Status

ABORTED = "abort"  # finish_reason of a request stopped by ``abort``
# micro-batch ids, unique in the process across runs and schedulers: a step planned ahead finds
# its tokens by the id of the batch it follows, in relays that outlive a run
_BATCH_IDS = itertools.count()
AHEAD_PLACEHOLDER = -1  # a token id no embedding has: an unfilled row planned ahead cannot pass for a real token


@dataclass
class StepOutput:
    """What applying one result produced, for the controller to report: tokens in plan order,
    then the requests that finished (an aborted request appears only here)."""

    tokens: list[tuple[Request, int]] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


def stop_reason(request: Request, token: int) -> str | None:
    """Why ``request`` stops after sampling ``token`` ("stop" or "length"), or None."""
    if token in request.eos_token_ids:
        return "stop"
    if len(request.output_ids) >= request.max_new_tokens:
        return "length"
    if request.stopping_criteria is not None and request.stopping_criteria.should_stop(request):
        return "stop"
    return None


class BaseScheduler:
    """Request state and KV accounting over ``blocks`` for ``num_stages`` micro-batches in flight.
    ``admission`` is an ``AdmissionPolicy``; ``max_num_seqs`` caps the running requests."""

    num_phase_switches = 0  # schedulers with phases count their switches

    def __init__(self, blocks: BlockManager, num_stages: int, admission, prefill_chunk_tokens: int = 512,
                 max_num_seqs: int = 256):
        self.blocks = blocks
        self.num_stages = num_stages
        self.admission = admission
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, holding KV, oldest admission first
        self.num_preemptions = 0
        self.cost = StageTimeModel()
        if isinstance(admission, PlansWithStageTimes):
            admission.use_stage_times(self.cost, num_stages, prefill_chunk_tokens)
        self._admissions = itertools.count()

    def schedule(self) -> MicroBatch | None:
        """The next micro-batch to dispatch, or None if nothing can run before a result returns."""
        raise NotImplementedError

    # ---- requests -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def max_request_tokens(self) -> int:
        """The most KV tokens one request can ever hold here (its pool's size)."""
        return self.blocks.num_blocks * self.blocks.block_size

    def finish(self, request: Request, reason: str) -> None:
        """Retire a running request: its KV is freed and, unless it was aborted, its length
        teaches the admission policy."""
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.kv_of(request).release(request)
        self.running.remove(request)
        if reason != ABORTED:
            self.admission.observe(request)
        self.on_leave(request)

    def abort(self, request_id: int) -> Request | None:
        """Stop ``request_id`` wherever it is. A waiting or idle request is retired now and
        returned; one whose micro-batch is in the pipeline is marked and retired when that result
        comes back (its KV blocks are being written until then), so None is returned for it, as
        for an unknown or finished id."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.status = Status.FINISHED
                request.finish_reason = ABORTED
                return request
        for request in self.running:
            if request.request_id == request_id:
                if request.in_flight:
                    request.cancelled = True
                    return None
                self.finish(request, ABORTED)
                return request
        return None

    def update_from_output(self, batch: MicroBatch, result: StepResult) -> StepOutput:
        """Apply one micro-batch's result: the only place a step's outcome changes request state.
        Sampled tokens are appended, stop conditions decided and finished requests retired."""
        output = StepOutput()
        if result.states:  # prefill ended for these: a length probe refines their predictions first
            self.admission.refine(result.states)  # only a policy with probe_layer asks for states
        requests = {r.request_id: r for r in self.running}
        for seq in batch.seqs:
            if seq.follows is not None and seq.request_id not in requests:
                continue  # planned ahead, but the step before was its last: its token is void
            request = requests[seq.request_id]
            request.in_flight -= 1
            if request.cancelled:
                self.finish(request, ABORTED)
                output.finished.append(request)
                continue
            request.num_cached = seq.context_len
            self.kv_of(request).cache_computed_blocks(request)
            if not seq.sample:
                continue
            token = result.tokens[seq.request_id]
            request.output_ids.append(token)
            request.status = Status.DECODING
            output.tokens.append((request, token))
            reason = stop_reason(request, token)
            if reason is not None:
                self.finish(request, reason)
                output.finished.append(request)
        return output

    def observe_step(self, batch: MicroBatch, seconds: float) -> None:
        """The slowest stage's busy time for ``batch``: feeds the stage-time model."""
        self.cost.observe(batch.phase, len(batch.seqs), batch.num_tokens, batch.context_tokens, seconds)

    def on_leave(self, request: Request) -> None:
        """``request`` stopped decoding (finished or preempted). Subclasses drop what they keep on it."""

    def kv_of(self, request: Request) -> BlockManager:
        """The block pool ``request`` draws from (one for all, unless a subclass splits the cache)."""
        return self.blocks

    def kv_peers(self, request: Request) -> list[Request]:
        """The running requests that share ``request``'s pool: the candidates to preempt for it."""
        return self.running

    @property
    def probe_layer(self) -> int | None:
        """The layer whose hidden state a request's last prompt token sends back (for an admission
        policy with a length probe; see ``GreedyPrefill.use_probe``), or None."""
        return getattr(self.admission, "probe_layer", None)

    # ---- parts for ``schedule`` -----------------------------------------------------------
    def admissible(self) -> int:
        """How many requests at the head of ``waiting`` the admission policy admits now."""
        return self.admission.admit(self.waiting, self.running, self.blocks, self.max_num_seqs)

    def admit(self, request: Request, num_tokens: int | None = None) -> None:
        """``request`` (already taken off ``waiting``) starts prefilling: it takes the blocks the
        prefix cache holds of its sequence, and KV for its first ``num_tokens`` tokens still to
        compute (all of them by default)."""
        blocks = self.kv_of(request)
        blocks.take_cached_prefix(request)
        pending = request.num_tokens - request.num_cached
        blocks.reserve(request, request.num_cached + (pending if num_tokens is None else min(num_tokens, pending)))
        request.status = Status.PREFILLING
        request.admitted_at = next(self._admissions)
        self.running.append(request)

    def take_decodes(self, candidates: list[Request]) -> list[Request]:
        """Reserve the next token's KV for ``candidates`` in order, while room can be made; the
        ones that got it. A candidate preempted on the way (to make room for an older one) drops out."""
        chosen: list[Request] = []
        for request in candidates:
            if request.status is not Status.DECODING:
                continue  # preempted to make room for an older request in this loop
            blocks, need = self.kv_of(request), request.num_tokens
            if not blocks.can_hold(request, need) and not self.make_room(request, chosen):
                break
            if request.status is Status.DECODING:
                blocks.reserve(request, need)
                chosen.append(request)
        return chosen

    def make_room(self, request: Request, chosen: list[Request], num_tokens: int | None = None) -> bool:
        """Free blocks for ``request``'s next token (or ``num_tokens``) by preempting younger requests.

        Victims are the youngest requests not in flight (removed from ``chosen`` if there). If a
        younger request is in flight, wait for it to come back rather than preempt an older one;
        if ``request`` is the youngest of all, it preempts itself. Returns False when the batch
        should stop growing for now.
        """
        need = request.num_tokens if num_tokens is None else num_tokens
        blocks = self.kv_of(request)
        while not blocks.can_hold(request, need):
            younger = [r for r in self.kv_peers(request) if r.admitted_at > request.admitted_at]
            idle = [r for r in younger if not r.in_flight]
            if idle:
                victim = max(idle, key=lambda r: r.admitted_at)
                if victim in chosen:
                    chosen.remove(victim)
                self.preempt(victim)
            elif younger:
                return False
            else:
                self.preempt(request)
                return True
        return True

    def preempt(self, request: Request) -> None:
        """Free ``request``'s KV and put it back at the head of the queue, to be recomputed."""
        self.kv_of(request).release(request)
        self.running.remove(request)
        request.num_cached = 0
        request.num_preemptions += 1
        request.status = Status.PREEMPTED
        self.on_leave(request)
        self.requeue(request)
        self.num_preemptions += 1

    def requeue(self, request: Request) -> None:
        """A preempted request waits again, first in line."""
        self.waiting.appendleft(request)

    def plan(self, request: Request, max_tokens: int | None = None, follows: int | None = None) -> SequencePlan:
        """Compute ``request``'s pending tokens, or only the first ``max_tokens`` of them (a
        prefill chunk, which samples nothing unless it reaches the end). With ``follows`` (a
        decode step planned ahead): the token that batch is sampling for it, which stage 0 fills
        in, at the position after its tokens so far."""
        request.in_flight += 1
        if follows is not None:
            return SequencePlan(request.request_id, [AHEAD_PLACEHOLDER], start=request.num_tokens,
                                block_table=list(request.block_table), sampling=request.sampling, follows=follows)
        pending = request.pending_ids
        chunk = pending if max_tokens is None else pending[:max_tokens]
        sample = len(chunk) == len(pending)
        return SequencePlan(
            request_id=request.request_id,
            token_ids=chunk,
            start=request.num_cached,
            sample=sample,
            block_table=list(request.block_table),
            sampling=request.sampling,
            history=request.history if request.sampling.needs_history else None,
            # the prompt's last token, the first time through: what a length probe reads
            probe=sample and not request.output_ids and self.probe_layer is not None,
        )

    def new_batch(self, phase: str, seqs: list[SequencePlan]) -> MicroBatch:
        probing = self.probe_layer is not None and any(seq.probe for seq in seqs)
        return MicroBatch(next(_BATCH_IDS), phase, seqs, probe_layer=self.probe_layer if probing else None)
