"""Stage-time cost model fitted online from the executor's timings, for decisions that weigh
time (the switch policy): how long the slowest stage takes for a micro-batch of a given shape."""

from __future__ import annotations

from collections import deque

import numpy as np

MIN_SAMPLES = 4
# Refit after this many new samples, not after each: a fit (an SVD over the window) took about
# 1.5 ms of the controller's time per decode step, on the pipeline's critical path, and the
# coefficients barely move between neighbouring steps.
REFIT_EVERY = 8


class StageTimeModel:
    """Least squares over the most recent ``window`` micro-batches of each phase.

    decode: seconds = a + b * rows + c * context tokens (KV read by attention)
    prefill: seconds = a + b * tokens
    Coefficients are kept non-negative; with too few or too similar samples the model answers
    None and callers fall back to a rule that needs no timings.
    """

    def __init__(self, window: int = 256):
        self._samples = {"decode": deque(maxlen=window), "prefill": deque(maxlen=window)}
        self._coef: dict[str, np.ndarray | None] = {"decode": None, "prefill": None}
        self._unfitted = {"decode": 0, "prefill": 0}  # samples since the last fit

    def observe(self, phase: str, rows: int, tokens: int, context: int, seconds: float) -> None:
        if phase == "decode":
            self._samples[phase].append((1.0, rows, context, seconds))
        elif phase == "prefill":
            self._samples[phase].append((1.0, tokens, seconds))
        else:
            return
        self._unfitted[phase] += 1
        if self._unfitted[phase] >= REFIT_EVERY:
            self._coef[phase] = None  # refit lazily

    def _fit(self, phase: str) -> np.ndarray | None:
        if self._coef[phase] is None and len(self._samples[phase]) >= MIN_SAMPLES:
            data = np.array(self._samples[phase])
            features, seconds = data[:, :-1], data[:, -1]
            if np.linalg.matrix_rank(features) < 2:
                # one shape only so far: attribute the time to its size alone
                size = features[:, 1].mean()
                coef = np.zeros(features.shape[1])
                coef[1] = seconds.mean() / max(size, 1.0)
            else:
                # minimum-norm solution when context grows in step with rows (collinear)
                coef = np.clip(np.linalg.lstsq(features, seconds, rcond=None)[0], 0.0, None)
            self._coef[phase] = coef
            self._unfitted[phase] = 0
        return self._coef[phase]

    def decode_time(self, rows: float, context: float) -> float | None:
        times = self.decode_times(rows, context)
        return None if times is None else float(times)

    def decode_times(self, rows, context):
        """Decode seconds for one micro-batch shape, or for arrays of them at once."""
        coef = self._fit("decode")
        return None if coef is None else coef[0] + coef[1] * np.asarray(rows) + coef[2] * np.asarray(context)

    def prefill_time(self, tokens: float) -> float | None:
        coef = self._fit("prefill")
        return None if coef is None else float(coef @ [1.0, tokens])
