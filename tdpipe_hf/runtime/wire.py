"""The stage worker and its wire protocol: how a micro-batch travels between stage processes.

Between stages each micro-batch travels as three point-to-point ``torch.distributed`` messages
(a header ``[byte count, *hidden shape]``; the pickled plan with its timeline so far and the
vectors a length probe asked for, if any; the hidden states), so every stage knows what it
computes without asking the controller. Sends are
asynchronous: a stage starts its next micro-batch while the previous one is on its way
downstream. A header whose count is ``SHUTDOWN`` ends the stream. The spawn and torchrun
executors both run this worker.
"""

from __future__ import annotations

import pickle
import time

import torch
import torch.distributed as dist

from ..plan import StepResult
from .attention import DEFAULT_BACKEND
from .attention import backend as attention_backend
from .attention import register as register_attention
from .placement import wire_device
from .sampler import sample_batch
from .stage import Probe, Stage, StageSetup

SHUTDOWN = -1


def prepare_stage(stage: Stage, setup: StageSetup, threads: int, device: torch.device) -> None:
    """Everything a stage process does before serving, in either launch mode."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    register_attention(setup.attention)
    setup.apply(stage, device)


def isend_object(obj, dst: int, shape=(0, 0)) -> list[tuple]:
    """Send ``obj`` pickled, after a header ``[byte count, *shape]`` (``shape``: the hidden
    states that follow, if any); returns the (work, tensor) pairs to wait on."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    header = torch.tensor([data.numel(), *shape], dtype=torch.long)
    return [(dist.isend(tensor, dst=dst), tensor) for tensor in (header, data)]


def recv_header(src: int) -> torch.Tensor | None:
    """The next message's header from ``src``, or None when ``src`` is shutting down."""
    header = torch.empty(3, dtype=torch.long)
    dist.recv(header, src=src)
    return None if header[0] == SHUTDOWN else header


def recv_object(header: torch.Tensor, src: int):
    data = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.recv(data, src=src)
    return pickle.loads(data.numpy().tobytes())


class StageWorker:
    """Runs one stage: micro-batches in (from ``plans`` on stage 0, from the previous rank
    otherwise), hidden states out to the next rank, or a StepResult to ``deliver`` on the last."""

    def __init__(self, rank, world, stage, block_size, backend, plans, deliver, on_shutdown=None,
                 attention: str = DEFAULT_BACKEND):
        """``backend``: the process group's (gloo/nccl); ``attention``: the attention backend's name."""
        self.attention = attention_backend(attention)
        self.rank = rank
        self.world = world
        self.stage = stage
        self.block_size = block_size
        self.plans = plans
        self.deliver = deliver
        self.on_shutdown = on_shutdown
        self.is_last = rank == world - 1
        self.device = stage.device
        self.wire = wire_device(backend, self.device)  # where hidden states travel from
        self._pending: list = []  # isend handles (and the tensors they read) still in flight
        # plan_ahead: where stage 0 finds forwarded tokens (a relay's ``next_plan``), and how the last
        # stage hands them over (``forward(batch_id, tokens)``); see runtime/relay.py
        self.relay = None
        self.forward = None

    def loop(self) -> None:
        if self.device.type == "cuda":  # per thread: rank 0's stage runs on a thread of its own
            torch.cuda.set_device(self.device)
        while True:
            t0 = time.perf_counter()
            batch, events, hidden, states = self._receive()
            t1 = time.perf_counter()
            if batch is None:
                if not self.is_last:
                    self._send_shutdown()
                elif self.on_shutdown is not None:
                    self.on_shutdown()
                self._drain()
                return
            events.append((self.rank, "recv", batch.batch_id, batch.phase, t0, t1))
            ctx = self.attention.build(batch, self.block_size, self.device)
            probe = Probe.of(batch, states)
            out = self.stage.forward(hidden, ctx, probe)
            states = probe.states if probe else {}
            t2 = time.perf_counter()
            events.append((self.rank, "compute", batch.batch_id, batch.phase, t1, t2))
            if self.is_last:
                tokens = sample_batch(out, batch)
                if batch.forward_tokens and self.forward is not None:
                    self.forward(batch.batch_id, tokens)  # first: stage 0 may be waiting for them
                events.append((self.rank, "sample", batch.batch_id, batch.phase, t2, time.perf_counter()))
                self.deliver(StepResult(batch.batch_id, tokens, events, states))
            else:
                self._send(batch, events, out, states)

    def _receive(self):
        if self.rank == 0:  # with a relay, a step planned ahead waits for its tokens here
            batch = self.relay.next_plan(self.plans) if self.relay is not None else self.plans.get()
            return batch, [], None, {}
        header = recv_header(self.rank - 1)
        if header is None:
            return None, None, None, None
        batch, events, dtype, states = recv_object(header, self.rank - 1)
        hidden = torch.empty((1, int(header[1]), int(header[2])), dtype=dtype, device=self.wire)
        dist.recv(hidden, src=self.rank - 1)
        return batch, events, hidden.to(self.device), states

    def _send(self, batch, events, hidden, states) -> None:
        t0 = time.perf_counter()
        self._drain()  # the previous micro-batch must have left before this one goes
        events = events + [(self.rank, "send", batch.batch_id, batch.phase, t0, time.perf_counter())]
        hidden = hidden.contiguous().to(self.wire)  # NCCL sends GPU tensors; gloo, host copies
        self._pending += isend_object((batch, events, hidden.dtype, states), self.rank + 1, hidden.shape[1:])
        self._pending.append((dist.isend(hidden, dst=self.rank + 1), hidden))

    def _send_shutdown(self, dst: int | None = None) -> None:
        """Tell ``dst`` (default: the next rank) that no more micro-batches follow."""
        self._drain()
        dist.send(torch.tensor([SHUTDOWN, 0, 0], dtype=torch.long), dst=self.rank + 1 if dst is None else dst)

    def _drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def send_result(self, result: StepResult) -> None:
        """Last stage under torchrun: the result goes back to rank 0, where the controller runs."""
        self._drain()
        self._pending += isend_object(result, 0)

    def send_result_shutdown(self) -> None:
        self._send_shutdown(dst=0)
