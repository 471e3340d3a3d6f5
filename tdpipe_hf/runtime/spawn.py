"""The spawn executor: one worker process per stage, started from the controller's process.

The controller's process talks to the pipeline through two pipes: plans go to stage 0, token ids
come back from the last stage; between stages the workers speak ``wire.py``'s protocol. Workers
send heartbeats from a thread of their own, so a dead or frozen (stopped) stage process becomes
a ``StageError`` naming it within seconds; a stage whose main thread waits forever while its
process runs is not detected by them.
"""

from __future__ import annotations

import ast
import logging
import multiprocessing.spawn as mp_spawn
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..plan import MicroBatch, StepResult
from .attention import backend as attention_backend
from .local import StageError
from .malloc import tune_glibc_malloc
from .placement import activation_backend
from .relay import PipeRelay
from .split import RESPLIT_GAIN, StageCosts, measured_costs, probe_stage, split_layers
from .stage import Stage, StageSetup
from .wire import StageWorker, prepare_stage

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


def free_port() -> int:
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

    kv_epoch = 0  # counts the times the workers (and their KV caches) were stopped (``Controller._claim_kv``)

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
        self._tokens = _Pipe(ctx) if self.setup.plan_ahead else None  # last stage -> stage 0 (plan_ahead)
        self._restage = [_Pipe(ctx) for _ in self.stages] if probe else [None] * self.num_stages
        self._control = ctx.Queue()  # start-up answers from every worker
        self._errors = ctx.Queue()
        port = free_port()
        self._beats = ctx.Array("d", [time.monotonic()] * self.num_stages, lock=False)
        self._looked = time.monotonic()  # when ``_failure`` last looked at the heartbeats
        for rank, stage in enumerate(self.stages):
            proc = ctx.Process(target=_worker_main, name=f"tdpipe-stage-{rank}", daemon=True,
                               args=(rank, self.num_stages, port, stage, self.setup, self.threads,
                                     self.devices[rank], self.backend, self._restage[rank],
                                     self._plans if rank == 0 else None,
                                     self._results if rank == self.num_stages - 1 else None,
                                     self._tokens if rank in (0, self.num_stages - 1) else None, self._control,
                                     self._errors, self._beats))
            with _without_main_reimport(), _sigint_blocked():
                proc.start()
            self._procs.append(proc)
        # keep only the ends this process uses: a dead worker then breaks the pipe (an error
        # here) instead of leaving a write to a full pipe, or a read of a cut message, waiting
        unused = [self._plans.reader, self._results.writer, *(p.reader for p in self._restage if p is not None)]
        if self._tokens is not None:
            unused += [self._tokens.reader, self._tokens.writer]
        for end in unused:
            end.close()

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
        self.kv_epoch += 1  # the workers' KV goes with them: a controller's prefix cache must not trust it
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
        for pipe in (self._plans, self._results, self._tokens, *self._restage):
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
    @property
    def relays_tokens(self) -> bool:
        """With ``plan_ahead`` the workers hand decode tokens from the last stage to stage 0."""
        return self.setup.plan_ahead

    def submit(self, batch: MicroBatch) -> None:
        self.start()
        try:
            self._plans.put(batch)
        except OSError as exc:  # stage 0 is gone (its end of the pipe closed with it)
            self._broken(exc)
        self._in_flight += 1

    def collect(self) -> StepResult:
        if not self._in_flight:
            raise RuntimeError("collect() called with no micro-batch in flight")
        result = self._get(self._results, None, "running")
        self._in_flight -= 1
        return result

    def idle_failure(self) -> str | None:
        """With nothing in flight: what went wrong with a worker since the last run (it died or
        stopped beating), or None. The workers are then closed, so that the next ``submit``
        starts fresh ones instead of failing on the dead one."""
        if not self._procs or self._in_flight:
            return None
        failure = self._failure()
        if failure is not None:
            self.close(force=True)
        return failure

    def _get(self, source, deadline: float | None, what: str):
        """Next message from ``source``; a dead or failing worker becomes a StageError naming it."""
        while True:
            try:
                return source.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass
            except (EOFError, OSError) as exc:  # the sending worker died, mid-message or before
                self._broken(exc)
            failure = self._failure(check_heartbeats=what == "running")
            if failure is None and deadline is not None and time.monotonic() > deadline:
                failure = f"stage workers did not start within {_START_TIMEOUT:.0f}s"
            if failure is not None:
                self.close(force=True)
                raise StageError(failure)

    def _broken(self, exc: BaseException) -> None:
        """A pipe to the workers broke: a StageError naming the worker that died, if one did."""
        time.sleep(_POLL_SECONDS)  # let the death become visible
        failure = self._failure(check_heartbeats=False) or f"the connection to the stage workers broke: {exc!r}"
        self.close(force=True)
        raise StageError(failure) from exc

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
                return (f"stage {rank} ({self.stages[rank].layers_label}, pid {proc.pid}) died with exit "
                        f"code {proc.exitcode}")
        if errors:
            rank, message = errors[0]
            if "Can't get attribute" in message and "__main__" in message:
                message += (" (a logits processor or other object defined in a script without an `if __name__ "
                            "== \"__main__\":` guard, a notebook or `python -c` cannot reach the stage processes: "
                            "define it in a module, or guard the script)")
            return f"stage {rank} ({self.stages[rank].layers_label}) failed: {message}"
        now = time.monotonic()
        # this process was itself stopped (Ctrl-Z, then fg) since it last looked: the workers were
        # too, so their silence says nothing until their heartbeat threads have had a turn
        resumed = now - self._looked > HEARTBEAT_TIMEOUT
        self._looked = now
        for rank, proc in enumerate(self._procs if check_heartbeats and not resumed else []):  # imports take a while at start
            silent = now - self._beats[rank]
            if silent > HEARTBEAT_TIMEOUT:
                return (f"stage {rank} ({self.stages[rank].layers_label}, pid {proc.pid}) is not responding: "
                        f"no heartbeat for {silent:.1f}s")
        return None


def main_is_guarded() -> bool:
    """Whether the ``__main__`` script keeps its work under ``if __name__ == "__main__":`` (or has
    no file to re-run at all), so that importing it again in a worker is harmless."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or not os.path.exists(path):
        return True
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return True
    return False


@contextmanager
def _without_main_reimport():
    """Start a spawned worker without importing the caller's main script in it.

    multiprocessing's spawn re-imports ``__main__`` in every child so that functions defined
    there can be unpickled; a script without an ``if __name__ == "__main__":`` guard (most first
    scripts) would then run again in each stage process, wrap its model and spawn again. The
    workers need nothing from the script (stages, plans and results are tdpipe_hf and transformers
    objects), so for such a script the child is told to leave ``__main__`` alone. A guarded
    script is still imported as usual: classes it defines (a logits processor) then reach the
    workers."""
    if main_is_guarded():
        yield
        return
    original = mp_spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    mp_spawn.get_preparation_data = preparation_data
    try:
        yield
    finally:
        mp_spawn.get_preparation_data = original


@contextmanager
def _sigint_blocked():
    """Block SIGINT in this thread while it starts a stage: the new process inherits the mask, so
    a Ctrl-C during its start-up imports stays pending until ``_worker_main`` ignores it (else the
    stage dies inside ``import torch`` and the controller reports a confusing crash)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---- worker side ----------------------------------------------------------------------------
def _pin_to_cores(rank: int, threads: int) -> None:
    """Give each stage its own cores when there are enough: no migrations, no stage stealing
    another's core (measured: the median wait for the next micro-batch fell from 8.5 to 3.3 ms)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    mine = cores[rank * threads:(rank + 1) * threads]
    if len(mine) == threads:
        os.sched_setaffinity(0, mine)


def _heartbeat(beats, rank: int, controller: int) -> None:
    """Beat for the controller's watchdog, and exit when the controller is gone: a controller
    killed outright (SIGKILL, the OOM killer) closes nothing, and a stage left waiting on its
    peers would otherwise hold its memory and spin on a core forever."""
    while True:
        if os.getppid() != controller:  # re-parented: the process that spawned this stage died
            os._exit(1)
        beats[rank] = time.monotonic()
        time.sleep(HEARTBEAT_SECONDS)


def _worker_main(rank, world, port, stage, setup, threads, device, backend, restage, plans, results, tokens,
                 control, errors, beats):
    # Ctrl-C in a terminal reaches every process of the job: the controller stops the run and
    # closes the stages, so a stage does not die on its own with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since spawn (``_sigint_blocked``)
    threading.Thread(target=_heartbeat, args=(beats, rank, os.getppid()), name="tdpipe-heartbeat",
                     daemon=True).start()
    try:
        _pin_to_cores(rank, threads)
        tune_glibc_malloc()
        prepare_stage(stage, setup, threads, device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
        if restage is not None:  # time the stage, then serve the one the executor picks
            control.put(("probe", rank, probe_stage(stage, attention_backend(setup.attention).build)))
            replacement = restage.get()
            if replacement is not None:
                stage.drop()  # the spawn arguments keep the old stage object alive: free what it holds
                stage = replacement
                prepare_stage(stage, setup, threads, device)
        control.put(("ready", rank, None))
        worker = StageWorker(rank, world, stage, setup.block_size, backend, plans, results.put if results else None,
                             attention=setup.attention)
        if tokens is not None:  # plan_ahead: the last stage hands decode tokens to stage 0
            worker.relay = PipeRelay(tokens) if rank == 0 else None
            worker.forward = (lambda batch_id, sampled: tokens.put((batch_id, sampled))) if rank == world - 1 else None
        worker.loop()
        dist.destroy_process_group()
    except Exception as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}\n\nworker traceback:\n{traceback.format_exc(limit=8)}"))
        raise SystemExit(1) from None
