"""``tdpipe train-predictor``: label prompts with the served model's own output lengths, fit an
output-length predictor, report its accuracy on a held-out split against the best constant
guess, and save it under the model's name; with the model at hand, also fit a length probe on its
hidden states (``predictors.probe``), saved beside it.

Labels come from ``run_batch`` (the engine itself, greedy, natural EOS, a ``max_new_tokens`` cap),
so labelling is resumable like any ``tdpipe run`` job and its tokens are HF ``generate``'s tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import plugins
from .offline import Job, answer_lengths, read_jobs, tokenize_job

BUCKET_EDGES = (32, 64, 128, 256, 512)  # buckets: <32, 32-63, 64-127, 128-255, 256-511, >=512


def length_bucket(length: float) -> int:
    return bisect.bisect_right(BUCKET_EDGES, length)


@dataclass
class Accuracy:
    name: str
    mae: float
    bucket_accuracy: float
    count: int

    def format(self) -> str:
        return f"{self.name:<10} MAE {self.mae:7.1f} tokens   bucket accuracy {100 * self.bucket_accuracy:5.1f} %"


class FixedGuess:
    """One length for every prompt: the median of the training lengths is the best constant for
    the mean absolute error, the bar a predictor must clear."""

    def __init__(self, length: float = 0.0):
        self.length = float(length)

    def fit(self, prompts, lengths) -> "FixedGuess":
        self.length = float(np.median(lengths))
        return self

    def predict(self, batch) -> list[float]:
        return [self.length] * len(batch)


def evaluate(name: str, predictor, prompts: list[list[int]], lengths: list[int]) -> Accuracy:
    predicted = np.asarray(predictor.predict(prompts), dtype=np.float64)
    truth = np.asarray(lengths, dtype=np.float64)
    buckets_hit = [length_bucket(p) == length_bucket(t) for p, t in zip(predicted, truth)]
    return Accuracy(name, float(np.mean(np.abs(predicted - truth))), float(np.mean(buckets_hit)), len(lengths))


def read_labels(input_path: str | Path, answers_path: str | Path, tokenizer, chat_template: bool = True
                ) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, output length) for every input line that has an answer, tokenized the way
    ``run_batch`` tokenized it."""
    lengths = answer_lengths(answers_path)
    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    prompts, labels = [], []
    for _, job in read_jobs(input_path):
        if isinstance(job, Job) and job.id in lengths:
            prompts.append(tokenize_job(tokenizer, job, use_template))
            labels.append(lengths.pop(job.id))
    return prompts, labels


def split(count: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * (1 - test_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


@dataclass
class TrainingReport:
    train_size: int
    test_size: int
    learned: Accuracy
    baseline: Accuracy
    path: Path
    spread: float | None = None  # of early answers' log length, 5-fold in the train split

    def format(self) -> str:
        return (f"held-out split: {self.test_size} prompts (trained on {self.train_size})\n"
                f"  {self.learned.format()}\n  {self.baseline.format()}\n{_spread_line(self.spread)}saved {self.path}")


def _spread_line(spread: float | None) -> str:
    return "" if spread is None else f"  spread of early answers around the guess: {spread:.2f} in log length (5-fold)\n"


def fit_and_report(prompts: list[list[int]], lengths: list[int], output: str | Path, kind: str = "sklearn",
                   test_fraction: float = 0.2, seed: int = 0) -> TrainingReport:
    """Fit ``kind`` on the train split, compare with the best constant on the test split, save it."""
    if len(prompts) < 10:
        raise ValueError(f"need at least 10 labelled prompts to train and test a predictor, got {len(prompts)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be between 0 and 1, got {test_fraction}")
    train, test = split(len(prompts), test_fraction, seed)

    make = plugins.load(plugins.PREDICTORS, kind)
    learned = make().fit(_take(prompts, train), _take(lengths, train))
    learned.length_spread = cross_validated_spread(make, _take(prompts, train), np.asarray(_take(lengths, train)),
                                                   seed=seed)
    median = FixedGuess(np.median(_take(lengths, train)))
    report = TrainingReport(len(train), len(test),
                            evaluate(kind, learned, _take(prompts, test), _take(lengths, test)),
                            evaluate("median", median, _take(prompts, test), _take(lengths, test)), Path(output),
                            learned.length_spread)
    report.path = learned.save(output)
    return report


def probe_layers(num_layers: int) -> list[int]:
    """Candidate layers for a length probe: from a third of the depth to the last but one (on
    SmolLM2 the middle of the network predicts best, the final layers worse)."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.33, 0.5, 0.6, 0.67, 0.75, 0.85)})


def cross_validated_mae(make, features: np.ndarray, lengths: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean absolute error of ``make().fit`` over ``folds`` folds of (features, lengths)."""
    from sklearn.model_selection import KFold

    errors = []
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(features):
        predicted = make().fit(features[train], lengths[train]).predict(features[test])
        errors.append(np.mean(np.abs(np.asarray(predicted) - lengths[test])))
    return float(np.mean(errors))


def cross_validated_spread(make, inputs, lengths: np.ndarray, folds: int = 5, seed: int = 0) -> float | None:
    """How far answers that stop before the cap land from the "stops earlier" outcome ``make()``
    predicts for them, out of sample: the standard deviation of log(1 + length) - log(1 + guess)
    over ``folds`` folds. Greedy prefill plans that outcome as a log-normal of this spread (see
    ``GreedyPrefill._state``). None when the model gives no single "stops earlier" outcome."""
    from sklearn.model_selection import KFold

    lengths = np.asarray(lengths, dtype=np.float64)
    cap = lengths.max()
    residuals = []
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(lengths):
        model = make().fit(_take(inputs, train), lengths[train])
        if not hasattr(model, "predict_outcomes"):
            return None
        for outcomes, truth in zip(model.predict_outcomes(_take(inputs, test)), lengths[test]):
            early = [length for length, _ in outcomes if length < cap]
            if len(early) != 1:
                return None
            if truth < cap:
                residuals.append(np.log1p(truth) - np.log1p(early[0]))
    return float(np.std(residuals)) if len(residuals) >= 2 else None


def _take(inputs, index: np.ndarray):
    """The items of ``inputs`` (an array, or a list of prompts) at ``index``."""
    return inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]


PROBE_REGULARISATION = (0.001, 0.003, 0.01, 0.03)  # the cap classifier's C, searched with the layer


@dataclass
class ProbeReport:
    layer: int
    C: float
    layer_errors: dict[int, float]  # cross-validated MAE on the train split, per layer (at its best C)
    probe: Accuracy
    baseline: Accuracy
    path: Path
    spread: float | None = None

    def format(self) -> str:
        tried = ", ".join(f"{layer}: {mae:.1f}" for layer, mae in self.layer_errors.items())
        return (f"length probe after prefill: layer {self.layer}, C {self.C} (5-fold MAE on the train split by "
                f"layer: {tried})\n  {self.probe.format()}\n  {self.baseline.format()}\n"
                f"{_spread_line(self.spread)}saved {self.path}")


def fit_probe_and_report(model, prompts: list[list[int]], lengths: list[int], output: str | Path,
                         test_fraction: float = 0.2, seed: int = 0, progress: bool = True) -> ProbeReport:
    """Fit a hidden-state length probe on the train split of the same split ``fit_and_report``
    uses, its layer and regularisation chosen by cross-validation inside the train split, report
    it on the test split against the best constant (the train split's median) and save it."""
    from ..predictors.probe import HiddenStateProbe, last_token_states

    train, test = split(len(prompts), test_fraction, seed)
    candidates = probe_layers(model.config.num_hidden_layers)
    states = last_token_states(model, prompts, candidates, progress=progress)
    target = np.asarray(lengths, dtype=np.float64)
    grid = {(layer, C): cross_validated_mae(lambda layer=layer, C=C: HiddenStateProbe(layer, C=C),
                                            states[layer][train], target[train], seed=seed)
            for layer in candidates for C in PROBE_REGULARISATION}
    layer, C = min(grid, key=grid.get)
    errors = {n: min(mae for (m, _), mae in grid.items() if m == n) for n in candidates}
    probe = HiddenStateProbe(layer, C=C).fit(states[layer][train], target[train])
    probe.length_spread = cross_validated_spread(lambda: HiddenStateProbe(layer, C=C), states[layer][train],
                                                 target[train], seed=seed)
    test_states, test_lengths = states[layer][test], target[test].tolist()
    return ProbeReport(layer, C, errors, evaluate("probe", probe, test_states, test_lengths),
                       evaluate("median", FixedGuess(np.median(target[train])), test_states, test_lengths),
                       probe.save(output), probe.length_spread)


def read_lengths_file(path: str | Path, tokenizer, chat_template: bool = True) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, output length) from a JSONL of ``{"prompt" or "messages", "output_tokens"}``
    lines, tokenized as ``tdpipe run`` tokenizes them; a ValueError names the first bad line."""
    import json

    from .offline import BadLine, decode_line, parse_line

    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    prompts, lengths = [], []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                text = decode_line(raw)
                job = parse_line(text, number)
                length = json.loads(text).get("output_tokens")
            except BadLine as exc:
                raise ValueError(f"{path} line {number}: {exc}") from None
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"{path} line {number}: 'output_tokens' must be a whole number >= 0, got {length!r}")
            prompts.append(tokenize_job(tokenizer, job, use_template))
            lengths.append(length)
    if not prompts:
        raise ValueError(f"{path} has no labelled lines")
    return prompts, lengths


def compare_with_constant(name: str, predictor, prompts: list[list[int]], lengths: list[int]) -> str:
    """The predictor's MAE and bucket accuracy next to the best constant's (the median of these
    very lengths: in-sample for the constant, so a fair bar for the predictor)."""
    learned = evaluate(name, predictor, prompts, lengths)
    median = FixedGuess(np.median(lengths))
    constant = evaluate("median", median, prompts, lengths)
    return (f"{len(lengths)} labelled prompts\n  {learned.format()}\n  {constant.format()}   (the best constant, "
            f"{median.length:.0f} tokens)\n  ratio {learned.mae / max(constant.mae, 1e-9):.2f}x the best constant's error")
