"""The protocol an output-length predictor follows (built-ins and plugins alike), and the checks
that turn a misbehaving plugin into an error naming it instead of a wrong schedule."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """Required: ``predict``. Optional: ``fit`` (offline training), ``update`` (online learning from
    finished requests), ``save(path)`` / classmethod ``load(path)``."""

    def predict(self, prompts: list[list[int]]) -> list[float]:
        """Expected number of generated tokens for each chat-templated prompt (token ids)."""
        ...


def check_predictor(predictor, name: str):
    """Fail early, naming the plugin, when it cannot be used as a predictor."""
    if not callable(getattr(predictor, "predict", None)):
        raise TypeError(f"predictor {name!r} ({type(predictor).__name__}) has no predict(prompts) method")
    return predictor


def checked_predictions(predictor, prompts: list[list[int]], name: str = "") -> list[float]:
    """``predictor.predict(prompts)`` as floats, or a ValueError saying what came back instead."""
    label = name or type(predictor).__name__
    try:
        values = list(predictor.predict(prompts))
    except Exception as exc:
        raise RuntimeError(f"predictor {label!r} failed in predict(): {exc}") from exc
    if len(values) != len(prompts):
        raise ValueError(f"predictor {label!r} returned {len(values)} lengths for {len(prompts)} prompts")
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
