"""vLLM v0's pipeline parallelism, as TD-Pipe measured it: one scheduler per virtual engine.

What vLLM v0 (0.6, the release TD-Pipe compared with) does with ``pipeline_parallel_size = pp``,
read from its code (``engine/llm_engine.py``, ``core/scheduler.py``, ``worker/worker.py``,
``engine/async_llm_engine.py``; RFC vllm-project/vllm#11945):

- ``pp`` virtual engines, each with its own scheduler and block manager; the cache is split,
  ``num_gpu_blocks //= pipeline_parallel_size``.
- A new request goes to the engine with the fewest unfinished requests and never moves.
- ``max_num_seqs`` and ``max_num_batched_tokens`` apply per engine.
- Without chunked prefill (the default then) a step is all prefill when waiting requests fit
  (first come, first served, stopping at the first that does not), else all decode; a request
  that cannot get its next block preempts the engine's latest arrival (recompute).
- Each engine has one step in the pipeline at a time (``AsyncLLMEngine`` runs one step per
  virtual engine), so up to ``pp`` micro-batches are in flight, one per engine.
"""

from __future__ import annotations

from ..plan import DECODE, PREFILL, MicroBatch
from .base import BaseScheduler
from .kv import BlockManager, SplitBlocks
from .request import Request, Status


class VllmV0Scheduler(BaseScheduler):
    """``blocks`` is a ``SplitBlocks`` with one pool per engine; ``max_num_seqs`` and
    ``prefill_chunk_tokens`` (vLLM's ``max_num_batched_tokens``) are per engine."""

    def __init__(self, blocks: SplitBlocks, num_stages: int, admission, prefill_chunk_tokens: int = 2048,
                 max_num_seqs: int = 256):
        super().__init__(blocks, num_stages, admission, prefill_chunk_tokens, max_num_seqs)
        self.num_engines = len(blocks.pools)
        self._engine: dict[int, int] = {}  # request id -> its virtual engine, for life
        self._unfinished = [0] * self.num_engines
        self._busy: set[int] = set()  # engines with a micro-batch in the pipeline
        self._batch_engine: dict[int, int] = {}
        self._next = 0

    # ---- which engine ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        engine = min(range(self.num_engines), key=self._unfinished.__getitem__)
        self._engine[request.request_id] = engine
        self._unfinished[engine] += 1
        super().add(request)

    def _forget(self, request: Request) -> None:
        self._unfinished[self._engine.pop(request.request_id)] -= 1

    @property
    def max_request_tokens(self) -> int:
        return min(pool.num_blocks for pool in self.blocks.pools) * self.blocks.block_size

    def kv_of(self, request: Request) -> BlockManager:
        return self.blocks.pools[self._engine[request.request_id]]

    def kv_peers(self, request: Request) -> list[Request]:
        engine = self._engine[request.request_id]
        return [r for r in self.running if self._engine[r.request_id] == engine]

    def finish(self, request: Request, reason: str) -> None:
        super().finish(request, reason)
        self._forget(request)

    def abort(self, request_id: int):
        waiting = next((r for r in self.waiting if r.request_id == request_id), None)
        request = super().abort(request_id)
        if waiting is not None and request is waiting:  # a running one was forgotten by finish
            self._forget(request)
        return request

    def update_from_output(self, batch, result):
        self._busy.discard(self._batch_engine.pop(batch.batch_id))
        return super().update_from_output(batch, result)

    # ---- one engine's step ------------------------------------------------------------------
    def schedule(self) -> MicroBatch | None:
        for _ in range(self.num_engines):
            engine, self._next = self._next, (self._next + 1) % self.num_engines
            if engine in self._busy:
                continue
            batch = self._step(engine)
            if batch is not None:
                self._busy.add(engine)
                self._batch_engine[batch.batch_id] = engine
                return batch
        return None

    def _step(self, engine: int) -> MicroBatch | None:
        """All prefill if the engine's waiting requests fit, else all decode (vLLM v0's default
        scheduler without chunked prefill)."""
        waiting = [r for r in self.waiting if self._engine[r.request_id] == engine]
        running = [r for r in self.running if self._engine[r.request_id] == engine]
        blocks = self.blocks.pools[engine]
        count = self.admission.admit(waiting, running, blocks, self.max_num_seqs) if waiting else 0
        chosen, tokens = [], 0
        for request in waiting[:count]:
            if chosen and tokens + request.num_tokens > self.prefill_chunk_tokens:
                break  # first come, first served: the batch ends at the first that does not fit
            chosen.append(request)
            tokens += request.num_tokens
        if chosen:
            for request in chosen:
                self.waiting.remove(request)
                self.admit(request)
            return self.new_batch(PREFILL, [self.plan(r) for r in chosen])
        decodes = self.take_decodes([r for r in running if r.status is Status.DECODING])
        return self.new_batch(DECODE, [self.plan(r) for r in decodes]) if decodes else None
