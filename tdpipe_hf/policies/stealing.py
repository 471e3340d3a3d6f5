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
    pool, and each new micro-batch takes about 1 / num_stages of the decode work from it, so
    requests move from batches that kept theirs to batches that lost theirs.

    ``balance="time"`` (default) measures that share in estimated stage time, a + b rows + c context
    tokens from the scheduler's fitted ``StageTimeModel``: decode time at scale is dominated by the
    KV the rows read, and requests admitted together age together, so batches of equal rows can
    differ several-fold in time and the slowest paces the whole pipeline. ``balance="rows"`` is the
    paper's rule (about total / num_stages requests each); it is also the fallback until the cost
    model has been fitted. Requests left in the pool by the last selection go first, so none waits
    twice in a row while others ride.
    """

    def __init__(self, balance: str = "time"):
        if balance not in ("time", "rows"):
            raise ValueError(f"balance must be 'time' or 'rows', got {balance!r}")
        self.balance = balance
        self._left: set[int] = set()

    def select(self, ready: Sequence[Request], num_decoding: int, num_stages: int,
               cost=None, context: int = 0) -> list[Request]:
        """``context``: the context tokens of all ``num_decoding`` decoding requests (in flight or
        not); ``cost``: a ``StageTimeModel`` (or None)."""
        pool = [r for r in ready if r.request_id in self._left] + [r for r in ready if r.request_id not in self._left]
        weights = self._weights(cost) if self.balance == "time" else None
        if weights is None:
            chosen = pool[:-(-num_decoding // num_stages)]
        else:
            per_row, per_token = weights
            share = (per_row * num_decoding + per_token * context) / num_stages
            chosen, load = [], 0.0
            for request in pool:  # keep adding while under the share: overshoot by < one request
                if load >= share and chosen:
                    break
                chosen.append(request)
                load += per_row + per_token * request.num_tokens
        taken = {r.request_id for r in chosen}
        self._left = {r.request_id for r in ready if r.request_id not in taken}
        return chosen

    @staticmethod
    def _weights(cost) -> tuple[float, float] | None:
        """(seconds per row, seconds per context token) of a decode micro-batch, or None."""
        if cost is None:
            return None
        base = cost.decode_time(0.0, 0.0)
        if base is None:
            return None
        per_row, per_token = cost.decode_time(1.0, 0.0) - base, cost.decode_time(0.0, 1.0) - base
        return (per_row, per_token) if per_row > 0 or per_token > 0 else None

    def forget(self, request: Request) -> None:
        self._left.discard(request.request_id)


class StaticBatcher:
    """No stealing: a request keeps the micro-batch (lane) it joined on entering decode, as in
    static pipeline batching and vLLM's per-virtual-engine scheduling. Newcomers fill the lanes
    up to an even share, in arrival order."""

    def __init__(self):
        self._lane: dict[int, int] = {}

    @classmethod
    def from_config(cls, config) -> "StaticBatcher":
        return cls()

    def select(self, ready: Sequence[Request], num_decoding: int, num_stages: int, **_) -> list[Request]:
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


def steal_by_time(config) -> ReadyPoolBatcher:
    """Registered as ``steal-time``: stealing balanced by estimated stage time (our default)."""
    return ReadyPoolBatcher(balance="time")


def steal_by_rows(config) -> ReadyPoolBatcher:
    """Registered as ``steal-rows``: stealing balanced by row count (the paper's rule)."""
    return ReadyPoolBatcher(balance="rows")
