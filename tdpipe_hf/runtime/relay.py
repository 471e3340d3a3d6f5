"""Tokens handed from the last stage to stage 0, for decode steps planned ahead of them.

With ``plan_ahead`` the controller sends a decode micro-batch's next step to stage 0 before the
step's tokens come back (rows with ``SequencePlan.follows``). Stage 0 takes the missing tokens
from a relay, which the last stage (or whatever receives its output) fills, so the controller's
turn-around is off the path from one decode step to the next: :class:`TokenRelay` between
threads of one process, :class:`PipeRelay` from the last stage's process.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from multiprocessing.connection import wait

from ..plan import MicroBatch, fill_forwarded

KEEP = 64  # batches whose tokens are kept; a follow-up is planned within a round of the pipeline


class TokenRelay:
    """Sampled tokens by batch id, put by one thread and taken (waiting if needed) by another."""

    def __init__(self, keep: int = KEEP):
        self._tokens: OrderedDict[int, dict[int, int]] = OrderedDict()
        self._keep = keep
        self._arrived = threading.Condition()

    def put(self, batch_id: int, tokens: dict[int, int]) -> None:
        with self._arrived:
            self._tokens[batch_id] = tokens
            while len(self._tokens) > self._keep:  # batches nothing followed (a phase switch)
                self._tokens.popitem(last=False)
            self._arrived.notify_all()

    def take(self, batch_id: int) -> dict[int, int]:
        """``batch_id``'s tokens, waiting until they arrive."""
        with self._arrived:
            self._arrived.wait_for(lambda: batch_id in self._tokens)
            return self._tokens[batch_id]

    def fill(self, batch: MicroBatch) -> None:
        """Stage 0, before computing ``batch``: its rows planned ahead get their tokens."""
        fill_forwarded(batch, self.take)

    def next_plan(self, plans):
        """Stage 0's next plan from the queue ``plans``, its rows planned ahead filled in."""
        batch = plans.get()
        if batch is not None:
            self.fill(batch)
        return batch


class PipeRelay(TokenRelay):
    """Stage 0's end of a pipe the last stage's process writes ``(batch_id, tokens)`` to.

    A pipe, not a ``torch.distributed`` message: the last stage writes it from its own thread
    before it computes on, where an asynchronous send would wait for a helper thread to win the
    stage's one busy core (measured on 2 cores: stage 0 then waited a median 7-9 ms for the tokens
    of a decode step against 1-5 ms for the controller's next plan). Stage 0 reads the tokens as
    they arrive, also while it waits for a plan, so messages nothing asks for (a batch whose next
    step was not planned ahead) never fill the pipe and block the last stage."""

    def __init__(self, pipe, keep: int = KEEP):
        super().__init__(keep)
        self._pipe = pipe

    def next_plan(self, plans):
        """Stage 0's next plan from the pipe ``plans`` (taking in tokens while it waits), its rows
        planned ahead filled in (waiting for their tokens if needed)."""
        while not plans.reader.poll():
            wait([plans.reader, self._pipe.reader])
            self._catch_up()
        batch = plans.get()
        if batch is not None:
            self._catch_up()
            self.fill(batch)
        return batch

    def _catch_up(self) -> None:
        try:
            while True:
                self.put(*self._pipe.get(timeout=0))
        except queue.Empty:
            pass

    def take(self, batch_id: int) -> dict[int, int]:
        """``batch_id``'s tokens, reading the pipe until they come (stage 0's one thread reads it)."""
        while batch_id not in self._tokens:
            self.put(*self._pipe.get())
        return self._tokens[batch_id]
