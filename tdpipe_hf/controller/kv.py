"""Paged KV block accounting. The controller owns the block tables; stages own the tensors."""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict

from .request import Request


class BlockManager:
    """Fixed-size blocks handed out to requests, vLLM style.

    One table serves every stage: each stage stores the same blocks for its own layers, so the
    usable block count is the same on all of them.

    With ``prefix_caching``, a full block whose KV is computed stays indexed by a digest of every
    token up to its end; a request admitted later whose sequence starts the same way takes those
    blocks instead of computing them (a shared system prompt, a repeated question, a preempted
    request coming back). Shared blocks are only read: a request writes from its first uncached
    token on, which always lies in a block of its own. A cached block no request holds counts as
    free and is reused, least recently released first, when no plain free block is left.
    """

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0, prefix_caching: bool = False):
        """Blocks ``first_block ... first_block + num_blocks - 1`` of the cache (a share of it, for
        schedulers that split one cache into pools)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(first_block + num_blocks - 1, first_block - 1, -1))
        self._block_of: dict[bytes, int] = {}  # digest of a full block's tokens and all before -> block
        self._digest_of: dict[int, bytes] = {}
        self._holders: Counter[int] = Counter()  # cached block -> requests holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds, oldest first
        self.cached_tokens = 0  # prompt tokens taken from the cache instead of computed (a statistic)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks ``request`` still needs to hold ``num_tokens`` tokens (counting none as cached:
        an admission that plans with this is never short)."""
        return max(0, self.blocks_for(num_tokens) - len(request.block_table))

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        return self.extra_blocks(request, num_tokens) <= self.num_free

    def reserve(self, request: Request, num_tokens: int) -> None:
        need = self.extra_blocks(request, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"request {request.request_id} needs {need} KV blocks, {self.num_free} free")
        for _ in range(need):
            request.block_table.append(self._take())

    def release(self, request: Request) -> None:
        for block in reversed(request.block_table):
            if block in self._holders:  # cached, or was until ``forget_cached``: maybe shared
                self._holders[block] -= 1
                if self._holders[block]:
                    continue
                del self._holders[block]
                if block in self._digest_of:
                    self._idle[block] = None
                    continue
            self._free.append(block)
        request.block_table = []
        request.blocks_indexed = 0

    # ---- prefix caching -------------------------------------------------------------------
    def cached_prefix_tokens(self, request: Request) -> int:
        """How many tokens ``take_cached_prefix`` would give ``request`` now."""
        if not self.prefix_caching or request.block_table or request.num_cached:
            return 0
        limit = (request.num_tokens - 1) // self.block_size
        digests = self._digests(request, limit)
        count = 0
        while count < limit and digests[count] in self._block_of:
            count += 1
        return count * self.block_size

    def take_cached_prefix(self, request: Request) -> int:
        """Give a request that holds no KV yet the cached blocks its sequence starts with, and
        count their tokens as computed; the tokens taken. At least its last token is left to
        compute (its logits are what the step is for)."""
        count = self.cached_prefix_tokens(request) // self.block_size
        if not count:
            return 0
        for digest in request.block_digests[:count]:
            block = self._block_of[digest]
            self._idle.pop(block, None)
            self._holders[block] += 1
            request.block_table.append(block)
        request.num_cached = count * self.block_size
        request.blocks_indexed = count
        # a recomputed request takes back its own output's blocks too: only prompt tokens count
        self.cached_tokens += min(request.num_cached, len(request.prompt_ids))
        return request.num_cached

    def cache_computed_blocks(self, request: Request) -> None:
        """Index ``request``'s full blocks whose KV is now computed, for later requests to take."""
        if not self.prefix_caching:
            return
        full = min(request.num_cached // self.block_size, len(request.block_table))
        if full <= request.blocks_indexed:
            return  # no block filled since the last call (most decode steps)
        digests = self._digests(request, full)
        for index in range(request.blocks_indexed, full):
            block, digest = request.block_table[index], digests[index]
            if block in self._holders or digest in self._block_of:
                continue  # cached already (taken from the cache, or the same tokens computed twice)
            self._block_of[digest] = block
            self._digest_of[block] = digest
            self._holders[block] = 1
        request.blocks_indexed = full

    def forget_cached(self) -> None:
        """Drop the whole index: the KV it points to may have been overwritten (another run used
        the stages' caches). Blocks held now stay with their holders and are freed as usual."""
        self._free.extend(self._idle)
        self._idle.clear()
        self._block_of.clear()
        self._digest_of.clear()

    def _digests(self, request: Request, count: int) -> list[bytes]:
        """The digests of (at least) ``request``'s first ``count`` full blocks, each of its tokens
        and of all before it and of its ``cache_salt`` (SHA-256: a crafted prompt must not find
        another user's blocks). Kept on the request: its tokens only grow."""
        digests = request.block_digests
        size = self.block_size
        if len(digests) < count:
            ids = request.all_ids
            previous = digests[-1] if digests else _chain_start(request.cache_salt)
            for index in range(len(digests), count):
                previous = hashlib.sha256(previous + array("q", ids[index * size:(index + 1) * size]).tobytes()).digest()
                digests.append(previous)
        return digests

    def _take(self) -> int:
        """A block for new KV: a plain free one, else the cached block released longest ago."""
        if self._free:
            return self._free.pop()
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._digest_of.pop(block)]
        return block


def _chain_start(salt: str | None) -> bytes:
    """Where a request's digest chain starts: a tagged digest of its salt, which no block's digest
    can equal (with the salt's own bytes as the start, a salt spelling one block's tokens would
    match the blocks after that block, at the wrong positions)."""
    if salt is None:
        return hashlib.sha256(b"tdpipe-prefix\0").digest()
    return hashlib.sha256(b"tdpipe-salt\0" + salt.encode("utf-8", "surrogatepass")).digest()


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

    @property
    def cached_tokens(self) -> int:
        return sum(pool.cached_tokens for pool in self.pools)
