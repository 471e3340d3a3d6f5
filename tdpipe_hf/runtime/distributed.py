"""One process per stage: activations travel stage to stage over ``torch.distributed``.

The controller's process talks to the pipeline through two pipes: plans go to stage 0, token ids
come back from the last stage. Between stages, each micro-batch travels as three point-to-point
messages (a header, its pickled plan, its hidden states), so every stage knows what it computes
without asking the controller. Sends are asynchronous: a stage starts its next micro-batch while
the previous one is still on its way downstream.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..plan import MicroBatch, StepResult
from .attention import AttentionContext
from .attention import register as register_attention
from .local import StageError
from .malloc import tune_glibc_malloc
from .placement import GLOO, GLOO_AND_NCCL, activation_backend, wire_device
from .sampler import sample_batch
from .split import RESPLIT_GAIN, StageCosts, measured_costs, probe_stage, split_layers
from .stage import Stage, StageSetup

_SHUTDOWN = -1
_POLL_SECONDS = 0.2
_START_TIMEOUT = 300.0
HEARTBEAT_SECONDS = 0.5
HEARTBEAT_TIMEOUT = 5.0  # a worker silent this long is reported as hung
logger = logging.getLogger("tdpipe_hf")


def default_threads(num_stages: int) -> int:
    """Split the cores evenly between the stage processes (at least one thread each)."""
    return max(1, (os.cpu_count() or 1) // num_stages)


def _ranges(ranges: list[range]) -> str:
    return ", ".join(f"{r.start}-{r.stop - 1}" for r in ranges)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Pipe:
    """A one-way pipe written from the sender's own thread. ``mp.Queue`` hands each message to a
    feeder thread, which in a worker pinned to one core has to win that core from the stage's
    next compute before the message leaves. (Measured with pipes on 2 cores: 1.1 ms median from
    the last stage's tokens to the controller; the round trip back to stage 0's next decode
    compute was 4.4 ms median before this and the stage-time model's per-step refit were changed,
    about 2-3 ms after.)"""

    def __init__(self, ctx):
        self.reader, self.writer = ctx.Pipe(duplex=False)

    def put(self, message) -> None:
        self.writer.send(message)

    def get(self, timeout: float | None = None):
        if timeout is not None and not self.reader.poll(timeout):
            raise queue.Empty
        return self.reader.recv()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class DistributedExecutor:
    """Spawns ``len(stages)`` worker processes; same ``submit``/``collect`` interface as
    :class:`LocalExecutor`. Workers start on first use and are restarted after a failure."""

    def __init__(self, stages: list[Stage], setup: StageSetup, threads_per_stage: int | None = None,
                 resplit: Callable[[StageCosts], list[Stage]] | None = None,
                 devices: list[torch.device] | None = None):
        """``resplit(costs)`` builds the stages for a split balanced on ``costs``: given it, the
        workers time their stages at the first start and the pipeline is re-split once if that
        makes the slowest stage at least ``RESPLIT_GAIN`` faster. ``devices``: where each worker
        runs its stage (default: where the stage's weights are)."""
        self.stages = stages
        self.num_stages = len(stages)
        self.setup = setup
        self.devices = devices or [stage.device for stage in stages]
        self.backend = activation_backend(self.devices)
        self.threads = threads_per_stage or default_threads(self.num_stages)
        self.costs: StageCosts | None = None  # measured by the workers at the first start
        self._resplit = resplit if self.num_stages > 1 else None
        self._procs: list = []
        self._in_flight = 0

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        if self._procs:
            return
        probe = self._resplit is not None and self.costs is None
        self._spawn(probe)
        if probe:
            probes = self._answers("probe")
            self.costs = measured_costs(sum(len(stage.layers) for stage in self.stages), probes)
            current = [stage.index_range for stage in self.stages]
            better = split_layers(self.costs, self.num_stages)
            restaged = better != current and \
                self.costs.slowest(better) < (1 - RESPLIT_GAIN) * self.costs.slowest(current)
            if restaged:
                logger.info("re-splitting the pipeline on measured stage times (layer %.1f ms, LM head %.1f ms): "
                            "%s -> %s", self.costs.layers[0] * 1e3, self.costs.head * 1e3, _ranges(current),
                            _ranges(better))
                self.stages = self._resplit(self.costs)
            for rank, restage in enumerate(self._restage):  # the running workers swap stages in place
                restage.put(self.stages[rank] if restaged else None)
        self._answers("ready")

    def _spawn(self, probe: bool) -> None:
        """Start the workers. With ``probe`` each one first times its stage, answers, and waits
        on its own pipe for the stage it serves (None: keep the one it has)."""
        ctx = mp.get_context("spawn")
        self._plans = _Pipe(ctx)
        self._results = _Pipe(ctx)
        self._restage = [_Pipe(ctx) for _ in self.stages] if probe else [None] * self.num_stages
        self._control = ctx.Queue()  # start-up answers from every worker
        self._errors = ctx.Queue()
        port = _free_port()
        self._beats = ctx.Array("d", [time.monotonic()] * self.num_stages, lock=False)
        for rank, stage in enumerate(self.stages):
            proc = ctx.Process(target=_worker_main, name=f"tdpipe-stage-{rank}", daemon=True,
                               args=(rank, self.num_stages, port, stage, self.setup, self.threads,
                                     self.devices[rank], self.backend, self._restage[rank],
                                     self._plans if rank == 0 else None,
                                     self._results if rank == self.num_stages - 1 else None, self._control,
                                     self._errors, self._beats))
            proc.start()
            self._procs.append(proc)

    def _answers(self, kind: str) -> list:
        """Wait for every worker's ``kind`` message; their payloads in rank order."""
        answers: dict[int, object] = {}
        deadline = time.monotonic() + _START_TIMEOUT
        while len(answers) < self.num_stages:
            got, rank, payload = self._get(self._control, deadline, "starting")
            if got != kind:
                raise RuntimeError(f"stage {rank} sent {got!r} during start-up, expected {kind!r}")
            answers[rank] = payload
        return [answers[rank] for rank in range(self.num_stages)]

    def close(self, force: bool = False) -> None:
        """Stop the workers: politely if they are healthy, by force after a short grace period
        (at once with ``force``, after a failure)."""
        if not self._procs:
            return
        if not force and all(p.is_alive() for p in self._procs):
            self._plans.put(None)
            for proc in self._procs:
                proc.join(timeout=5)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for q in (self._control, self._errors):
            q.close()
            q.cancel_join_thread()
        for pipe in (self._plans, self._results, *self._restage):
            if pipe is not None:
                pipe.close()
        self._procs = []
        self._in_flight = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- executor interface ----------------------------------------------------------------
    def submit(self, batch: MicroBatch) -> None:
        self.start()
        self._plans.put(batch)
        self._in_flight += 1

    def collect(self) -> StepResult:
        if not self._in_flight:
            raise RuntimeError("collect() called with no micro-batch in flight")
        result = self._get(self._results, None, "running")
        self._in_flight -= 1
        return result

    def _get(self, source, deadline: float | None, what: str):
        """Next message from ``source``; a dead or failing worker becomes a StageError naming it."""
        while True:
            try:
                return source.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass
            failure = self._failure(check_heartbeats=what == "running")
            if failure is None and deadline is not None and time.monotonic() > deadline:
                failure = f"stage workers did not start within {_START_TIMEOUT:.0f}s"
            if failure is not None:
                self.close(force=True)
                raise StageError(failure)

    def _failure(self, check_heartbeats: bool = True) -> str | None:
        """What went wrong, if anything. A killed worker makes its neighbours fail too (their
        connection resets), so a dead process is named before the errors it caused."""
        errors = []
        while True:
            try:
                errors.append(self._errors.get_nowait())
            except queue.Empty:
                break
        if errors:
            time.sleep(_POLL_SECONDS)  # let the death that caused them become visible
        failed = {rank for rank, _ in errors}
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive() and rank not in failed:
                return (f"stage {rank} ({self._layers(rank)}, pid {proc.pid}) died with exit code "
                        f"{proc.exitcode}")
        if errors:
            rank, message = errors[0]
            return f"stage {rank} ({self._layers(rank)}) failed: {message}"
        now = time.monotonic()
        for rank, proc in enumerate(self._procs if check_heartbeats else []):  # imports take a while at start
            silent = now - self._beats[rank]
            if silent > HEARTBEAT_TIMEOUT:
                return (f"stage {rank} ({self._layers(rank)}, pid {proc.pid}) is not responding: no heartbeat "
                        f"for {silent:.1f}s")
        return None

    def _layers(self, rank: int) -> str:
        layers = self.stages[rank].index_range
        return f"layers {layers.start}-{layers.stop - 1}"


# ---- worker side ----------------------------------------------------------------------------
def _pin_to_cores(rank: int, threads: int) -> None:
    """Give each stage its own cores when there are enough: no migrations, no stage stealing
    another's core (measured: the median wait for the next micro-batch fell from 8.5 to 3.3 ms)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    mine = cores[rank * threads:(rank + 1) * threads]
    if len(mine) == threads:
        os.sched_setaffinity(0, mine)


def _heartbeat(beats, rank: int) -> None:
    while True:
        beats[rank] = time.monotonic()
        time.sleep(HEARTBEAT_SECONDS)


def _prepare_stage(stage: Stage, setup: StageSetup, threads: int, device: torch.device) -> None:
    """Everything a stage process does before serving, in either launch mode."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    register_attention()
    setup.apply(stage, device)


def _worker_main(rank, world, port, stage, setup, threads, device, backend, restage, plans, results, control,
                 errors, beats):
    import threading

    threading.Thread(target=_heartbeat, args=(beats, rank), name="tdpipe-heartbeat", daemon=True).start()
    try:
        _pin_to_cores(rank, threads)
        tune_glibc_malloc()
        _prepare_stage(stage, setup, threads, device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        if restage is not None:  # time the stage, then serve the one the executor picks
            control.put(("probe", rank, probe_stage(stage)))
            replacement = restage.get()
            if replacement is not None:
                stage.drop()  # the spawn arguments keep the old stage object alive: free what it holds
                stage = replacement
                _prepare_stage(stage, setup, threads, device)
        control.put(("ready", rank, None))
        _StageWorker(rank, world, stage, setup.block_size, backend, plans, results.put if results else None).loop()
        dist.destroy_process_group()
    except Exception as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}\n\nworker traceback:\n{traceback.format_exc(limit=8)}"))
        raise SystemExit(1) from None


def _isend_object(obj, dst: int, shape=(0, 0)) -> list[tuple]:
    """Send ``obj`` pickled, after a header ``[byte count, *shape]`` (``shape``: the hidden
    states that follow, if any); returns the (work, tensor) pairs to wait on."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    header = torch.tensor([data.numel(), *shape], dtype=torch.long)
    return [(dist.isend(tensor, dst=dst), tensor) for tensor in (header, data)]


def _recv_header(src: int) -> torch.Tensor | None:
    """The next message's header from ``src``, or None when ``src`` is shutting down."""
    header = torch.empty(3, dtype=torch.long)
    dist.recv(header, src=src)
    return None if header[0] == _SHUTDOWN else header


def _recv_object(header: torch.Tensor, src: int):
    data = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.recv(data, src=src)
    return pickle.loads(data.numpy().tobytes())


class _StageWorker:
    """Runs one stage: micro-batches in (from ``plans`` on stage 0, from the previous rank
    otherwise), hidden states out to the next rank, or a StepResult to ``deliver`` on the last."""

    def __init__(self, rank, world, stage, block_size, backend, plans, deliver, on_shutdown=None):
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

    def loop(self) -> None:
        if self.device.type == "cuda":  # per thread: rank 0's stage runs on a thread of its own
            torch.cuda.set_device(self.device)
        while True:
            t0 = time.perf_counter()
            batch, events, hidden = self._receive()
            t1 = time.perf_counter()
            if batch is None:
                if not self.is_last:
                    self._send_shutdown()
                elif self.on_shutdown is not None:
                    self.on_shutdown()
                self._drain()
                return
            events.append((self.rank, "recv", batch.batch_id, batch.phase, t0, t1))
            ctx = AttentionContext.build(batch, self.block_size, self.device)
            out = self.stage.forward(hidden, ctx)
            t2 = time.perf_counter()
            events.append((self.rank, "compute", batch.batch_id, batch.phase, t1, t2))
            if self.is_last:
                tokens = sample_batch(out, batch)
                events.append((self.rank, "sample", batch.batch_id, batch.phase, t2, time.perf_counter()))
                result = StepResult(batch.batch_id, tokens,
                                    [end - start for (_, kind, _, _, start, end) in events if kind == "compute"],
                                    events)
                self.deliver(result)
            else:
                self._send(batch, events, out)

    def _receive(self):
        if self.rank == 0:
            batch = self.plans.get()
            return batch, [], None
        header = _recv_header(self.rank - 1)
        if header is None:
            return None, None, None
        batch, events, dtype = _recv_object(header, self.rank - 1)
        hidden = torch.empty((1, int(header[1]), int(header[2])), dtype=dtype, device=self.wire)
        dist.recv(hidden, src=self.rank - 1)
        return batch, events, hidden.to(self.device)

    def _send(self, batch, events, hidden) -> None:
        t0 = time.perf_counter()
        self._drain()  # the previous micro-batch must have left before this one goes
        events = events + [(self.rank, "send", batch.batch_id, batch.phase, t0, time.perf_counter())]
        hidden = hidden.contiguous().to(self.wire)  # NCCL sends GPU tensors; gloo, host copies
        self._pending += _isend_object((batch, events, hidden.dtype), self.rank + 1, hidden.shape[1:])
        self._pending.append((dist.isend(hidden, dst=self.rank + 1), hidden))

    def _send_shutdown(self, dst: int | None = None) -> None:
        """Tell ``dst`` (default: the next rank) that no more micro-batches follow."""
        self._drain()
        dist.send(torch.tensor([_SHUTDOWN, 0, 0], dtype=torch.long), dst=self.rank + 1 if dst is None else dst)

    def _drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def send_result(self, result: StepResult) -> None:
        """Last stage under torchrun: the result goes back to rank 0, where the controller runs."""
        self._drain()
        self._pending += _isend_object(result, 0)

    def send_result_shutdown(self) -> None:
        self._send_shutdown(dst=0)


# ---- torchrun / accelerate launch: ranks are stages, rank 0 also hosts the controller -----------
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
    _prepare_stage(stage, setup, threads, places[rank][1])
    if rank == 0:
        return TorchrunExecutor(stages, setup.block_size, setup.num_blocks, backend)
    worker = _StageWorker(rank, world, stage, setup.block_size, backend, None, None)
    if worker.is_last:
        worker.deliver, worker.on_shutdown = worker.send_result, worker.send_result_shutdown
    worker.loop()
    dist.destroy_process_group()
    raise SystemExit(0)


class TorchrunExecutor:
    """Rank 0's side of a torchrun pipeline: stage 0 on a thread, results received on another."""

    def __init__(self, stages: list[Stage], block_size: int, num_blocks: int, backend: str):
        import threading

        self.stages = stages
        self.num_stages = len(stages)
        self.num_blocks = num_blocks
        self._plans: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        worker = _StageWorker(0, self.num_stages, stages[0], block_size, backend, self._plans, None)
        self._threads = [threading.Thread(target=self._guard, args=(worker.loop,), name="tdpipe-stage-0", daemon=True),
                         threading.Thread(target=self._guard, args=(self._receive_results,), name="tdpipe-results",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        self._in_flight = 0
        self._closed = False

    @property
    def running(self) -> bool:
        return not self._closed

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as exc:
            self._results.put(StageError(f"torchrun pipeline failed on rank 0 ({type(exc).__name__}: {exc}); "
                                         "see the other ranks' logs"))

    def _receive_results(self) -> None:
        last = self.num_stages - 1
        while True:
            header = _recv_header(last)
            if header is None:
                return
            self._results.put(_recv_object(header, last))

    def submit(self, batch: MicroBatch) -> None:
        if self._closed:
            raise RuntimeError("the torchrun pipeline is closed")
        self._plans.put(batch)
        self._in_flight += 1

    def collect(self) -> StepResult:
        if not self._in_flight:
            raise RuntimeError("collect() called with no micro-batch in flight")
        result = self._results.get()
        if isinstance(result, Exception):
            raise result
        self._in_flight -= 1
        return result

    def close(self) -> None:
        """Shut every rank down (they exit) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        self._plans.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self.stages[0].release()
        if dist.is_initialized():
            dist.destroy_process_group()
