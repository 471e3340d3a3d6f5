"""When the decode phase hands the pipeline back to a prefill phase."""

from __future__ import annotations


class ThresholdSwitch:
    """Switch to prefill once the decoding requests fall below ``fraction`` of this decode phase's
    peak (or below one per stage), provided a waiting request could be admitted."""

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction

    def should_prefill(self, state) -> bool:
        if not state.can_admit:
            return False
        needed = max(state.num_stages, self.fraction * state.peak_decoding)
        return state.num_decoding < needed
