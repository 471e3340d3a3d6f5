"""Hybrid pipeline schedules (chunked prefill mixed with decodes), baselines in the same engine.

No phases: every micro-batch is decodes plus chunks of prefills and of newly admitted requests
(continuous batching) within a token budget, admitted while the KV fits now; one KV pool for all.

- ``hybrid`` (``pinned_lanes=True``): requests are spread over ``num_stages`` lanes (virtual
  engines) and a micro-batch is one lane's requests, as in vLLM v0 with chunked prefill.
- ``vllm-v1-pp`` (``pinned_lanes=False``): vLLM v1's one scheduler with a queue of ``pp``
  batches: every request not in the pipeline may join the next micro-batch (``v1/core/sched/
  scheduler.py``). ``max_batch_seqs`` caps the sequences of one micro-batch: vLLM's fix
  (PR #28286) for all ``max_num_seqs`` landing in one micro-batch (issue #28270) caps it at
  ``max_num_seqs / pp``.
- ``hybrid-throttled`` (``throttle=True``, lanes not pinned): the best hybrid we know, after
  gLLM's token throttling (SC'25, arXiv 2504.14775) in spirit, with our own rule: each micro-batch
  takes about 1 / pp of the decoding requests (so decode work is even across the micro-batches in
  flight) and a prefill budget of 1 / pp of the prompt tokens still to compute, scaled by the
  share of KV blocks free (less admission as memory fills), within [``MIN_PREFILL_TOKENS``,
  ``prefill_chunk_tokens``].
"""

from __future__ import annotations

import itertools

from ..plan import DECODE, MIXED, PREFILL, MicroBatch
from .base import BaseScheduler
from .request import Request, Status


MIN_PREFILL_TOKENS = 32  # a throttled micro-batch still makes prefill progress


class HybridScheduler(BaseScheduler):
    def __init__(self, *args, pinned_lanes: bool = True, max_batch_seqs: int | None = None, throttle: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_lanes = pinned_lanes
        self.throttle = throttle
        self.max_batch_seqs = max_batch_seqs or self.max_num_seqs
        self._lane: dict[int, int] = {}
        self._lanes = itertools.cycle(range(self.num_stages))

    def schedule(self) -> MicroBatch | None:
        if not self.pinned_lanes:
            return self._lane_batch(None, [r for r in self.running if not r.in_flight], *self._throttled())
        for _ in range(self.num_stages):
            lane = next(self._lanes)
            members = [r for r in self.running if self._lane.get(r.request_id) == lane]
            if any(r.in_flight for r in members):
                continue  # this virtual engine's micro-batch is still in the pipeline
            batch = self._lane_batch(lane, members)
            if batch is not None:
                return batch
        return None

    def on_leave(self, request: Request) -> None:
        self._lane.pop(request.request_id, None)

    def _throttled(self) -> tuple[int | None, int | None]:
        """(decode rows, prefill tokens) for the next micro-batch under ``throttle``, else (None, None)."""
        if not self.throttle:
            return None, None
        decoding = sum(r.status is Status.DECODING for r in self.running)
        pending = (sum(len(r.pending_ids) for r in self.running if r.status is Status.PREFILLING)
                   + sum(r.num_tokens for r in self.waiting))
        free = self.blocks.num_free / max(1, self.blocks.num_blocks)
        prefill = int(-(-pending // self.num_stages) * free)
        return -(-decoding // self.num_stages), max(MIN_PREFILL_TOKENS, min(prefill, self.prefill_chunk_tokens))

    def _lane_batch(self, lane: int | None, members: list[Request], decode_rows: int | None = None,
                    prefill_tokens: int | None = None) -> MicroBatch | None:
        """One lane's decodes, then chunks of its prefills and of newly admitted requests, within
        ``prefill_chunk_tokens`` (or the throttled ``decode_rows`` and ``prefill_tokens``). Plans
        are written last: making room may preempt a request chosen earlier in the loop."""
        cap = self.max_batch_seqs
        decodes = self.take_decodes([r for r in members if r.status is Status.DECODING][:min(cap, decode_rows or cap)])
        budget = self.prefill_chunk_tokens - len(decodes) if prefill_tokens is None else prefill_tokens
        chunks: list[tuple[Request, int]] = []
        for request in [r for r in members if r.status is Status.PREFILLING and r.block_table]:
            if len(decodes) + len(chunks) >= cap:
                break
            size = min(len(request.pending_ids), budget)
            if size <= 0 or request.status is not Status.PREFILLING:
                continue
            if not self.make_room(request, decodes, request.num_cached + size):
                break
            if request.status is Status.PREFILLING:
                self.blocks.reserve(request, request.num_cached + size)
                chunks.append((request, size))
                budget -= size
        count = self.admissible()
        while count and budget > 0 and self.waiting and len(decodes) + len(chunks) < cap:  # admit into this lane
            request = self.waiting[0]
            size = min(request.num_tokens, budget)
            if not self.blocks.can_hold(request, size):
                break
            self.waiting.popleft()
            count -= 1
            self.admit(request, size)
            size = min(size, request.num_tokens - request.num_cached)  # less where the cache held its start
            if lane is not None:
                self._lane[request.request_id] = lane
            chunks.append((request, size))
            budget -= size
        decodes = [r for r in decodes if r.status is Status.DECODING]
        chunks = [(r, size) for r, size in chunks if r.status is Status.PREFILLING]
        seqs = [self.plan(r) for r in decodes] + [self.plan(r, size) for r, size in chunks]
        if not seqs:
            return None
        return self.new_batch(DECODE if not chunks else PREFILL if not decodes else MIXED, seqs)
