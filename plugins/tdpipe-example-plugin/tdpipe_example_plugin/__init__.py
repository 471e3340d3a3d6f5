"""Example tdpipe_hf plugins: what a third party writes to add a predictor and a switch policy."""

from __future__ import annotations


class PromptRatioPredictor:
    """Predicts that an answer is ``ratio`` times as long as its prompt.

    A predictor needs ``predict(prompts) -> list[float]``: expected generated tokens for each
    chat-templated prompt (a list of token ids). ``fit`` and ``update`` (online learning from
    finished requests) are optional; tdpipe_hf builds the class with no arguments.
    """

    def __init__(self, ratio: float = 2.0):
        self.ratio = ratio

    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "PromptRatioPredictor":
        total = sum(len(p) for p in prompts)
        if total:
            self.ratio = sum(lengths) / total
        return self

    def update(self, prompts: list[list[int]], lengths: list[int]) -> None:
        self.fit(prompts, lengths)

    def predict(self, prompts: list[list[int]]) -> list[float]:
        return [self.ratio * len(p) for p in prompts]


class QueuePressureSwitch:
    """Leaves decode for a prefill phase when the waiting queue outgrows the decoding set.

    A switch policy needs ``should_prefill(state) -> bool``; ``state`` is a
    ``tdpipe_hf.controller.scheduler.DecodeState`` (decoding and waiting counts, what a prefill
    phase would admit, the fitted stage-time model). ``configure(config)`` is optional.
    """

    def __init__(self, pressure: float = 2.0):
        self.pressure = pressure

    def configure(self, config) -> None:
        self.pressure = 1.0 / max(config.switch_fraction, 1e-3)

    def should_prefill(self, state) -> bool:
        if not state.can_admit:
            return False
        return state.num_decoding < state.num_stages or state.num_waiting >= self.pressure * state.num_decoding
