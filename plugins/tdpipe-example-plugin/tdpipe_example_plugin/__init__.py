"""Example tdpipe_hf plugins: what a third party writes to add a predictor, a switch policy and
an admission policy. Nothing here imports tdpipe_hf: a plugin only has to have the right methods
(``tdpipe_hf.protocols`` lists them), which tdpipe_hf checks when it builds the part."""

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


class HeadroomAdmission:
    """Admits waiting requests in order while each one's prompt plus a headroom for its answer fits
    in the free KV, the headroom being the mean length of the answers finished so far.

    An admission policy needs ``admit(waiting, running, blocks, max_running) -> int`` (how many of
    the waiting requests, from the head, to prefill now) and ``observe(request)`` (a request
    finished; here it teaches the headroom). tdpipe_hf builds it through the factory registered in
    the ``tdpipe_hf.admission`` group, called as ``factory(config, predictor)``.
    """

    def __init__(self, headroom: float = 32.0):
        self.headroom = headroom
        self.finished = 0

    @classmethod
    def from_config(cls, config, predictor=None) -> "HeadroomAdmission":
        return cls()

    def admit(self, waiting, running, blocks, max_running) -> int:
        free, count = blocks.num_free, 0
        for request in waiting:
            if len(running) + count >= max_running:
                break
            need = blocks.blocks_for(request.num_tokens + int(self.headroom))
            if need > free and (running or count):  # an empty engine always takes the first request
                break
            free -= need
            count += 1
        return count

    def observe(self, request) -> None:
        self.finished += 1
        self.headroom += (len(request.output_ids) - self.headroom) / self.finished
