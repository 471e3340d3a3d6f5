"""The protocol an output-length predictor follows (built-ins and plugins alike)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Predictor(Protocol):
    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "Predictor": ...

    def predict(self, prompts: list[list[int]]) -> list[float]:
        """Expected number of generated tokens for each chat-templated prompt."""
        ...
