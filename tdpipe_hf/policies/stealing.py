"""Decode micro-batch membership: which ready requests ride in the next decode micro-batch."""

from __future__ import annotations

from collections.abc import Sequence

from ..controller.request import Request


class ReadyPoolBatcher:
    """Every returning micro-batch goes back to one ready pool; each new micro-batch takes about
    total / num_stages requests from it (oldest first), so batches stay even as requests finish.
    This is the paper's inter-batch work stealing in its simplest form."""

    def select(self, ready: Sequence[Request], num_decoding: int, num_stages: int) -> list[Request]:
        target = -(-num_decoding // num_stages)
        return list(ready[:target])
