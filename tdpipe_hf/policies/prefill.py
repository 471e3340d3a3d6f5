"""Prefill admission: how many waiting requests enter the running set now."""

from __future__ import annotations

from collections.abc import Sequence

from ..controller.kv import BlockManager
from ..controller.request import Request


class AdmitWhileFits:
    """Baseline rule: admit in arrival order while the prompts' blocks fit in the free KV now.

    ``watermark`` keeps a share of the blocks free at admission so that the first decode steps
    do not preempt at once. Requests that later outgrow the cache are preempted by the scheduler.
    """

    def __init__(self, watermark: float = 0.01):
        self.watermark = watermark

    def admit(self, waiting: Sequence[Request], blocks: BlockManager, num_running: int, max_running: int) -> int:
        reserve = int(self.watermark * blocks.num_blocks)
        free = blocks.num_free
        count = 0
        for request in waiting:
            if num_running + count >= max_running:
                break
            need = blocks.blocks_for(request.num_tokens)
            # the reserve never blocks the only request: it would wait forever
            if need > free - (reserve if num_running + count else 0):
                break
            free -= need
            count += 1
        return count
