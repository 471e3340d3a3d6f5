"""The oracle: knows each prompt's true output length. For experiments only, it bounds what any
predictor could gain."""

from __future__ import annotations

import numpy as np

from .base import read_arrays, save_arrays


class OraclePredictor:
    kind = "oracle"

    def __init__(self, default: float = 128.0):
        self.lengths: dict[tuple[int, ...], float] = {}
        self.default = float(default)

    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "OraclePredictor":
        if len(prompts) != len(lengths):
            raise ValueError(f"fit got {len(prompts)} prompts but {len(lengths)} lengths")
        self.lengths.update((tuple(p), float(n)) for p, n in zip(prompts, lengths))
        if lengths:
            self.default = float(np.mean(list(self.lengths.values())))
        return self

    update = fit

    @property
    def is_trained(self) -> bool:
        """An oracle that knows no lengths would only ever guess its default."""
        return bool(self.lengths)

    def predict(self, prompts: list[list[int]]) -> list[float]:
        """Unknown prompts get the mean of the known ones."""
        return [self.lengths.get(tuple(p), self.default) for p in prompts]

    def save(self, path):
        keys = list(self.lengths)
        flat = np.array([t for key in keys for t in key], dtype=np.int64)
        offsets = np.cumsum([0] + [len(key) for key in keys]).astype(np.int64)
        return save_arrays(path, self.kind, {"default": self.default}, tokens=flat, offsets=offsets,
                           lengths=np.array([self.lengths[k] for k in keys], dtype=np.float64))

    @classmethod
    def load(cls, path) -> "OraclePredictor":
        meta, arrays = read_arrays(path)
        predictor = cls(meta["default"])
        tokens, offsets = arrays["tokens"].tolist(), arrays["offsets"].tolist()
        for i, length in enumerate(arrays["lengths"].tolist()):
            predictor.lengths[tuple(tokens[offsets[i]:offsets[i + 1]])] = length
        return predictor


class NoisyOraclePredictor(OraclePredictor):
    """The true lengths times a log-normal error, ``exp(N(bias, sigma))``, fixed per prompt: a
    stand-in for a real predictor where only true lengths exist (the simulator's workloads).
    ``REALISTIC`` is what a shipped SmolLM2 predictor achieved on prompts it never saw."""

    kind = "noisy-oracle"
    # log(predicted / true) of the shipped predictor on the 129 held-out prompts of its 80/20 split
    # (seed 0) of shared/data/prompts.jsonl, cap 512: mean 0.617, standard deviation 1.173
    # (measured 2026-12-03; MAE 159.8 tokens against 168.3 for the best constant, the median).
    # The predictor shipped since 2026-12-07 (trained with four copies of each prompt) has mean
    # 0.202, standard deviation 1.096 and MAE 151.5 there for its likelier outcome (0.546, 1.106 and
    # 152.7 for the median its ``predict`` gives since); the simulator keeps the older, more
    # pessimistic error as its default so that its tables stay comparable.
    REALISTIC = (0.617, 1.173)

    def __init__(self, bias: float = REALISTIC[0], sigma: float = REALISTIC[1], seed: int = 0):
        super().__init__()
        self.bias, self.sigma, self.seed = float(bias), float(sigma), seed

    def predict(self, prompts: list[list[int]]) -> list[float]:
        out = []
        for prompt, true in zip(prompts, super().predict(prompts)):
            rng = np.random.default_rng([self.seed, hash(tuple(prompt)) & 0xFFFFFFFF])
            out.append(float(true * np.exp(rng.normal(self.bias, self.sigma))) if self.sigma or self.bias else true)
        return out
