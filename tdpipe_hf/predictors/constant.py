"""The simplest predictor: every request is expected to produce the mean length seen in training."""

from __future__ import annotations


class ConstantPredictor:
    def __init__(self, length: float = 128.0):
        if length < 0:
            raise ValueError(f"ConstantPredictor length must be >= 0, got {length}")
        self.length = float(length)

    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "ConstantPredictor":
        if len(prompts) != len(lengths):
            raise ValueError(f"fit got {len(prompts)} prompts but {len(lengths)} lengths")
        if lengths:
            self.length = sum(lengths) / len(lengths)
        return self

    def predict(self, prompts: list[list[int]]) -> list[float]:
        return [self.length] * len(prompts)
