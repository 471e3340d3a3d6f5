"""The torchrun / accelerate-launch executor: the launched ranks are the stages, rank 0 also
hosts the controller. Ranks may sit on several machines; they speak ``wire.py``'s protocol."""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from ..plan import MicroBatch, StepResult
from .local import StageError
from .placement import GLOO, GLOO_AND_NCCL, activation_backend
from .relay import TokenRelay
from .stage import Stage, StageSetup
from .wire import StageWorker, prepare_stage, recv_header, recv_object


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def start_torchrun(num_stages: int, threads_per_stage: int | None = None) -> int:
    """Join the ``torchrun``/``accelerate launch`` job's process group (every rank calls this);
    returns the torch threads this rank's stage gets."""
    world = int(os.environ["WORLD_SIZE"])
    if world != num_stages:
        raise ValueError(f"launched with {world} processes but num_stages={num_stages}; they must be equal")
    if not dist.is_initialized():  # NCCL starts only if GPU activations are sent (see join_torchrun_pipeline)
        dist.init_process_group(GLOO_AND_NCCL if torch.cuda.is_available() else GLOO, timeout=timedelta(minutes=30))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return threads_per_stage or max(1, (os.cpu_count() or 1) // local_world)


def torchrun_places(device: torch.device, free_bytes: int) -> list[tuple[str, torch.device, int]]:
    """(host, stage device, its free memory) of every rank, given this rank's (every rank calls
    this; each measures only its own device: asking another rank's GPU would open a context there)."""
    places: list = [None] * dist.get_world_size()
    dist.all_gather_object(places, (socket.gethostname(), str(device), free_bytes))
    return [(host, torch.device(name), free) for host, name, free in places]


def join_torchrun_pipeline(stages: list[Stage], setup: StageSetup, threads: int,
                           places: list[tuple[str, torch.device, int]]):
    """Called on every rank, after :func:`start_torchrun`, with the same stage split and every
    rank's :func:`torchrun_places`.

    Rank 0 gets a :class:`TorchrunExecutor` (its own stage runs on a thread beside the
    controller). Every other rank serves its stage until rank 0 closes the pipeline, then exits
    the process: code after ``wrap`` runs on rank 0 only.
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    # every stage must be able to hold the blocks the controller hands out
    agreed = torch.tensor([setup.num_blocks], dtype=torch.long)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    setup = dataclasses.replace(setup, num_blocks=int(agreed))
    # NCCL only if every rank has a GPU of its own
    backend = activation_backend([device for _, device, _ in places], hosts=[host for host, _, _ in places])
    stage = stages[rank]
    prepare_stage(stage, setup, threads, places[rank][1])
    if rank == 0:
        return TorchrunExecutor(stages, setup.block_size, setup.num_blocks, backend, setup.attention,
                                plan_ahead=setup.plan_ahead)
    worker = StageWorker(rank, world, stage, setup.block_size, backend, None, None, attention=setup.attention)
    if worker.is_last:
        worker.deliver, worker.on_shutdown = worker.send_result, worker.send_result_shutdown
    try:
        worker.loop()
    except Exception as exc:  # a peer's process or machine went away: say so and leave (SystemExit
        # is not an Exception, so `wrap` does not dress it up as a failed build)
        print(f"tdpipe_hf: stage {rank} ({stage.layers_label}, rank {rank}) lost its link to the pipeline: "
              f"{_short(exc)}. Rank 0 (the controller) or a neighbouring rank stopped; see its log. Exiting.",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    dist.destroy_process_group()
    raise SystemExit(0)


def _short(exc: Exception) -> str:
    """gloo's message without its generic advice."""
    return f"{type(exc).__name__}: {str(exc).split('. This is typically')[0]}"


class TorchrunExecutor:
    """Rank 0's side of a torchrun pipeline: stage 0 on a thread, results received on another."""

    def __init__(self, stages: list[Stage], block_size: int, num_blocks: int, backend: str,
                 attention: str = "paged-sdpa", plan_ahead: bool = False):
        """``plan_ahead``: stage 0 (a thread here) takes a step planned ahead's tokens from the
        ordinary results, which the results thread puts in its relay as they arrive; the last rank
        sends no extra message."""
        self.stages = stages
        self.relays_tokens = plan_ahead
        self.num_stages = len(stages)
        self.num_blocks = num_blocks
        self._plans: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        worker = StageWorker(0, self.num_stages, stages[0], block_size, backend, self._plans, None,
                             attention=attention)
        self._relay = worker.relay = TokenRelay() if plan_ahead else None
        last = self.num_stages - 1
        self._threads = [threading.Thread(target=self._guard, args=(worker.loop, 1), name="tdpipe-stage-0",
                                          daemon=True),
                         threading.Thread(target=self._guard, args=(self._receive_results, last),
                                          name="tdpipe-results", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._in_flight = 0
        self._closed = False
        self._failure: StageError | None = None

    @property
    def running(self) -> bool:
        return not self._closed

    def _guard(self, fn, peer: int) -> None:
        """Run ``fn`` (which talks to rank ``peer``); a failure becomes the next collected result."""
        try:
            fn()
        except Exception as exc:
            self._results.put(StageError(
                f"rank 0 lost its link to rank {peer} (stage {peer}, {self.stages[peer].layers_label}): "
                f"{_short(exc)}. That rank, or one after it, stopped; see its log. A torchrun pipeline cannot restart its "
                f"ranks: relaunch the job"))

    def _receive_results(self) -> None:
        last = self.num_stages - 1
        while True:
            header = recv_header(last)
            if header is None:
                return
            result = recv_object(header, last)
            if self._relay is not None:
                self._relay.put(result.batch_id, result.tokens)
            self._results.put(result)

    def submit(self, batch: MicroBatch) -> None:
        if self._failure is not None:
            raise StageError(f"the torchrun pipeline is down: {self._failure}")
        if self._closed:
            raise RuntimeError("the torchrun pipeline is closed")
        self._plans.put(batch)
        self._in_flight += 1

    def collect(self) -> StepResult:
        if not self._in_flight:
            raise RuntimeError("collect() called with no micro-batch in flight")
        result = self._results.get()
        if isinstance(result, Exception):
            self._failure = result
            self._in_flight = 0
            raise result
        self._in_flight -= 1
        return result

    def close(self) -> None:
        """Shut every rank down (they exit) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        self._plans.put(None)
        for thread in self._threads:  # after a failure the peers are gone: do not wait on them
            thread.join(timeout=30 if self._failure is None else 1)
        self.stages[0].release()
        if dist.is_initialized():
            dist.destroy_process_group()
