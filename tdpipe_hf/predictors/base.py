"""The protocol an output-length predictor follows (built-ins and plugins alike), and the checks
that turn a misbehaving plugin into an error naming it instead of a wrong schedule."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from scipy.special import ndtr, ndtri


@runtime_checkable
class Predictor(Protocol):
    """Required: ``predict``. Optional: ``predict_outcomes`` (a length distribution per prompt, which
    greedy prefill plans with when present), ``fit`` (offline training), ``update`` (online
    learning from finished requests), ``save(path)`` / classmethod ``load(path)``."""

    def predict(self, prompts: list[list[int]]) -> list[float]:
        """Expected number of generated tokens for each chat-templated prompt (token ids)."""
        ...


@runtime_checkable
class PredictsOutcomes(Protocol):
    """Optional: a length distribution per prompt, which greedy prefill plans with when present."""

    def predict_outcomes(self, prompts: list[list[int]]) -> list[list[tuple[float, float]]]:
        """Per prompt, (length, probability) pairs whose probabilities sum to 1."""
        ...


@runtime_checkable
class LearnsOnline(Protocol):
    """Optional: learn from finished requests (``TDPipeConfig.online_learning``)."""

    def update(self, prompts: list[list[int]], lengths: list[int]) -> None:
        ...


@runtime_checkable
class Trainable(Protocol):
    """Optional: a predictor that is useless until trained says so, so that ``wrap`` can refuse it
    (with the fix) instead of planning with a guess."""

    @property
    def is_trained(self) -> bool:
        ...


def check_predictor(predictor, name: str):
    """Fail early, naming the plugin, when it cannot be used as a predictor."""
    if not callable(getattr(predictor, "predict", None)):
        raise TypeError(f"predictor {name!r} ({type(predictor).__name__}) has no predict(prompts) method")
    return predictor


def _answers(predictor, method: str, prompts: list[list[int]], label: str, what: str) -> list:
    """``predictor.<method>(prompts)`` as a list of one answer per prompt; failures name it."""
    try:
        answers = list(getattr(predictor, method)(prompts))
    except Exception as exc:
        raise RuntimeError(f"predictor {label!r} failed in {method}(): {exc}") from exc
    if len(answers) != len(prompts):
        raise ValueError(f"predictor {label!r} returned {len(answers)} {what} for {len(prompts)} prompts")
    return answers


def checked_predictions(predictor, prompts: list[list[int]], name: str = "") -> list[float]:
    """``predictor.predict(prompts)`` as floats, or a ValueError saying what came back instead."""
    label = name or type(predictor).__name__
    values = _answers(predictor, "predict", prompts, label, "lengths")
    out = []
    for value in values:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"predictor {label!r} returned {value!r}, expected a number of tokens") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"predictor {label!r} returned {value}, expected a finite length >= 0")
        out.append(value)
    return out


def checked_outcomes(predictor, prompts: list[list[int]], name: str = "") -> list[list[tuple[float, float]]]:
    """``predictor.predict_outcomes(prompts)``: per prompt, (length, probability) pairs whose
    probabilities sum to 1; a ValueError naming the predictor when they do not."""
    label = name or type(predictor).__name__
    out = []
    for outcomes in _answers(predictor, "predict_outcomes", prompts, label, "outcome lists"):
        try:
            pairs = [(float(length), float(prob)) for length, prob in outcomes]
        except (TypeError, ValueError):
            raise ValueError(f"predictor {label!r} returned outcomes {outcomes!r}, expected (length, probability) "
                             f"pairs") from None
        if (not pairs or any(not math.isfinite(n) or n < 0 or not 0.0 <= q <= 1.0 for n, q in pairs)
                or abs(sum(q for _, q in pairs) - 1.0) > 1e-6):
            raise ValueError(f"predictor {label!r} returned outcomes {pairs!r}: lengths must be finite and >= 0, "
                             f"probabilities in [0, 1] summing to 1")
        out.append(pairs)
    return out


def median_length(at_cap: np.ndarray, short: np.ndarray, cap: float, spread: float | None = None) -> list[float]:
    """For a two-part predictor (probability of running to ``cap``, length if it stops earlier):
    the median of its length distribution per request, the point with the lowest expected
    absolute error. Without a ``spread`` the "stops earlier" outcome is a point and the median is
    the likelier outcome; with one (the standard deviation of log length around it, measured out
    of sample) it is a log-normal below the cap, and a request with cap probability p < 0.5 gets
    that log-normal's 0.5 / (1 - p) quantile: the likelier the cap, the longer the guess."""
    at_cap, short = np.asarray(at_cap, dtype=np.float64), np.asarray(short, dtype=np.float64)
    median = np.where(at_cap > 0.5, cap, short)
    early = at_cap < 0.5
    if spread and early.any():
        log_short = np.log(np.maximum(short[early], 1.0))
        below_cap = ndtr((math.log(cap) - log_short) / spread)  # the log-normal's mass below the cap
        quantile = np.clip(0.5 / (1.0 - at_cap[early]) * below_cap, 1e-12, 1.0 - 1e-12)
        median[early] = np.minimum(np.exp(log_short + spread * ndtri(quantile)), cap)
    return median.tolist()


def two_outcomes(at_cap: np.ndarray, short: np.ndarray, cap: float) -> list[list[tuple[float, float]]]:
    """For a two-part predictor: both outcomes with their probabilities, per request."""
    return [[(cap, float(p)), (float(s), 1.0 - float(p))] for p, s in zip(at_cap, short)]


def save_arrays(path: str | os.PathLike, kind: str, meta: dict, **arrays: np.ndarray) -> Path:
    """One ``.npz`` per predictor: arrays plus JSON metadata naming the kind that reads it back.
    No pickles, so loading a predictor file never runs code from it."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"kind": kind, **meta})
    np.savez_compressed(path, __meta__=np.array(header), **arrays)
    return path


def read_arrays(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if key != "__meta__"}
        if "__meta__" not in data.files:
            raise ValueError(f"{path} is not a tdpipe_hf predictor file (no metadata)")
        meta = json.loads(str(data["__meta__"]))
    return meta, arrays
