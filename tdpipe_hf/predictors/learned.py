"""The default predictor: linear models on hashed token n-grams of the prompt, trained on the
served model's own output lengths (``tdpipe train-predictor``).

Why this design (measured with ``benchmarks/predictor_choices.py``, 5-fold on the 645 real
prompts, SmolLM2, cap 512): the lengths are bimodal. Half the answers run to the cap, the rest stop
early (median 111 tokens), so one regression lands between the modes and is right for neither.
A classifier for "runs to the cap" plus a regression for the length of the others did best
(MAE 163 tokens vs 184 for the mean, 173 for the median); mean token embeddings of the model or
gradient boosting did no better. It needs only token ids (no tokenizer, no forward pass), ships
as a small file, and ``partial_fit`` lets finished requests keep teaching it online.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import SGDClassifier, SGDRegressor

from .base import median_length, read_arrays, save_arrays, two_outcomes


def token_ngrams(ids: list[int]) -> list[str]:
    """Unigrams and bigrams of token ids as strings, for the hashing vectorizer."""
    grams = [str(t) for t in ids]
    return grams + [f"{a}_{b}" for a, b in zip(ids, ids[1:])]


class LearnedLengthPredictor:
    kind = "sklearn"

    def __init__(self, n_features: int = 1 << 14, alpha: float = 1e-4, epochs: int = 30, seed: int = 0):
        self.n_features = n_features
        self.alpha = alpha
        self.epochs = epochs
        self.seed = seed
        self.max_length = 0.0  # the cap seen in training: lengths >= it "ran to the cap"
        self.length_spread = None  # std of log length of "stops earlier" answers around the guess, out of sample
        self.short_trained = False
        self.classifier = SGDClassifier(loss="log_loss", alpha=alpha, random_state=seed)
        self.regressor = SGDRegressor(alpha=alpha, eta0=0.01, random_state=seed)
        self._hasher = HashingVectorizer(analyzer=token_ngrams, n_features=n_features, alternate_sign=False,
                                         norm="l2")

    def _features(self, prompts: list[list[int]]) -> sparse.csr_matrix:
        grams = self._hasher.transform(prompts)
        size = np.log1p([[len(p)] for p in prompts]) / math.log(4096)
        return sparse.hstack([grams, sparse.csr_matrix(size)], format="csr")

    def _step(self, features, lengths: np.ndarray) -> None:
        """One partial_fit pass: the cap classifier on all, the length regression on the rest."""
        at_cap = lengths >= self.max_length
        self.classifier.partial_fit(features, at_cap, classes=[False, True])
        short = np.flatnonzero(~at_cap)
        if short.size:
            self.regressor.partial_fit(features[short], lengths[short] / self.max_length)
            self.short_trained = True

    def fit(self, prompts: list[list[int]], lengths: list[int]) -> "LearnedLengthPredictor":
        if len(prompts) != len(lengths):
            raise ValueError(f"fit got {len(prompts)} prompts but {len(lengths)} lengths")
        if not prompts:
            raise ValueError("fit needs at least one (prompt, length) pair")
        features, target = self._features(prompts), np.asarray(lengths, dtype=np.float64)
        self.max_length = float(target.max())
        rng = np.random.default_rng(self.seed)
        for _ in range(self.epochs):  # shuffled passes of partial_fit: the path online updates take
            order = rng.permutation(len(prompts))
            self._step(features[order], target[order])
        return self

    def update(self, prompts: list[list[int]], lengths: list[int]) -> None:
        """One online step on finished requests' true lengths."""
        if not prompts:
            return
        target = np.asarray(lengths, dtype=np.float64)
        self.max_length = max(self.max_length, float(target.max()))
        self._step(self._features(prompts), target)

    def cap_probability(self, prompts: list[list[int]]) -> list[float]:
        """How likely each answer runs to the cap: the predictor's uncertainty, per prompt."""
        return self._parts(prompts)[0].tolist() if prompts else []

    def _parts(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(probability of running to the cap, length if it stops earlier) per prompt."""
        self._check_trained()
        features = self._features(prompts)
        at_cap = self.classifier.predict_proba(features)[:, 1]
        if self.short_trained:
            short = np.clip(self.regressor.predict(features) * self.max_length, 1.0, max(self.max_length - 1, 1.0))
        else:
            short = np.full(len(prompts), self.max_length / 2)
        return at_cap, short

    def predict(self, prompts: list[list[int]]) -> list[float]:
        """The median of the predicted length distribution (the lowest expected absolute error)."""
        if not prompts:
            return []
        return median_length(*self._parts(prompts), self.max_length, self.length_spread)

    def predict_outcomes(self, prompts: list[list[int]]) -> list[list[tuple[float, float]]]:
        """Both outcomes with their probabilities: planning with the whole distribution keeps the
        sum over many requests right, where the hard class over-books KV (half the answers are
        "probably at the cap" and most of them stop early)."""
        if not prompts:
            return []
        return two_outcomes(*self._parts(prompts), self.max_length)

    @property
    def is_trained(self) -> bool:
        return hasattr(self.classifier, "coef_")

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the sklearn length predictor is not trained: fit() it or load a trained one")

    def save(self, path):
        self._check_trained()
        meta = {"n_features": self.n_features, "alpha": self.alpha, "epochs": self.epochs, "seed": self.seed,
                "max_length": self.max_length, "short_trained": self.short_trained,
                "length_spread": self.length_spread,
                "classifier_t": float(self.classifier.t_),
                "regressor_t": float(getattr(self.regressor, "t_", 1.0))}
        arrays = {"classifier_coef": self.classifier.coef_.astype(np.float32),
                  "classifier_intercept": self.classifier.intercept_}
        if self.short_trained:
            arrays.update(regressor_coef=self.regressor.coef_.astype(np.float32),
                          regressor_intercept=self.regressor.intercept_)
        return save_arrays(path, self.kind, meta, **arrays)

    @classmethod
    def load(cls, path) -> "LearnedLengthPredictor":
        meta, arrays = read_arrays(path)
        predictor = cls(meta["n_features"], meta["alpha"], meta["epochs"], meta["seed"])
        predictor.max_length = meta["max_length"]
        predictor.length_spread = meta.get("length_spread")
        width = predictor.n_features + 1
        # restore the fitted state partial_fit and predict read, so loaded models keep learning online
        clf = predictor.classifier
        clf.coef_ = arrays["classifier_coef"].astype(np.float64)
        clf.intercept_ = arrays["classifier_intercept"].astype(np.float64)
        clf.classes_ = np.array([False, True])
        clf.t_, clf.n_features_in_ = meta["classifier_t"], width
        if meta["short_trained"]:
            reg = predictor.regressor
            reg.coef_ = arrays["regressor_coef"].astype(np.float64)
            reg.intercept_ = arrays["regressor_intercept"].astype(np.float64)
            reg.t_, reg.n_features_in_ = meta["regressor_t"], width
            predictor.short_trained = True
        return predictor
