"""Decode micro-batch membership: which ready requests ride in the next decode micro-batch.

In the decode phase ``num_stages`` micro-batches circulate through the pipeline. As requests
finish, batches shrink unevenly, and the largest one sets the pace of every stage. Work stealing
rebalances them each time a batch is formed; the static batcher is the no-stealing baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..controller.request import Request


class ReadyPoolBatcher:
    """TD-Pipe's inter-batch work stealing: every returning micro-batch goes back to one ready
    pool, and each new micro-batch takes about total / num_stages requests from it (oldest first),
    so requests move from batches that kept theirs to batches that lost theirs."""

    def select(self, ready: Sequence[Request], num_decoding: int, num_stages: int) -> list[Request]:
        target = -(-num_decoding // num_stages)
        return list(ready[:target])


class StaticBatcher:
    """No stealing: a request keeps the micro-batch (lane) it joined on entering decode, as in
    static pipeline batching and vLLM's per-virtual-engine scheduling. Newcomers fill the lanes
    up to an even share, in arrival order."""

    def __init__(self):
        self._lane: dict[int, int] = {}

    def select(self, ready: Sequence[Request], num_decoding: int, num_stages: int) -> list[Request]:
        if not ready:
            return []
        sizes = [0] * num_stages
        for lane in self._lane.values():
            sizes[lane] += 1
        newcomers = [r for r in ready if r.request_id not in self._lane]
        target = -(-(len(self._lane) + len(newcomers)) // num_stages)
        for request in newcomers:  # contiguous runs, filling the smallest lanes up to an even share
            lane = next((i for i in range(num_stages) if sizes[i] < target), min(range(num_stages), key=sizes.__getitem__))
            self._lane[request.request_id] = lane
            sizes[lane] += 1
        lane = self._lane[ready[0].request_id]
        return [r for r in ready if self._lane[r.request_id] == lane]

    def forget(self, request: Request) -> None:
        """The request left decode (finished or preempted): its lane shrinks."""
        self._lane.pop(request.request_id, None)
