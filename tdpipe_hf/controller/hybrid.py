"""The hybrid pipeline schedule (vLLM-style PP with chunked prefill), a baseline in the same engine.

No phases: requests are spread over ``num_stages`` virtual engines (lanes) and every micro-batch is
one lane's decodes plus chunks of its prefills and of newly admitted requests (continuous
batching), admitted while the KV fits now. One KV pool is shared by all lanes.
"""

from __future__ import annotations

import itertools

from ..plan import DECODE, MIXED, PREFILL, MicroBatch
from .base import BaseScheduler
from .request import Request, Status


class HybridScheduler(BaseScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lane: dict[int, int] = {}
        self._lanes = itertools.cycle(range(self.num_stages))

    def schedule(self) -> MicroBatch | None:
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

    def _lane_batch(self, lane: int, members: list[Request]) -> MicroBatch | None:
        """One lane's decodes, then chunks of its prefills and of newly admitted requests, within
        ``prefill_chunk_tokens``. Plans are written last: making room may preempt a request
        chosen earlier in the loop."""
        decodes = self.take_decodes([r for r in members if r.status is Status.DECODING])
        budget = self.prefill_chunk_tokens - len(decodes)
        chunks: list[tuple[Request, int]] = []
        for request in [r for r in members if r.status is Status.PREFILLING and r.block_table]:
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
        while count and budget > 0 and self.waiting:  # admit into this lane
            request = self.waiting[0]
            size = min(request.num_tokens, budget)
            if not self.blocks.can_hold(request, size):
                break
            self.waiting.popleft()
            count -= 1
            self.admit(request, size)
            self._lane[request.request_id] = lane
            chunks.append((request, size))
            budget -= size
        decodes = [r for r in decodes if r.status is Status.DECODING]
        chunks = [(r, size) for r, size in chunks if r.status is Status.PREFILLING]
        seqs = [self.plan(r) for r in decodes] + [self.plan(r, size) for r, size in chunks]
        if not seqs:
            return None
        return self.new_batch(DECODE if not chunks else PREFILL if not decodes else MIXED, seqs)
