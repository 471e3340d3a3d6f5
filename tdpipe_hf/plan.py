"""The plain description of one micro-batch, the only thing the controller hands to an executor.

It lives outside both ``controller/`` and ``runtime/`` so that neither imports the other: the
controller writes plans (token ids, positions, block tables), executors read them and answer with
token ids. Everything here is picklable so a plan can travel to another process unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Every phase a micro-batch can carry. "prefill": new requests' prompts (whole, or chunks that
# sample nothing until the last); "decode": one new token per request; "mixed": decodes and
# prefill chunks together (hybrid schedules only). Stage-time fits and timelines key on these.
PREFILL, DECODE, MIXED = "prefill", "decode", "mixed"
PHASES = (PREFILL, DECODE, MIXED)


@dataclass(frozen=True, eq=False)
class SamplingSpec:
    """How the last stage turns one request's logits into a token.

    ``processors`` is a transformers ``LogitsProcessorList`` (possibly empty). With no processors
    and ``do_sample=False`` the last stage takes a plain argmax over the whole micro-batch.
    ``seed`` makes a sampled request reproducible on its own: each of its draws uses a generator
    seeded from ``seed`` and the token's position, whatever else shares its micro-batches.
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
    probe: bool = False  # send back the hidden state of the last token (see MicroBatch.probe_layer)
    # planned ahead: ``token_ids`` is a placeholder that stage 0 replaces with the token the batch
    # ``follows`` sampled for this request (the last stage hands it over; see ``fill_forwarded``)
    follows: int | None = None

    @property
    def context_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class MicroBatch:
    batch_id: int
    phase: str  # one of PHASES
    seqs: list[SequencePlan]
    # the stage running decoder layer ``probe_layer - 1`` sends back its output at the last token
    # of every ``probe`` row (HF's ``hidden_states[probe_layer]``): a length probe's input
    probe_layer: int | None = None
    # the last stage also hands this batch's sampled tokens to stage 0, where a plan made ahead
    # of them (rows with ``follows``) waits for them
    forward_tokens: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"micro-batch phase must be one of {PHASES}, got {self.phase!r}")

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def context_tokens(self) -> int:
        """KV tokens the micro-batch's attention reads (its rows' context lengths)."""
        return sum(s.start + len(s.token_ids) for s in self.seqs)

    def probe_rows(self) -> tuple[list[int], list[int]]:
        """(request ids, packed row of their last token) of the rows whose hidden state is asked for."""
        ids, rows, end = [], [], 0
        for seq in self.seqs:
            end += len(seq.token_ids)
            if seq.probe:
                ids.append(seq.request_id)
                rows.append(end - 1)
        return ids, rows


@dataclass
class StepResult:
    """What an executor returns for a micro-batch: one token per sampled sequence, in plan order."""

    batch_id: int
    tokens: dict[int, int]
    # timeline: (stage, "recv" | "compute" | "sample" | "send", batch_id, phase, start, end), perf_counter
    # seconds; see tdpipe_hf.metrics
    events: list[tuple] = field(default_factory=list)
    # request id -> hidden state (float32 numpy vector) of each ``probe`` row, when the plan asked
    states: dict[int, Any] = field(default_factory=dict)


@runtime_checkable
class Executor(Protocol):
    """Runs micro-batches over the stages: what the controller needs of local, spawned, torchrun
    and simulated executors alike. ``submit`` must not wait for the result; ``collect`` blocks until
    some submitted micro-batch comes back (in any order) and raises if a stage failed.

    An executor with ``relays_tokens = True`` also runs micro-batches planned ahead (rows with
    ``follows``): it hands each ``forward_tokens`` batch's tokens to stage 0 itself and runs
    every stage's micro-batches in submission order."""

    num_stages: int

    def submit(self, batch: MicroBatch) -> None: ...

    def collect(self) -> StepResult: ...

    def close(self) -> None: ...


def fill_forwarded(batch: MicroBatch, tokens_of: Callable[[int], dict[int, int]]) -> None:
    """Stage 0, before computing ``batch``: give each row planned ahead the token its request
    got from the batch it follows (``tokens_of(batch_id)``: that batch's tokens by request id,
    waiting for them if they are still on their way)."""
    for seq in batch.seqs:
        if seq.follows is not None:
            seq.token_ids = [tokens_of(seq.follows)[seq.request_id]]
