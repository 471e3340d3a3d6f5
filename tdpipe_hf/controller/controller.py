"""The hierarchy controller's loop: decide, dispatch, absorb results. Stages only execute.

The controller keeps up to ``num_stages`` micro-batches in flight and forms the next one as soon
as a slot frees, so a stage never waits on a decision; with ``plan_ahead`` one more, a decode
step planned before the result it follows. It sees token ids only; which executor runs
the micro-batches (in-process or one process per stage) is invisible to it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ..metrics import BUSY
from ..plan import MicroBatch, StepResult
from .request import Request
from .scheduler import Scheduler

# executor -> (the token of the controller whose micro-batches last wrote its KV, the executor's
# ``kv_epoch`` then: an executor counts up when it drops its KV caches, as on close) (``_claim_kv``)
_KV_WRITERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class RunStats:
    micro_batches: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    generated_tokens: int = 0
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    phase_switches: int = 0
    timeline: list[tuple] = field(default_factory=list)  # executors' (stage, kind, batch, phase, start, end)
    kv_blocks: int = 0
    kv_used: list[tuple[float, int]] = field(default_factory=list)  # (time, blocks in use) at each dispatch
    decode_batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, context tokens) per decode batch


class Controller:
    def __init__(self, executor, scheduler: Scheduler,
                 on_token: Callable[[Request, int], None] | None = None,
                 on_finish: Callable[[Request], None] | None = None, max_in_flight: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        """``clock`` timestamps the KV-use samples; a simulated executor passes its virtual clock."""
        self.executor = executor
        self.clock = clock
        self.max_in_flight = max_in_flight or executor.num_stages
        self.scheduler = scheduler
        self.on_token = on_token
        self.on_finish = on_finish
        self.stats = RunStats(kv_blocks=scheduler.blocks.num_blocks)
        self._in_flight: dict[int, MicroBatch] = {}  # in dispatch order
        # plan decode steps ahead of their results where the scheduler offers it and the executor
        # hands tokens from the last stage to stage 0 (see ``_follow_up``)
        self.plan_ahead = bool(getattr(scheduler, "plan_ahead", False) and getattr(executor, "relays_tokens", False))
        self._followed: set[int] = set()  # in-flight batches whose next step is planned (or declined)
        self._ahead: set[int] = set()  # in-flight batches whose next step is in flight too
        self._kv_token = object()  # marks the executor's KV as last written by this controller

    def run(self, requests: Iterable[Request], lookahead: int | None = None) -> RunStats:
        """Drive ``requests`` to completion. On an executor error nothing is half-applied: the
        error propagates and every request keeps its tokens so far.

        ``requests`` may be a lazy iterable: with ``lookahead``, only that many requests wait in
        the scheduler at a time and more are drawn as they are admitted, so memory stays bounded
        however long the stream is."""
        source = iter(requests)
        try:
            exhausted = self._refill(source, lookahead)
            while self.has_work:
                self.step()
                if not exhausted:
                    exhausted = self._refill(source, lookahead)
        except BaseException:  # Ctrl-C, a callback's or a stage's error: leave the executor clean
            self.drain()
            raise
        return self.finish_stats()

    def drain(self) -> None:
        """Collect and drop what is still in the pipeline, so that the next run on this executor
        does not receive an interrupted run's results. If that fails too (the executor broke, or
        a second Ctrl-C), close the executor: it starts afresh on the next submit."""
        try:
            while self._in_flight:
                self._in_flight.pop(self.executor.collect().batch_id, None)
        except BaseException:
            self._in_flight.clear()
            self.executor.close()
        finally:
            self._ahead.clear()
            self._followed.clear()

    def add(self, request: Request) -> None:
        """Queue ``request``; it is planned from the next step on."""
        self.scheduler.add(request)

    def abort(self, request_id: int) -> None:
        """Stop a request. ``on_finish`` reports it (finish_reason "abort") now, or when its
        micro-batch in the pipeline comes back; an unknown or finished id is ignored."""
        request = self.scheduler.abort(request_id)
        if request is not None and self.on_finish is not None:
            self.on_finish(request)

    @property
    def has_work(self) -> bool:
        """Requests to serve, or micro-batches still in the pipeline (a step planned ahead can
        outlive its request: it is collected before the run ends, so no later run receives it)."""
        return self.scheduler.has_work or bool(self._in_flight)

    def step(self) -> None:
        """Fill the pipeline, then absorb the next micro-batch that comes back. A server calls
        this in its own loop, adding requests to the scheduler between steps."""
        self._dispatch()
        if not self._in_flight:
            stuck = [r.request_id for r in self.scheduler.waiting]
            raise RuntimeError(f"scheduler cannot make progress: requests {stuck[:10]} cannot be admitted")
        self._absorb(self.executor.collect())

    def finish_stats(self) -> RunStats:
        self.stats.kv_used.append((self.clock(), self.scheduler.blocks.num_used))
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.cached_tokens = getattr(self.scheduler.blocks, "cached_tokens", 0)  # a plugin's pool may not cache
        self.stats.phase_switches = self.scheduler.num_phase_switches
        return self.stats

    def _refill(self, source: Iterator[Request], lookahead: int | None) -> bool:
        """Move requests from ``source`` into the scheduler; True once ``source`` is exhausted."""
        while lookahead is None or len(self.scheduler.waiting) < lookahead:
            request = next(source, None)
            if request is None:
                return True
            self.scheduler.add(request)
        return False

    def _dispatch(self) -> None:
        self._claim_kv()
        while len(self._in_flight) - len(self._ahead) < self.max_in_flight:
            batch = self.scheduler.schedule()
            if batch is None:
                break
            self._submit(batch)
        if self.plan_ahead and not self._ahead:
            self._follow_up()

    def _follow_up(self) -> None:
        """Plan the oldest unfollowed decode batch's next step and send it now: stage 0 queues it
        behind the batches in flight and starts it as soon as the last stage hands over the
        tokens it waits for, without waiting for this loop to absorb the result and plan. It
        takes its predecessor's slot; one such plan at a time, so each is a round of the pipeline
        ahead and never waits on a batch queued behind it."""
        for batch in self._in_flight.values():
            if batch.forward_tokens and batch.batch_id not in self._followed:
                self._followed.add(batch.batch_id)
                follow = self.scheduler.follow_up(batch)
                if follow is not None:
                    self._ahead.add(batch.batch_id)
                    self._submit(follow)
                    return

    def _claim_kv(self) -> None:
        """Before scheduling: the prefix cache trusts the KV this controller's micro-batches wrote,
        but another controller on the same executor (``model.generate`` on a model a ``Server``
        also runs) writes the same cache blocks, and an executor that closed (a failure, or
        ``engine.close()``) restarts with empty caches: after either the index is dropped."""
        mark = (self._kv_token, getattr(self.executor, "kv_epoch", 0))  # the epoch moves when its KV is dropped
        try:
            last = _KV_WRITERS.get(self.executor)
            _KV_WRITERS[self.executor] = mark
        except TypeError:  # an executor no weak reference can name: no cached block can be trusted
            last = None
        if last != mark:
            forget = getattr(self.scheduler.blocks, "forget_cached", None)
            if forget is not None:
                forget()

    def _submit(self, batch: MicroBatch) -> None:
        self._in_flight[batch.batch_id] = batch
        self.stats.kv_used.append((self.clock(), self.scheduler.blocks.num_used))
        self.stats.micro_batches[batch.phase] = self.stats.micro_batches.get(batch.phase, 0) + 1
        if batch.phase == "decode":
            self.stats.decode_batches.append((len(batch.seqs), batch.context_tokens))
        self.executor.submit(batch)

    def _absorb(self, result: StepResult) -> None:
        """Hand a returned result to the scheduler (which alone changes request state) and
        report what it produced."""
        batch = self._in_flight.pop(result.batch_id)
        self._followed.discard(batch.batch_id)
        self._ahead.discard(batch.batch_id)
        self.stats.timeline.extend(result.events)
        busy: dict[int, float] = {}
        for stage, kind, _, _, start, end in result.events:
            if kind in BUSY:
                busy[stage] = busy.get(stage, 0.0) + end - start
        if busy:
            self.scheduler.observe_step(batch, max(busy.values()))
        output = self.scheduler.update_from_output(batch, result)
        self.stats.generated_tokens += len(output.tokens)
        if self.on_token is not None:
            for request, token in output.tokens:
                self.on_token(request, token)
        if self.on_finish is not None:
            for request in output.finished:
                self.on_finish(request)
