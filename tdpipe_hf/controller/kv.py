"""Paged KV block accounting. The controller owns the block tables; stages own the tensors."""

from __future__ import annotations

from .request import Request


class BlockManager:
    """Fixed-size blocks handed out to requests, vLLM style.

    One table serves every stage: each stage stores the same blocks for its own layers, so the
    usable block count is the same on all of them.
    """

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0):
        """Blocks ``first_block ... first_block + num_blocks - 1`` of the cache (a share of it, for
        schedulers that split one cache into pools)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(first_block + num_blocks - 1, first_block - 1, -1))

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


class SplitBlocks:
    """One cache split into equal pools, as vLLM v0 gives each pipeline virtual engine
    ``num_blocks // pp`` of its own; the totals (what the controller reports) span all pools."""

    def __init__(self, num_blocks: int, block_size: int, parts: int):
        share = num_blocks // parts
        if share < 1:
            raise ValueError(f"{num_blocks} KV blocks cannot be split into {parts} pools")
        self.block_size = block_size
        self.pools = [BlockManager(share, block_size, first_block=i * share) for i in range(parts)]

    @property
    def num_blocks(self) -> int:
        return sum(pool.num_blocks for pool in self.pools)

    @property
    def num_free(self) -> int:
        return sum(pool.num_free for pool in self.pools)

    @property
    def num_used(self) -> int:
        return sum(pool.num_used for pool in self.pools)
