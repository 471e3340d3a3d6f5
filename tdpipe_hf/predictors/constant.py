"""The simplest predictor: every request is expected to produce the mean length seen so far."""

from __future__ import annotations

import numpy as np

from .base import read_arrays, save_arrays


class ConstantPredictor:
    """The baseline every learned predictor must beat. ``update`` keeps a running mean."""

    kind = "constant"

    def __init__(self, length: float = 128.0):
        if length < 0:
            raise ValueError(f"ConstantPredictor length must be >= 0, got {length}")
        self.length = float(length)
        self.count = 0

    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "ConstantPredictor":
        if len(prompts) != len(lengths):
            raise ValueError(f"fit got {len(prompts)} prompts but {len(lengths)} lengths")
        if lengths:
            self.length = float(np.mean(lengths))
            self.count = len(lengths)
        return self

    def update(self, prompts: list[list[int]], lengths: list[int]) -> None:
        for length in lengths:
            self.count += 1
            self.length += (length - self.length) / self.count

    def predict(self, prompts: list[list[int]]) -> list[float]:
        return [self.length] * len(prompts)

    def save(self, path):
        return save_arrays(path, self.kind, {"length": self.length, "count": self.count})

    @classmethod
    def load(cls, path) -> "ConstantPredictor":
        meta, _ = read_arrays(path)
        predictor = cls(meta["length"])
        predictor.count = int(meta.get("count", 0))
        return predictor
