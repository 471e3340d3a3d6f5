"""Baseline pipeline schedules in the same engine, for same-code side-by-side comparisons.

``hybrid``: vLLM-style pipeline parallelism. No phases: requests are spread over ``num_stages``
virtual engines (lanes) and every micro-batch is one lane's decodes plus chunks of its prefills
(chunked prefill, continuous batching), admitted while the KV fits now.

``naive``: static batches as Accelerate/PiPPy-style pipelines run them: a group of requests
whose worst case (prompt + max_new_tokens) fits is admitted into an empty engine, split into
fixed micro-batches, and decoded until the whole group is done. Kinder than real static batching
in one way: finished rows leave their micro-batch instead of being computed as padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..controller.kv import BlockManager
from ..controller.request import Request, Status
from ..controller.scheduler import Scheduler
from ..plan import MicroBatch


class HybridScheduler(Scheduler):
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

    def _lane_batch(self, lane: int, members: list[Request]) -> MicroBatch | None:
        """One lane's decodes, then chunks of its prefills and of newly admitted requests, within
        ``prefill_chunk_tokens``. Plans are written last: making room may preempt a request
        chosen earlier in the loop."""
        decodes: list[Request] = []
        for request in [r for r in members if r.status is Status.DECODING]:
            if request.status is not Status.DECODING:
                continue  # preempted to make room earlier in this loop
            if not self._make_room(request, decodes):
                break
            if request.status is Status.DECODING:
                self.blocks.reserve(request, request.num_tokens)
                decodes.append(request)
        budget = self.prefill_chunk_tokens - len(decodes)
        chunks: list[tuple[Request, int]] = []
        for request in [r for r in members if r.status is Status.PREFILLING and r.block_table]:
            size = min(len(request.pending_ids), budget)
            if size <= 0 or request.status is not Status.PREFILLING:
                continue
            if not self._make_room(request, decodes, request.num_cached + size):
                break
            if request.status is Status.PREFILLING:
                self.blocks.reserve(request, request.num_cached + size)
                chunks.append((request, size))
                budget -= size
        count = self._admissible()
        while count and budget > 0 and self.waiting:  # admit into this lane
            request = self.waiting[0]
            size = min(request.num_tokens, budget)
            if not self.blocks.can_hold(request, size):
                break
            self.waiting.popleft()
            count -= 1
            self.blocks.reserve(request, size)
            request.status = Status.PREFILLING
            request.admitted_at = next(self._admissions)
            self.running.append(request)
            self._lane[request.request_id] = lane
            chunks.append((request, size))
            budget -= size
        decodes = [r for r in decodes if r.status is Status.DECODING]
        chunks = [(r, size) for r, size in chunks if r.status is Status.PREFILLING]
        seqs = [self._plan(r) for r in decodes] + [self._plan(r, size) for r, size in chunks]
        if not seqs:
            return None
        phase = "decode" if not chunks else "prefill" if not decodes else "mixed"
        return MicroBatch(next(self._batch_ids), phase, seqs)

    def _left_decode(self, request: Request) -> None:
        super()._left_decode(request)
        self._lane.pop(request.request_id, None)


class AdmitWholeGroup:
    """Static batching's admission: only into an empty engine, as many requests as fit with their
    whole ``max_new_tokens`` reserved (so nothing is ever preempted); the group's remaining members
    keep being admitted until all are prefilled."""

    def __init__(self):
        self._group: set[int] = set()

    def admit(self, waiting: Sequence[Request], running: Sequence[Request], blocks: BlockManager,
              max_running: int) -> int:
        if not running and (not waiting or waiting[0].request_id not in self._group):
            self._group, free = set(), blocks.num_blocks
            for request in waiting:
                need = blocks.blocks_for(request.max_tokens)
                if len(self._group) >= max_running or (need > free and self._group):
                    break
                self._group.add(request.request_id)
                free -= need
        count = 0
        for request in waiting:
            if request.request_id not in self._group:
                break
            count += 1
        return count


class DrainSwitch:
    """Static batching's switch: the next group starts only when the current one is done."""

    def should_prefill(self, state) -> bool:
        return state.num_decoding == 0 and state.can_admit
