"""A request's lifecycle, as the controller tracks it (token ids only, never tensors)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..plan import GREEDY, SamplingSpec


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(eq=False)
class Request:
    """One prompt to complete.

    ``history_prefix`` is what HF ``generate`` shows its logits processors and stopping criteria
    in front of the prompt (the left padding of a batched call), so per-request processing sees
    exactly HF's ids. ``num_cached`` counts tokens whose KV is in the cache: after preemption it
    drops to 0 and the prompt plus the output so far is recomputed.
    """

    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    sampling: SamplingSpec = GREEDY
    stopping_criteria: Any = None  # has should_stop(request) -> bool (the mixin's BatchStopping)
    history_prefix: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    admitted_at: int = -1
    in_flight: int = 0  # micro-batches in the pipeline computing it (two while a step is planned ahead)
    cancelled: bool = False  # aborted while in flight: retired when its micro-batch returns
    num_preemptions: int = 0
    finish_reason: str | None = None
    cache_salt: str | None = None  # requests share cached KV blocks only with the same salt
    block_digests: list[bytes] = field(default_factory=list)  # see BlockManager.take_cached_prefix
    blocks_indexed: int = 0  # leading blocks of block_table the prefix cache has looked at

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending_ids(self) -> list[int]:
        """Tokens whose KV is not in the cache yet: the whole sequence after a (re)admission,
        the last sampled token in decode."""
        prompt = len(self.prompt_ids)
        if self.num_cached >= prompt:  # decode: no copy of the whole sequence per step
            return self.output_ids[self.num_cached - prompt:]
        return self.prompt_ids[self.num_cached:] + self.output_ids

    @property
    def history(self) -> list[int]:
        return self.history_prefix + self.all_ids

    @property
    def is_done(self) -> bool:
        return self.status in (Status.FINISHED, Status.FAILED)

    @property
    def max_tokens(self) -> int:
        """The most tokens this request can ever hold in the KV cache."""
        return len(self.prompt_ids) + self.max_new_tokens
