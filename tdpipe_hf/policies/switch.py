"""When the decode phase hands the pipeline back to a prefill phase.

A switch policy is a class built with no arguments, with ``should_prefill(state) -> bool`` and
optionally ``configure(config)`` (reads ``TDPipeConfig``). Third parties register theirs under the
entry-point group ``tdpipe_hf.switch_policies``.
"""

from __future__ import annotations

import math

import numpy as np


class ThresholdSwitch:
    """A fixed rule: switch to prefill once the decoding requests fall below ``fraction`` of this
    decode phase's peak (or below one per stage), provided a waiting request could be admitted."""

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction

    def configure(self, config) -> None:
        self.fraction = config.switch_fraction

    def should_prefill(self, state) -> bool:
        needed = max(state.num_stages, self.fraction * state.peak_decoding)
        return state.num_decoding < needed and state.can_admit


class IntensitySwitch:
    """TD-Pipe's spatial-temporal intensity comparison, checked every ``num_stages`` decode steps.

    spatial  = decode throughput at the current per-micro-batch size / the throughput the batch
               would have after admitting the waiting requests a prefill phase would take now;
    temporal = 1 - bubble / total time of that prefill phase: n micro-batches through P stages
               keep each stage busy n of n + P - 1 slots.
    Switch when spatial < temporal: what decoding on loses exceeds what the switch wastes.
    Throughput comes from the stage-time model fitted to this run's timings, not constants; until
    it has enough samples the fixed threshold rule decides.

    ``last_call`` (default on; off is the paper's rule alone): also switch when every waiting
    request would be admitted. That prefill phase and its bubble must be paid once anyway, so
    deferring it saves nothing, while the newcomers would otherwise start late and run their
    decodes alone in a thin tail (the comparison above sees only the next phase's gain).
    """

    def __init__(self, last_call: bool = True):
        self.fallback = ThresholdSwitch()
        self.last_call = last_call

    def configure(self, config) -> None:
        self.fallback.configure(config)
        self.last_call = not config.paper_rules

    def should_prefill(self, state) -> bool:
        if state.num_decoding and state.decode_steps % state.num_stages:
            return False
        if not state.can_admit:
            return False
        if state.num_decoding == 0 or (self.last_call and state.admissible >= state.num_waiting):
            return True
        stages = state.num_stages
        rows_now = state.num_decoding / stages
        rows_after = (state.num_decoding + state.admissible) / stages
        time_now = state.cost.decode_time(rows_now, state.decode_context / stages)
        time_after = state.cost.decode_time(rows_after, (state.decode_context + state.admissible_tokens) / stages)
        if not time_now or not time_after:
            return self.fallback.should_prefill(state)
        spatial = (rows_now / time_now) / (rows_after / time_after)
        micro_batches = math.ceil(state.admissible_tokens / state.prefill_chunk_tokens)
        temporal = micro_batches / (micro_batches + stages - 1)
        return spatial < temporal


class CheckedSwitch:
    """A switch policy plugin behind a guard: its failures and bad answers name it."""

    def __init__(self, policy, name: str):
        if not callable(getattr(policy, "should_prefill", None)):
            raise TypeError(f"switch policy {name!r} ({type(policy).__name__}) has no should_prefill(state) method")
        self.policy, self.name = policy, name

    def should_prefill(self, state) -> bool:
        try:
            answer = self.policy.should_prefill(state)
        except Exception as exc:
            raise RuntimeError(f"switch policy {self.name!r} failed in should_prefill(): {exc}") from exc
        if not isinstance(answer, (bool, np.bool_)):
            raise TypeError(f"switch policy {self.name!r} returned {answer!r} from should_prefill(), expected True or False")
        return bool(answer)
