"""The parts of the ``naive`` baseline schedule (the hybrid one is ``controller/hybrid.py``).

``naive``: static batches as Accelerate/PiPPy-style pipelines run them: a group of requests
whose worst case (prompt + max_new_tokens) fits is admitted into an empty engine, split into
fixed micro-batches, and decoded until the whole group is done. Kinder than real static batching
in one way: finished rows leave their micro-batch instead of being computed as padding.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..controller.kv import BlockManager
from ..controller.request import Request


class AdmitWholeGroup:
    """Static batching's admission: only into an empty engine, as many requests as fit with their
    whole ``max_new_tokens`` reserved (so nothing is ever preempted); the group's remaining members
    keep being admitted until all are prefilled."""

    def __init__(self):
        self._group: set[int] = set()

    @classmethod
    def from_config(cls, config, predictor=None) -> "AdmitWholeGroup":
        return cls()

    def observe(self, request: Request) -> None:
        """Static batching learns nothing from finished requests."""

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
