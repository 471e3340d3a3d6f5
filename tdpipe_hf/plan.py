"""The plain description of one micro-batch, the only thing the controller hands to an executor.

It lives outside both ``controller/`` and ``runtime/`` so that neither imports the other: the
controller writes plans (token ids, positions, block tables), executors read them and answer with
token ids. Everything here is picklable so a plan can travel to another process unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)
class SamplingSpec:
    """How the last stage turns one request's logits into a token.

    ``processors`` is a transformers ``LogitsProcessorList`` (possibly empty). With no processors
    and ``do_sample=False`` the last stage takes a plain argmax over the whole micro-batch.
    """

    do_sample: bool = False
    processors: Any = None
    seed: int | None = None

    @property
    def needs_history(self) -> bool:
        return bool(self.processors)


GREEDY = SamplingSpec()


@dataclass
class SequencePlan:
    """One request's share of a micro-batch: compute ``token_ids`` at positions ``start...``."""

    request_id: int
    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool = True
    sampling: SamplingSpec = GREEDY
    history: list[int] | None = None  # the ids HF's logits processors would see (only when needed)

    @property
    def context_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class MicroBatch:
    batch_id: int
    phase: str  # "prefill" or "decode"
    seqs: list[SequencePlan]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class StepResult:
    """What an executor returns for a micro-batch: one token per sampled sequence, in plan order."""

    batch_id: int
    tokens: dict[int, int]
    stage_seconds: list[float] = field(default_factory=list)
    # timeline: (stage, "recv" | "compute" | "sample" | "send", batch_id, phase, start, end), perf_counter
    # seconds; see tdpipe_hf.metrics
    events: list[tuple] = field(default_factory=list)
