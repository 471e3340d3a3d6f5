"""In-process executor: every stage in this process, run one after the other."""

from __future__ import annotations

import time
from collections import deque

import torch

from ..plan import MicroBatch, StepResult
from .attention import AttentionContext, backend
from .malloc import tune_glibc_malloc
from .relay import TokenRelay
from .sampler import sample_batch
from .stage import Probe, Stage, StageSetup


class StageError(RuntimeError):
    """A stage failed while executing a micro-batch; names the stage and the batch."""


class LocalExecutor:
    """Runs submitted micro-batches in order, each through all stages (which may sit on
    different devices: hidden states move between them).

    ``submit`` only queues: the controller may keep ``num_stages`` micro-batches in flight exactly
    as with a real pipeline, and ``collect`` executes the oldest one. This keeps the controller
    unaware of which executor it drives.
    """

    relays_tokens = True  # runs micro-batches in order, so a step planned ahead finds its tokens
    kv_epoch = 0  # counts the times the KV caches were dropped (see ``Controller._claim_kv``)

    def __init__(self, stages: list[Stage], setup: StageSetup, devices: list[torch.device] | None = None):
        self.stages = stages
        self._relay = TokenRelay()
        self.setup = setup
        self.block_size = setup.block_size
        self.attention = backend(setup.attention)
        self.devices = devices or [stage.device for stage in stages]
        self.num_stages = len(stages)
        self._queue: deque[MicroBatch] = deque()
        if any(torch.device(device).type == "cpu" for device in self.devices):
            tune_glibc_malloc()  # stages compute in this process: without it a prefill's elementwise ops run ~6x slower
        try:
            self._prepare()
        except BaseException:  # e.g. out of memory on one device: leave no stage half placed
            self.close()
            raise

    def _prepare(self) -> None:
        """Place the stages and give them their KV: at the start, and again after ``close``."""
        for stage, device in zip(self.stages, self.devices):
            if stage.kv is None:
                self.setup.apply(stage, device)

    def submit(self, batch: MicroBatch) -> None:
        self._prepare()
        self._queue.append(batch)

    def collect(self) -> StepResult:
        if not self._queue:
            raise RuntimeError("collect() called with no micro-batch in flight")
        batch = self._queue.popleft()
        try:
            return self._run(batch)
        except StageError:
            self._queue.clear()
            raise
        except BaseException:  # e.g. Ctrl-C or a logits processor's error: a step planned ahead of
            # this batch would wait forever for its tokens, so it goes; the rest may still run
            self._queue = deque(b for b in self._queue if all(s.follows != batch.batch_id for s in b.seqs))
            raise

    def _run(self, batch: MicroBatch) -> StepResult:
        self._relay.fill(batch)
        contexts: dict[torch.device, AttentionContext] = {}  # one per device the stages run on
        hidden = None
        events = []
        probe = Probe.of(batch)
        for index, stage in enumerate(self.stages):
            start = time.perf_counter()
            device = stage.kv.keys.device
            if device not in contexts:
                contexts[device] = self.attention.build(batch, self.block_size, device)
            try:
                if hidden is not None:
                    hidden = hidden.to(device)
                hidden = stage.forward(hidden, contexts[device], probe)
            except Exception as exc:
                raise StageError(f"stage {index} (layers {stage.index_range.start}-{stage.index_range.stop - 1}) "
                                 f"failed on {batch.phase} micro-batch {batch.batch_id}: {exc}") from exc
            end = time.perf_counter()
            events.append((index, "compute", batch.batch_id, batch.phase, start, end))
        tokens = sample_batch(hidden, batch)
        if batch.forward_tokens:
            self._relay.put(batch.batch_id, tokens)
        return StepResult(batch.batch_id, tokens, events, probe.states if probe else {})

    def close(self) -> None:
        """Drop queued work and the KV cache, and give the model's modules back their own weights
        on their own devices; the next micro-batch prepares the stages again."""
        self.kv_epoch += 1  # the KV is gone: a controller's prefix cache must not trust it
        self._queue.clear()
        for stage in self.stages:
            stage.release()
