"""A simulated executor: the executor interface (num_stages, submit, collect, close) on a
virtual clock, with stage times from a cost function instead of a model.

A micro-batch submitted at virtual time t (when the controller last collected) enters stage 0
at max(t, stage 0 free); stage s+1 starts at max(stage s end + transfer, stage s+1 free). Stages
are FIFO, so batches finish in submit order and ``collect`` returns the oldest one, moving the
clock to its finish. There is no model: each request has a predetermined output length and the
"sampled" token is EOS when the request reaches it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..plan import MicroBatch, StepResult
from .cost import SeqShape

EOS = 2
NOT_EOS = 3

StageTimes = Callable[[list[SeqShape]], list[float]]


class SimExecutor:
    """``stage_times(seqs)`` gives each stage's compute seconds for a micro-batch;
    ``transfer(tokens)`` the seconds to pass its activations to the next stage;
    ``dispatch_overhead`` fixed seconds added before every micro-batch enters stage 0;
    ``stage_host`` seconds of host work each stage does before computing each micro-batch (building
    its inputs), serial with its own compute: it starts once the stage is free and the micro-batch
    is submitted, so it hides behind the wait for upstream activations but not behind the stage's
    previous micro-batch (vLLM v0's workers; 0 for an engine that prepares ahead). It shows in the
    timeline as ``host`` events, idle time for the device.

    With ``measure_host``, the real scheduler's own work is on the critical path too: the wall
    seconds the controller spends between getting a result and submitting (absorbing the result,
    planning the next micro-batch) move the virtual clock, as the one host thread of a real
    engine would (read from ``wall_clock``). What this executor itself computes is not counted.

    A step planned ahead (``plan_ahead``: rows that follow another batch) enters stage 0 once the
    batches it follows have left the last stage, as the real executors hand tokens over: its
    planning happened while they were in the pipeline, off the critical path. The hand-over itself
    is taken as instant (a host's wake-up latency, up to milliseconds on a busy CPU, is not
    modelled), so the simulated gain is an upper bound."""

    relays_tokens = True

    def __init__(self, num_stages: int, stage_times: StageTimes, transfer: Callable[[int], float] | None = None,
                 dispatch_overhead: float = 0.0, measure_host: bool = False,
                 wall_clock: Callable[[], float] = time.perf_counter, stage_host: float = 0.0):
        if stage_host < 0:
            raise ValueError(f"stage_host must be >= 0 seconds, got {stage_host}")
        self.num_stages = num_stages
        self.stage_times = stage_times
        self.transfer = transfer or (lambda tokens: 0.0)
        self.dispatch_overhead = dispatch_overhead
        self.measure_host = measure_host
        self.stage_host = stage_host
        self.wall_clock = wall_clock
        self.host_seconds = 0.0  # the controller's measured work, in total
        self._host_mark: float | None = None  # wall clock when control last went back to it
        self.now = 0.0
        self._free = [0.0] * num_stages
        self._queue: deque[tuple[float, StepResult]] = deque()
        self._targets: dict[int, tuple[int, int]] = {}  # request_id -> (prompt tokens, output tokens)
        self._left: dict[int, float] = {}  # in-flight forward_tokens batch -> when it leaves the last stage

    def expect(self, request_id: int, prompt_len: int, output_len: int) -> None:
        """Request ``request_id`` will stop (EOS) after ``output_len`` generated tokens."""
        if output_len < 1:
            raise ValueError(f"request {request_id}: output length must be >= 1, got {output_len}")
        self._targets[request_id] = (prompt_len, output_len)

    def clock(self) -> float:
        return self.now

    def submit(self, batch: MicroBatch) -> None:
        self._charge_host()
        seqs = [SeqShape(len(s.token_ids), s.context_len, s.sample) for s in batch.seqs]
        times = self.stage_times(seqs)
        if len(times) != self.num_stages:
            raise ValueError(f"stage_times gave {len(times)} times for {self.num_stages} stages")
        tokens = batch.num_tokens
        submitted = ready = self.now + self.dispatch_overhead
        for seq in batch.seqs:  # a step planned ahead waits for the tokens it computes
            if seq.follows is not None:
                ready = max(ready, self._left[seq.follows])
        events = []
        for stage, seconds in enumerate(times):
            start = max(ready, self._free[stage])
            if self.stage_host > 0:
                host_start = max(submitted, self._free[stage])
                start = max(start, host_start + self.stage_host)
                events.append((stage, "host", batch.batch_id, batch.phase, host_start, host_start + self.stage_host))
            end = start + seconds
            self._free[stage] = end
            events.append((stage, "compute", batch.batch_id, batch.phase, start, end))
            if stage + 1 < self.num_stages:
                ready = end + self.transfer(tokens)
                events.append((stage, "send", batch.batch_id, batch.phase, end, ready))
            else:
                ready = end
        result = StepResult(batch.batch_id, self._tokens(batch), events)
        self._queue.append((ready, result))
        if batch.forward_tokens:
            self._left[batch.batch_id] = ready
        self._host_mark = self.wall_clock()

    def _tokens(self, batch: MicroBatch) -> dict[int, int]:
        tokens = {}
        for seq in batch.seqs:
            if not seq.sample:
                continue
            prompt_len, output_len = self._targets[seq.request_id]
            generated = seq.context_len - prompt_len + 1  # outputs so far, this one included
            tokens[seq.request_id] = EOS if generated >= output_len else NOT_EOS
        return tokens

    def collect(self) -> StepResult:
        if not self._queue:
            raise RuntimeError("collect() called with no micro-batch in flight")
        self._charge_host()
        finish, result = self._queue.popleft()
        self._left.pop(result.batch_id, None)  # a step planned ahead of it was submitted before
        self.now = max(self.now, finish)
        self._host_mark = self.wall_clock()
        return result

    def _charge_host(self) -> None:
        """Move the clock by the controller's wall time since control last came back to it."""
        if self.measure_host and self._host_mark is not None:
            spent = self.wall_clock() - self._host_mark
            self.host_seconds += spent
            self.now += spent

    def close(self) -> None:
        self._queue.clear()
        self._left.clear()
