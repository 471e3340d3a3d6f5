"""The default predictor: a linear model on hashed token n-grams of the prompt, trained on the
served model's own output lengths (``tdpipe train-predictor``).

Why this model: it needs nothing but the prompt's token ids (no tokenizer, no forward pass), it is
tiny to ship, predicts thousands of prompts in milliseconds, and ``SGDRegressor.partial_fit``
lets finished requests keep teaching it while the engine runs. It predicts log(1 + length), whose
errors are closer to symmetric than raw lengths', and clips to the lengths seen in training.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import SGDRegressor

from .base import read_arrays, save_arrays


def token_ngrams(ids: list[int]) -> list[str]:
    """Unigrams and bigrams of token ids as strings, for the hashing vectorizer."""
    grams = [str(t) for t in ids]
    return grams + [f"{a}_{b}" for a, b in zip(ids, ids[1:])]


class LengthRegressor:
    kind = "sklearn"

    def __init__(self, n_features: int = 1 << 14, alpha: float = 1e-4, epochs: int = 30, seed: int = 0):
        self.n_features = n_features
        self.alpha = alpha
        self.epochs = epochs
        self.seed = seed
        self.max_length = 4096.0
        self.model: SGDRegressor | None = None
        self._hasher = HashingVectorizer(analyzer=token_ngrams, n_features=n_features, alternate_sign=False,
                                         norm="l2")

    def _features(self, prompts: list[list[int]]) -> sparse.csr_matrix:
        if not prompts:
            return sparse.csr_matrix((0, self.n_features + 1))
        grams = self._hasher.transform(prompts)
        size = np.log1p([[len(p)] for p in prompts]) / math.log(4096)
        return sparse.hstack([grams, sparse.csr_matrix(size)], format="csr")

    def _new_model(self) -> SGDRegressor:
        return SGDRegressor(alpha=self.alpha, penalty="l2", learning_rate="invscaling", eta0=0.05,
                            random_state=self.seed)

    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "LengthRegressor":
        if len(prompts) != len(lengths):
            raise ValueError(f"fit got {len(prompts)} prompts but {len(lengths)} lengths")
        if not prompts:
            raise ValueError("fit needs at least one (prompt, length) pair")
        features, target = self._features(prompts), np.log1p(np.asarray(lengths, dtype=np.float64))
        self.model = self._new_model()
        rng = np.random.default_rng(self.seed)
        for _ in range(self.epochs):  # shuffled passes of partial_fit: the same path online updates take
            order = rng.permutation(len(prompts))
            self.model.partial_fit(features[order], target[order])
        self.max_length = float(max(lengths))
        return self

    def update(self, prompts: list[list[int]], lengths: list[int]) -> None:
        """One online step on finished requests' true lengths."""
        if not prompts:
            return
        if self.model is None:
            self.model = self._new_model()
        self.model.partial_fit(self._features(prompts), np.log1p(np.asarray(lengths, dtype=np.float64)))
        self.max_length = max(self.max_length, float(max(lengths)))

    def predict(self, prompts: list[list[int]]) -> list[float]:
        if self.model is None:
            raise RuntimeError("LengthRegressor is not trained: call fit() or load a trained one")
        if not prompts:
            return []
        log_length = self.model.predict(self._features(prompts))
        return np.clip(np.expm1(log_length), 1.0, self.max_length).tolist()

    def save(self, path):
        if self.model is None:
            raise RuntimeError("cannot save an untrained LengthRegressor")
        meta = {"n_features": self.n_features, "alpha": self.alpha, "epochs": self.epochs, "seed": self.seed,
                "max_length": self.max_length, "t": float(self.model.t_)}
        return save_arrays(path, self.kind, meta, coef=self.model.coef_.astype(np.float32),
                           intercept=self.model.intercept_)

    @classmethod
    def load(cls, path) -> "LengthRegressor":
        meta, arrays = read_arrays(path)
        predictor = cls(meta["n_features"], meta["alpha"], meta["epochs"], meta["seed"])
        predictor.max_length = meta["max_length"]
        model = predictor._new_model()
        model.coef_ = arrays["coef"].astype(np.float64)
        model.intercept_ = arrays["intercept"].astype(np.float64)
        model.t_ = meta["t"]
        model.n_features_in_ = predictor.n_features + 1
        predictor.model = model
        return predictor
