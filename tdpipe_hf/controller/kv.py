"""Paged KV block accounting. The controller owns the block tables; stages own the tensors."""

from __future__ import annotations

from .request import Request


class BlockManager:
    """Fixed-size blocks handed out to requests, vLLM style.

    One table serves every stage: each stage stores the same blocks for its own layers, so the
    usable block count is the same on all of them.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks ``request`` still needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(request.block_table))

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        return self.extra_blocks(request, num_tokens) <= len(self._free)

    def reserve(self, request: Request, num_tokens: int) -> None:
        need = self.extra_blocks(request, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"request {request.request_id} needs {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            request.block_table.append(self._free.pop())

    def release(self, request: Request) -> None:
        self._free.extend(reversed(request.block_table))
        request.block_table = []
