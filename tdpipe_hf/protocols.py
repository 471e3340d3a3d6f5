"""What each kind of swappable part must provide, as ``typing.Protocol`` classes.

The registry (``tdpipe_hf.plugins``) checks every part it builds against its kind's protocol, so
the scheduler and controller call these methods without probing for them. Optional hooks have
their own protocol (``Configurable``; a predictor's ``predict_outcomes``/``update``) and are found
with ``isinstance``. Nothing here imports the controller or the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .plan import Executor
from .predictors.base import Predictor


@runtime_checkable
class AdmissionPolicy(Protocol):
    """Decides how many requests at the head of the waiting queue a prefill may take now."""

    def admit(self, waiting: Sequence[Any], running: Sequence[Any], blocks: Any, max_running: int) -> int:
        """How many of ``waiting`` (in order) to admit beside ``running`` on ``blocks`` (a BlockManager)."""
        ...

    def observe(self, request: Any) -> None:
        """A request finished (not aborted): its true length, for policies that learn; may do nothing."""
        ...


@runtime_checkable
class RefinesAfterPrefill(Protocol):
    """Optional for an admission policy: plan with a length probe once a request's prefill ends.
    The scheduler asks the pipeline for the hidden states of layer ``probe_layer`` (None: none)
    and hands them to ``refine``."""

    probe_layer: int | None

    def use_probe(self, probe: Any) -> None: ...

    def refine(self, states: dict) -> None:
        """``states``: request id -> hidden state of its last prompt token."""
        ...


@runtime_checkable
class PlansWithStageTimes(Protocol):
    """Optional for an admission policy: weigh decisions with the scheduler's stage-time model
    (``controller.cost.StageTimeModel``, fitted to the run's timings as it goes)."""

    def use_stage_times(self, cost: Any, num_stages: int, prefill_chunk_tokens: int) -> None: ...


@runtime_checkable
class DecodeBatcher(Protocol):
    """Chooses which ready decoding requests ride in the next decode micro-batch."""

    def select(self, ready: Sequence[Any], num_decoding: int, num_stages: int, cost: Any = None,
               context: int = 0) -> list[Any]:
        """Members of the next micro-batch, in order, from ``ready`` (decoding, not in flight)."""
        ...

    def forget(self, request: Any) -> None:
        """``request`` left decoding (finished or preempted); drop what is kept about it."""
        ...


@runtime_checkable
class SwitchPolicy(Protocol):
    """Decides when the decode phase hands the pipeline back to a prefill phase."""

    def should_prefill(self, state: Any) -> bool:
        """``state`` is a ``DecodeState``; True leaves decode for a prefill phase now."""
        ...


@runtime_checkable
class Configurable(Protocol):
    """Optional for switch policies: read settings from the ``TDPipeConfig`` after construction."""

    def configure(self, config: Any) -> None:
        ...


@runtime_checkable
class SchedulerPolicy(Protocol):
    """What the controller drives: requests in, micro-batch plans out, results applied.

    ``schedule`` returns the next ``MicroBatch`` (or None until a result returns);
    ``update_from_output`` alone applies a result to request state and returns a ``StepOutput``.
    """

    blocks: Any
    waiting: Any
    num_preemptions: int
    num_phase_switches: int

    def add(self, request: Any) -> None: ...

    def abort(self, request_id: int) -> Any: ...

    def schedule(self) -> Any: ...

    def update_from_output(self, batch: Any, result: Any) -> Any: ...

    def observe_step(self, batch: Any, seconds: float) -> None: ...

    @property
    def has_work(self) -> bool: ...


@runtime_checkable
class AttentionBackend(Protocol):
    """How a stage's layers attend over the paged KV cache (see ``runtime/attention.py``)."""

    def build(self, batch: Any, block_size: int, device: Any) -> Any:
        """The metadata every layer reads for one micro-batch, built once per device."""
        ...

    def forward(self, module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs) -> Any:
        """transformers' attention function: (output, weights); ``kwargs["tdpipe_ctx"]`` is the metadata."""
        ...


def members(protocol: type) -> list[str]:
    """The methods and attributes ``protocol`` requires (its public names)."""
    names = []
    for klass in protocol.__mro__:
        if klass is object or klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        names += [n for n in (*vars(klass), *getattr(klass, "__annotations__", {})) if not n.startswith("_")]
    return sorted(set(names))


def check(part, protocol: type, what: str):
    """``part`` if it provides everything ``protocol`` requires, else a TypeError naming what is missing."""
    missing = [name for name in members(protocol) if not hasattr(part, name)
               or (callable(getattr(protocol, name, None)) and not callable(getattr(part, name)))]
    if missing:
        raise TypeError(f"{what} ({type(part).__name__}) has no {', '.join(missing)}: a {protocol.__name__} "
                        f"needs {', '.join(members(protocol))}")
    return part


PROTOCOLS: dict[str, type] = {
    "tdpipe_hf.schedulers": SchedulerPolicy,
    "tdpipe_hf.admission": AdmissionPolicy,
    "tdpipe_hf.decode_batchers": DecodeBatcher,
    "tdpipe_hf.switch_policies": SwitchPolicy,
    "tdpipe_hf.predictors": Predictor,
    "tdpipe_hf.executors": Executor,
    "tdpipe_hf.attention_backends": AttentionBackend,
}
