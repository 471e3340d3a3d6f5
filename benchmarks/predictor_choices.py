"""Compare output-length predictor designs by 5-fold cross-validation on labelled prompts.

    python benchmarks/predictor_choices.py PROMPTS.jsonl LABELS.jsonl

LABELS is a `tdpipe run` / `tdpipe train-predictor` answers file of the served model. Prints MAE
and bucket accuracy per design, and each design's MAE as a multiple of the best constant's (the
training folds' median); the shipped `sklearn` predictor is the prompt-only design chosen from
this. The "probe" rows are the after-prefill length probe (`predictors/probe.py`) on the model's
hidden state of the last prompt token after that many layers.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from tdpipe_hf.models import load_model_and_tokenizer
from tdpipe_hf.predictors import ConstantPredictor, HiddenStateProbe, LearnedLengthPredictor
from tdpipe_hf.predictors.probe import last_token_states
from tdpipe_hf.apps.training import FixedGuess, evaluate, read_labels


class RidgeOn:
    """A Ridge regression on log length over a feature function (for comparison only)."""

    def __init__(self, features, alpha=1.0):
        self.features, self.alpha = features, alpha

    def fit(self, prompts, lengths):
        self.model = Ridge(alpha=self.alpha).fit(self.features(prompts), np.log1p(lengths))
        self.cap = max(lengths)
        return self

    def predict(self, prompts):
        return np.clip(np.expm1(self.model.predict(self.features(prompts))), 1, self.cap)


def main(prompts_path: str, labels_path: str) -> None:
    model, tokenizer = load_model_and_tokenizer()
    prompts, lengths = read_labels(prompts_path, labels_path, tokenizer)
    lengths_arr = np.array(lengths)
    print(f"{len(prompts)} labelled prompts; mean length {lengths_arr.mean():.1f}, median {np.median(lengths_arr):.0f}, "
          f"at the cap {np.mean(lengths_arr >= lengths_arr.max()):.1%}")
    embedding = model.get_input_embeddings().weight.detach().numpy()
    hashed = LearnedLengthPredictor()

    def mean_embedding(batch):
        return np.stack([embedding[p].mean(axis=0) for p in batch] )

    def hashed_features(batch):
        return hashed._features(batch)

    def embedding_and_length(batch):
        return np.hstack([mean_embedding(batch), np.log1p([[len(p)] for p in batch])])

    class OnStates:
        """A design fitted on per-prompt feature rows (hidden states), looked up by prompt."""

        def __init__(self, rows, make):
            self.rows, self.make = rows, make

        def fit(self, batch, lengths):
            self.model = self.make().fit(self.rows[[index[tuple(p)] for p in batch]], np.asarray(lengths))
            return self

        def predict(self, batch):
            return self.model.predict(self.rows[[index[tuple(p)] for p in batch]])

    index = {tuple(p): i for i, p in enumerate(prompts)}
    layers = [10, 15, 20, 26] if model.config.num_hidden_layers > 26 else [model.config.num_hidden_layers // 2]
    states = last_token_states(model, prompts, layers, progress=True)
    designs = {
        "median (the best constant)": FixedGuess,
        "mean": ConstantPredictor,
        "sklearn (hashed n-grams, SGD)": LearnedLengthPredictor,
        "hashed n-grams, Ridge": lambda: RidgeOn(hashed_features, alpha=1.0),
        "prompt length only, Ridge": lambda: RidgeOn(lambda b: np.log1p([[len(p)] for p in b])),
        "mean token embedding, Ridge": lambda: RidgeOn(embedding_and_length, alpha=10.0),
        **{f"probe after {layer} layers (after prefill)": (lambda layer=layer: OnStates(
            states[layer], lambda: HiddenStateProbe(layer))) for layer in layers},
    }
    folds = KFold(5, shuffle=True, random_state=0)
    constant = []
    for train, test in folds.split(prompts):
        constant.append(np.mean(np.abs(np.median(lengths_arr[train]) - lengths_arr[test])))
    for name, make in designs.items():
        mae, acc = [], []
        for train, test in folds.split(prompts):
            predictor = make().fit([prompts[i] for i in train], [lengths[i] for i in train])
            result = evaluate(name, predictor, [prompts[i] for i in test], [lengths[i] for i in test])
            mae.append(result.mae)
            acc.append(result.bucket_accuracy)
        print(f"{name:<44} MAE {np.mean(mae):6.1f} ± {np.std(mae):4.1f} ({np.mean(mae) / np.mean(constant):.2f}x "
              f"the best constant)   bucket accuracy {100 * np.mean(acc):5.1f} %")


if __name__ == "__main__":
    main(*sys.argv[1:3])
