"""The TD-Pipe phase machine: micro-batches are all-prefill or all-decode, phases alternate.

PREFILL fills the pipeline with prefill micro-batches of newly admitted requests until admission
stops; DECODE keeps ``num_stages`` decode micro-batches circulating until the switch policy hands
back to PREFILL. Requests whose KV no longer fits are preempted (youngest first) and recomputed.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..plan import MicroBatch, SequencePlan, StepResult
from .cost import StageTimeModel
from .kv import BlockManager
from .request import Request, Status


ABORTED = "abort"  # finish_reason of a request stopped by ``Scheduler.abort``


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


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
    if request.stopping_criteria:
        ids = torch.tensor([request.history], dtype=torch.long)
        if bool(request.stopping_criteria(ids, None).any()):
            return "stop"
    return None


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
    def can_admit(self) -> bool:
        return self._can_admit if self._can_admit is not None else self.admissible > 0


class Scheduler:
    def __init__(self, blocks: BlockManager, num_stages: int, admission, batcher, switch,
                 prefill_chunk_tokens: int = 512, max_num_seqs: int = 256, prefill_packing: str = "first-fit"):
        self.blocks = blocks
        self.num_stages = num_stages
        self.admission = admission
        self.batcher = batcher
        self.switch = switch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_num_seqs = max_num_seqs
        if prefill_packing not in ("first-fit", "fcfs"):
            raise ValueError(f"prefill_packing must be 'first-fit' or 'fcfs', got {prefill_packing!r}")
        self.prefill_packing = prefill_packing
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, holding KV, oldest admission first
        self.phase = Phase.PREFILL
        self.num_preemptions = 0
        self.num_phase_switches = 0
        self._batch_ids = itertools.count()
        self._admissions = itertools.count()
        self._peak_decoding = 0
        self._decode_steps = 0
        self.cost = StageTimeModel()

    # ---- requests -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Retire a running request: its KV is freed and, unless it was aborted, its length
        teaches the admission policy."""
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.blocks.release(request)
        self.running.remove(request)
        observe = getattr(self.admission, "observe", None)
        if observe is not None and reason != ABORTED:
            observe(request)
        self._left_decode(request)

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
        requests = {r.request_id: r for r in self.running}
        for seq in batch.seqs:
            request = requests[seq.request_id]
            request.in_flight = False
            if request.cancelled:
                self.finish(request, ABORTED)
                output.finished.append(request)
                continue
            request.num_cached = seq.context_len
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

    def _left_decode(self, request: Request) -> None:
        forget = getattr(self.batcher, "forget", None)
        if forget is not None:
            forget(request)

    def observe_step(self, batch: MicroBatch, seconds: float) -> None:
        """The slowest stage's busy time for ``batch``: feeds the stage-time model."""
        self.cost.observe(batch.phase, len(batch.seqs), batch.num_tokens,
                          sum(seq.context_len for seq in batch.seqs), seconds)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- micro-batch formation ------------------------------------------------------------
    def schedule(self) -> MicroBatch | None:
        """The next micro-batch to dispatch, or None if nothing can run before a result returns."""
        if self.phase is Phase.PREFILL:
            batch = self._prefill_batch()
            if batch is not None:
                return batch
            self._enter(Phase.DECODE)
        elif self.waiting and self.switch.should_prefill(self._decode_state()):
            batch = self._prefill_batch()
            if batch is not None:
                self._enter(Phase.PREFILL)
                return batch
        return self._decode_batch()

    def _enter(self, phase: Phase) -> None:
        if phase is not self.phase:
            self.phase = phase
            self.num_phase_switches += 1
        if phase is Phase.DECODE:
            self._peak_decoding = 0
            self._decode_steps = 0

    def _decode_state(self) -> DecodeState:
        decoding = [r for r in self.running if r.status is Status.DECODING]

        def admission() -> tuple[int, int]:
            count = self._admissible()
            return count, sum(self.waiting[i].num_tokens for i in range(count))

        return DecodeState(
            num_stages=self.num_stages,
            num_decoding=len(decoding),
            peak_decoding=self._peak_decoding,
            num_waiting=len(self.waiting),
            decode_steps=self._decode_steps,
            decode_context=sum(r.num_tokens for r in decoding),
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            cost=self.cost,
            admission=admission,
        )

    def _admissible(self) -> int:
        return self.admission.admit(self.waiting, self.running, self.blocks, self.max_num_seqs)

    def _prefill_batch(self) -> MicroBatch | None:
        """Up to ``prefill_chunk_tokens`` of admitted requests. ``prefill_packing="first-fit"``
        fills the room the queue's head leaves with later admitted requests that fit, so
        micro-batches come out even (in a pipeline the longest one stalls the stages behind it);
        "fcfs" stops at the first request that does not fit (vLLM's rule). Either way the batch
        holds only requests this phase admits."""
        count = self._admissible()
        picked, tokens = [], 0
        for i in range(count):
            size = self.waiting[i].num_tokens
            if not picked or tokens + size <= self.prefill_chunk_tokens:
                picked.append(i)
                tokens += size
            elif self.prefill_packing == "fcfs" or tokens >= self.prefill_chunk_tokens:
                break
        chosen = [self.waiting[i] for i in picked]
        for i in reversed(picked):
            del self.waiting[i]
        seqs = []
        for request in chosen:
            self.blocks.reserve(request, request.num_tokens)
            request.status = Status.PREFILLING
            request.admitted_at = next(self._admissions)
            self.running.append(request)
            seqs.append(self._plan(request))
        return MicroBatch(next(self._batch_ids), Phase.PREFILL.value, seqs) if seqs else None

    def _decode_batch(self) -> MicroBatch | None:
        ready = [r for r in self.running if r.status is Status.DECODING and not r.in_flight]
        if not ready:
            return None
        decoding = [r for r in self.running if r.status is Status.DECODING]
        num_decoding = len(decoding)
        self._peak_decoding = max(self._peak_decoding, num_decoding)
        chosen: list[Request] = []
        context = sum(r.num_tokens for r in decoding)
        for request in self.batcher.select(ready, num_decoding, self.num_stages, cost=self.cost, context=context):
            if request.status is not Status.DECODING:
                continue  # preempted to make room for an older request in this loop
            if not self._make_room(request, chosen):
                break
            if request.status is Status.DECODING:
                self.blocks.reserve(request, request.num_tokens)
                chosen.append(request)
        if not chosen:
            return None
        self._decode_steps += 1
        return MicroBatch(next(self._batch_ids), Phase.DECODE.value, [self._plan(r) for r in chosen])

    def _make_room(self, request: Request, chosen: list[Request], num_tokens: int | None = None) -> bool:
        """Free blocks for ``request``'s next token (or ``num_tokens``) by preempting younger requests.

        Victims are the youngest requests not in flight. If a younger request is in flight, wait
        for it to come back rather than preempt an older one; if ``request`` is the youngest of
        all, it preempts itself. Returns False when the batch should stop growing for now.
        """
        need = request.num_tokens if num_tokens is None else num_tokens
        while not self.blocks.can_hold(request, need):
            younger = [r for r in self.running if r.admitted_at > request.admitted_at]
            idle = [r for r in younger if not r.in_flight]
            if idle:
                victim = max(idle, key=lambda r: r.admitted_at)
                if victim in chosen:
                    chosen.remove(victim)
                self._preempt(victim)
            elif younger:
                return False
            else:
                self._preempt(request)
                return True
        return True

    def _preempt(self, request: Request) -> None:
        self.blocks.release(request)
        self.running.remove(request)
        request.num_cached = 0
        request.num_preemptions += 1
        request.status = Status.PREEMPTED
        self._left_decode(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _plan(self, request: Request, max_tokens: int | None = None) -> SequencePlan:
        """Compute ``request``'s pending tokens, or only the first ``max_tokens`` of them (a
        prefill chunk, which samples nothing unless it reaches the end)."""
        request.in_flight = True
        pending = request.pending_ids
        chunk = pending if max_tokens is None else pending[:max_tokens]
        return SequencePlan(
            request_id=request.request_id,
            token_ids=chunk,
            start=request.num_cached,
            sample=len(chunk) == len(pending),
            block_table=list(request.block_table),
            sampling=request.sampling,
            history=request.history if request.sampling.needs_history else None,
        )
