"""``tdpipe train-predictor``: label prompts with the served model's own output lengths, fit an
output-length predictor, report its accuracy on a held-out split against the best constant
guess, and save it under the model's name; with the model at hand, also fit a length probe on its
hidden states (``predictors.probe``), saved beside it.

Labels come from ``run_batch`` (the engine itself, greedy, natural EOS, a ``max_new_tokens`` cap),
so labelling is resumable like any ``tdpipe run`` job and its tokens are HF ``generate``'s tokens.
"""

from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import plugins
from .offline import Job, answer_lengths, read_jobs, run_batch, tokenize_job

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


def labelled_jobs(input_path: str | Path, answers_path: str | Path) -> tuple[list[Job], list[int]]:
    """(job, output length) for every input line that has an answer, in input order: the order
    :func:`split` indexes."""
    lengths = answer_lengths(answers_path)
    jobs, labels = [], []
    for _, job in read_jobs(input_path):
        if isinstance(job, Job) and job.id in lengths:
            jobs.append(job)
            labels.append(lengths.pop(job.id))
    return jobs, labels


def read_labels(input_path: str | Path, answers_path: str | Path, tokenizer, chat_template: bool = True
                ) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, output length) for every input line that has an answer, tokenized the way
    ``run_batch`` tokenized it."""
    jobs, labels = labelled_jobs(input_path, answers_path)
    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    return [tokenize_job(tokenizer, job, use_template) for job in jobs], labels


# Near-identical copies of a prompt (``train-predictor --augment``). Whether SmolLM2's greedy
# answer runs to the cap changes under such a copy for about a fifth of the prompts (docs/predictor.md,
# *Near-identical prompts*), so each copy is a label of its own for nearly the same meaning.
def _first_letter_case_toggled(text: str) -> str:
    at = next((i for i, c in enumerate(text) if c.swapcase() != c), None)
    return text + " " if at is None else text[:at] + text[at].swapcase() + text[at + 1:]


PROMPT_COPIES = {
    "space": lambda text: text.rstrip() + " ",
    "stop": lambda text: text.rstrip()[:-1] if text.rstrip()[-1:] in ".?!" else text.rstrip() + ".",
    "case": _first_letter_case_toggled,
    "newline": lambda text: text.rstrip() + "\n",
}


def copy_line(job: Job, kind: str) -> dict:
    """The ``tdpipe run`` input line of ``job``'s ``kind`` copy, id ``KIND:ID``: its last user
    message (or its prompt) changed by ``PROMPT_COPIES[kind]``."""
    if kind not in PROMPT_COPIES:
        raise ValueError(f"unknown prompt copy {kind!r}; known: {', '.join(PROMPT_COPIES)}")
    change = PROMPT_COPIES[kind]
    line: dict = {"id": f"{kind}:{job.id}"}
    if job.messages is None:
        line["prompt"] = change(job.prompt)
    else:
        messages = [dict(m) for m in job.messages]
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        messages[last]["content"] = change(str(messages[last]["content"]))
        line["messages"] = messages
    if job.max_new_tokens is not None:
        line["max_new_tokens"] = job.max_new_tokens
    return line


@dataclass
class Copies:
    """Labelled copies of labelled prompts, as extra training rows: ``origin[i]`` is the index of
    the prompt that row ``i`` copies, so that a copy trains only where its original does (never
    when its original is being tested, in the held-out split or a cross-validation fold)."""

    inputs: list | np.ndarray  # prompt ids, or hidden states
    lengths: np.ndarray
    origin: np.ndarray

    def within(self, index: np.ndarray) -> "Copies":
        """The copies of the prompts at ``index``, their origins renumbered to positions in it."""
        position = {int(p): i for i, p in enumerate(index)}
        keep = np.array([i for i, o in enumerate(self.origin) if int(o) in position], dtype=int)
        return Copies(take(self.inputs, keep), self.lengths[keep],
                      np.array([position[int(self.origin[i])] for i in keep], dtype=int))

    def training_rows(self, inputs, lengths: np.ndarray, index: np.ndarray):
        """(inputs, lengths) of the prompts at ``index`` followed by their copies."""
        mine = self.within(index)
        if isinstance(inputs, np.ndarray):
            rows = np.concatenate([inputs[index], mine.inputs]) if len(mine.lengths) else inputs[index]
        else:
            rows = take(inputs, index) + list(mine.inputs)
        return rows, np.concatenate([np.asarray(lengths, dtype=np.float64)[index], mine.lengths])


def copies_within(copies: Copies | None, index: np.ndarray) -> Copies | None:
    """``copies.within(index)``, or None when there are no copies of those prompts."""
    mine = copies.within(index) if copies is not None else None
    return mine if mine is not None and len(mine.lengths) else None


def read_copies(copies_path: str | Path, answers_path: str | Path, tokenizer, origins: list[str],
                chat_template: bool = True) -> Copies:
    """The answered copies of ``copies_path`` (ids ``KIND:ID``), tied to their prompts' positions
    in ``origins`` (the labelled prompts' ids, in order); copies of other ids are left out."""
    jobs, lengths = labelled_jobs(copies_path, answers_path)
    position = {job_id: i for i, job_id in enumerate(origins)}
    use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
    keep = [(job, n) for job, n in zip(jobs, lengths) if job.id.partition(":")[2] in position]
    return Copies([tokenize_job(tokenizer, job, use_template) for job, _ in keep],
                  np.array([n for _, n in keep], dtype=np.float64),
                  np.array([position[job.id.partition(":")[2]] for job, _ in keep], dtype=int))


def label_copies(model, tokenizer, input_path: str | Path, labels: str | Path, kinds: list[str],
                 test_fraction: float, seed: int, max_new_tokens: int) -> Copies:
    """Answer the ``kinds`` copies of the train split's labelled prompts with the engine, as
    ``train-predictor --augment`` does: their prompts go to ``LABELS_STEM.copies.prompts.jsonl``,
    their answers (resumable) to ``LABELS_STEM.copies`` + the labels' extension."""
    labels = Path(labels)
    prompts = labels.with_name(f"{labels.stem}.copies.prompts.jsonl")
    answers = labels.with_name(f"{labels.stem}.copies{labels.suffix}")
    jobs, _ = labelled_jobs(input_path, labels)
    train, _ = split(len(jobs), test_fraction, seed)
    with open(prompts, "w", encoding="utf-8") as out:
        for kind in kinds:
            out.writelines(json.dumps(copy_line(jobs[i], kind)) + "\n" for i in train)
    print(f"labelling {len(kinds) * len(train)} copies of the train split's prompts -> {answers}", file=sys.stderr)
    print(run_batch(model, tokenizer, prompts, answers, max_new_tokens=max_new_tokens).format(), file=sys.stderr)
    return read_copies(prompts, answers, tokenizer, [job.id for job in jobs])


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
    copies: "CopiesChoice | None" = None

    def format(self) -> str:
        choice = f"  {self.copies.format()}\n" if self.copies else ""
        return (f"held-out split: {self.test_size} prompts (trained on {self.train_size})\n"
                f"  {self.learned.format()}\n{choice}  {self.baseline.format()}\n{_spread_line(self.spread)}"
                f"saved {self.path}")


@dataclass
class CopiesChoice:
    """Whether the prompt-only predictor trains on the copies too: chosen by 5-fold MAE inside the
    train split (the copies teach it more on some workloads and mislead it on others), with the
    other choice's held-out accuracy kept for the report."""

    count: int
    used: bool
    with_copies: float  # 5-fold MAE inside the train split
    without: float
    other: Accuracy  # the choice not taken, on the held-out split

    def format(self) -> str:
        verdict = "trained with" if self.used else "left out"
        return (f"copies: {verdict} {self.count} copies of the train prompts (5-fold MAE in the train split "
                f"{self.with_copies:.1f} with them, {self.without:.1f} without)\n  {self.other.format()}")


def _spread_line(spread: float | None) -> str:
    return "" if spread is None else f"  spread of early answers around the guess: {spread:.2f} in log length (5-fold)\n"


def fit_and_report(prompts: list[list[int]], lengths: list[int], output: str | Path, kind: str = "sklearn",
                   test_fraction: float = 0.2, seed: int = 0, copies: Copies | None = None) -> TrainingReport:
    """Fit ``kind`` on the train split, compare with the best constant on the test split, save it.
    ``copies`` of train-split prompts (``--augment``) train it too where 5-fold cross-validation
    inside the train split says they help."""
    if len(prompts) < 10:
        raise ValueError(f"need at least 10 labelled prompts to train and test a predictor, got {len(prompts)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be between 0 and 1, got {test_fraction}")
    train, test = split(len(prompts), test_fraction, seed)
    make = plugins.load(plugins.PREDICTORS, kind)
    inputs, target = take(prompts, train), np.asarray(take(lengths, train), dtype=np.float64)
    test_inputs, test_lengths = take(prompts, test), take(lengths, test)
    mine = copies_within(copies, train)  # origins: positions in ``train``
    choice = None
    if mine:
        with_copies = cross_validate(make, inputs, target, seed=seed, copies=mine)
        without = cross_validate(make, inputs, target, seed=seed)
        used = with_copies.mae < without.mae
        other_rows = (inputs, target) if used else mine.training_rows(inputs, target, np.arange(len(train)))
        other_model = make().fit(*other_rows)
        other_model.length_spread = (without if used else with_copies).spread
        other = evaluate("no copies" if used else "copies", other_model, test_inputs, test_lengths)
        choice = CopiesChoice(len(mine.lengths), used, with_copies.mae, without.mae, other)
        mine, validated = (mine, with_copies) if used else (None, without)
    else:
        validated = cross_validate(make, inputs, target, seed=seed)
    rows = mine.training_rows(inputs, target, np.arange(len(train))) if mine else (inputs, target)
    learned = make().fit(*rows)
    learned.length_spread = validated.spread
    median = FixedGuess(np.median(target))
    report = TrainingReport(len(train), len(test), evaluate(kind, learned, test_inputs, test_lengths),
                            evaluate("median", median, test_inputs, test_lengths), Path(output),
                            learned.length_spread, choice)
    report.path = learned.save(output)
    return report


def probe_layers(num_layers: int) -> list[int]:
    """Candidate layers for a length probe: from a third of the depth to the last but one (on
    SmolLM2 the middle of the network predicts best, the final layers worse)."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.33, 0.5, 0.6, 0.67, 0.75, 0.85)})


@dataclass
class CrossValidated:
    mae: float  # mean absolute error over the folds
    # How far answers that stop before the cap land from the "stops earlier" outcome the model
    # predicts for them: the standard deviation of log(1 + length) - log(1 + guess). Greedy prefill
    # plans that outcome as a log-normal of this spread (``GreedyPrefill._state``). None when the
    # model gives no single "stops earlier" outcome.
    spread: float | None


def cross_validate(make, inputs, lengths: np.ndarray, folds: int = 5, seed: int = 0,
                   copies: Copies | None = None) -> CrossValidated:
    """``make().fit`` over ``folds`` folds of (inputs, lengths), out of sample; each fold also
    trains on the ``copies`` of its training prompts. ``inputs``: an array, or a list of prompts.
    One fit per fold gives both figures: the spread from every fold's early answers, then each
    fold's MAE with that spread (a predictor's point guess, the median of its distribution, uses it)."""
    from sklearn.model_selection import KFold

    lengths = np.asarray(lengths, dtype=np.float64)
    cap = lengths.max()
    fitted, residuals, spread_known = [], [], True
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(lengths):
        rows, target = (copies.training_rows(inputs, lengths, train) if copies is not None
                        else (take(inputs, train), lengths[train]))
        model = make().fit(rows, target)
        tested = take(inputs, test)
        fitted.append((model, tested, lengths[test]))
        spread_known = spread_known and hasattr(model, "predict_outcomes")
        for outcomes, truth in zip(model.predict_outcomes(tested) if spread_known else [], lengths[test]):
            early = [length for length, _ in outcomes if length < cap]
            spread_known = spread_known and len(early) == 1
            if spread_known and truth < cap:
                residuals.append(np.log1p(truth) - np.log1p(early[0]))
    spread = float(np.std(residuals)) if spread_known and len(residuals) >= 2 else None
    errors = []
    for model, tested, truth in fitted:
        if spread is not None:
            model.length_spread = spread
        errors.append(np.mean(np.abs(np.asarray(model.predict(tested)) - truth)))
    return CrossValidated(float(np.mean(errors)), spread)


def take(inputs, index: np.ndarray):
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
    copies: int = 0  # copies of train-split prompts it was also trained on (--augment)
    without_copies: Accuracy | None = None  # the same layer and C, fitted on the prompts alone

    def format(self) -> str:
        tried = ", ".join(f"{layer}: {mae:.1f}" for layer, mae in self.layer_errors.items())
        trained = f", trained with {self.copies} copies of the train prompts" if self.copies else ""
        without = f"\n  {self.without_copies.format()}" if self.without_copies else ""
        return (f"length probe after prefill: layer {self.layer}, C {self.C}{trained} (5-fold MAE on the train "
                f"split by layer: {tried})\n  {self.probe.format()}{without}\n  {self.baseline.format()}\n"
                f"{_spread_line(self.spread)}saved {self.path}")


def fit_probe_and_report(model, prompts: list[list[int]], lengths: list[int], output: str | Path,
                         test_fraction: float = 0.2, seed: int = 0, progress: bool = True,
                         copies: Copies | None = None) -> ProbeReport:
    """Fit a hidden-state length probe on the train split of the same split ``fit_and_report``
    uses, its layer and regularisation chosen by cross-validation inside the train split, report
    it on the test split against the best constant (the train split's median) and save it.
    ``copies`` of train-split prompts (``--augment``) train it too, in every fold where their
    original trains; the report then also gives the same probe fitted without them."""
    from ..predictors.probe import HiddenStateProbe, last_token_states

    train, test = split(len(prompts), test_fraction, seed)
    candidates = probe_layers(model.config.num_hidden_layers)
    states = last_token_states(model, prompts, candidates, progress=progress)
    mine = copies_within(copies, train)  # origins: positions in ``train``
    copy_states = last_token_states(model, mine.inputs, candidates, progress=progress) if mine else None

    def copies_at(layer: int) -> Copies | None:
        return Copies(copy_states[layer], mine.lengths, mine.origin) if mine else None

    target = np.asarray(lengths, dtype=np.float64)
    grid = {(layer, C): cross_validate(lambda layer=layer, C=C: HiddenStateProbe(layer, C=C),
                                       states[layer][train], target[train], seed=seed, copies=copies_at(layer))
            for layer in candidates for C in PROBE_REGULARISATION}
    layer, C = min(grid, key=lambda cell: grid[cell].mae)
    errors = {n: min(found.mae for (m, _), found in grid.items() if m == n) for n in candidates}
    rows, rows_target = states[layer][train], target[train]
    if mine:
        rows, rows_target = copies_at(layer).training_rows(rows, rows_target, np.arange(len(train)))
    probe = HiddenStateProbe(layer, C=C).fit(rows, rows_target)
    probe.length_spread = grid[layer, C].spread
    test_states, test_lengths = states[layer][test], target[test].tolist()
    without = None
    if mine:
        alone = HiddenStateProbe(layer, C=C).fit(states[layer][train], target[train])
        alone.length_spread = cross_validate(lambda: HiddenStateProbe(layer, C=C), states[layer][train],
                                             target[train], seed=seed).spread
        without = evaluate("no copies", alone, test_states, test_lengths)
    return ProbeReport(layer, C, errors, evaluate("probe", probe, test_states, test_lengths),
                       evaluate("median", FixedGuess(np.median(target[train])), test_states, test_lengths),
                       probe.save(output), probe.length_spread, len(mine.lengths) if mine else 0, without)


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
    ratio = (f"ratio {learned.mae / constant.mae:.2f}x the best constant's error" if constant.mae > 0 else
             "no ratio: the best constant is exact on these lengths (they are all the same)")
    return (f"{len(lengths)} labelled prompts\n  {learned.format()}\n  {constant.format()}   (the best constant, "
            f"{median.length:.0f} tokens)\n  {ratio}")
