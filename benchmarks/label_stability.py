"""How far does a prompt decide its answer's length, and do near-identical copies of the training
prompts teach the length predictors more? (issue 21)

Reads the original labels (``train-predictor``'s lengths file) and the lengths of the answers to
the copies written by ``benchmarks/perturbed_prompts.py`` (ids ``KIND:ID``), then prints:

1. Stability: for each kind of copy, how often its answer runs to the cap when the original's
   does (and does not), and how often the two lengths are equal. ``same`` (the prompt unchanged,
   answered again in other batches) is the engine's own noise.
2. What the prompt's meaning can tell at best: on prompts with an answer for the original and
   each copy of ``--kinds`` (default ``space,stop``), the error of guessing each answer's length
   by the median of its prompt's answers (in-sample for that prompt, so optimistic: a predictor
   that knew each meaning's length distribution exactly would do about this well) and the
   original's by the mean of its copies', as a multiple of the best constant's error (the median
   of all original lengths).
3. Whether the copies help as training data: the prompt-only predictor (``sklearn``) and the
   length probe after prefill, each fitted on ``train-predictor``'s train split (seed 0, 20 % held
   out) with and without the copies of the training prompts, scored on the held-out originals,
   and by 5-fold cross-validation over all prompts (a prompt's copies in the same fold as it).

    python benchmarks/label_stability.py ../shared/data/prompts.jsonl \
        benchmarks/data/prompts.SmolLM2-135M-Instruct.lengths.jsonl \
        benchmarks/data/prompts.SmolLM2-135M-Instruct.lengths.copies.jsonl [--probe-layers 20]

The last file holds SmolLM2's answer lengths for the ``space``, ``stop``, ``case`` and ``newline``
copies of all 645 prompts and the ``same`` copies of the first 160 (``perturbed_prompts.py``, then
``tdpipe run --max-new-tokens 512`` at 1 stage, 2026-12-07); ``train-predictor --augment`` reads
the train split's copies from it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from sklearn.model_selection import KFold

from tdpipe_hf.apps.offline import Job, answer_lengths, parse_line, read_jobs, tokenize_job
from tdpipe_hf.apps.training import Copies, copy_line, cross_validate, split, take
from tdpipe_hf.models import load_model_and_tokenizer
from tdpipe_hf.predictors.learned import LearnedLengthPredictor
from tdpipe_hf.predictors.probe import HiddenStateProbe, last_token_states


def stability(original: dict[str, int], copies: dict[str, dict[str, int]], cap: int) -> None:
    print("1. answers of near-identical prompts (cap = %d)" % cap)
    print(f"   {'kind':<6} {'prompts':>7} {'cap if orig. at cap':>20} {'cap if orig. not':>17} "
          f"{'same cap class':>15} {'same length':>12} {'median |diff|':>14}")
    for kind, lengths in copies.items():
        ids = [i for i in lengths if i in original]
        a = np.array([original[i] for i in ids])
        b = np.array([lengths[i] for i in ids])
        at_a, at_b = a >= cap, b >= cap
        print(f"   {kind:<6} {len(ids):>7} {at_b[at_a].mean():>20.1%} {at_b[~at_a].mean():>17.1%} "
              f"{(at_a == at_b).mean():>15.1%} {(a == b).mean():>12.1%} {np.median(np.abs(a - b)):>14.0f}")


def meaning_bound(original: dict[str, int], copies: dict[str, dict[str, int]], kinds: list[str], ids: list[str],
                  label: str) -> None:
    ids = [i for i in ids if all(i in copies.get(k, {}) for k in kinds)]
    if not ids:
        return
    answers = np.array([[original[i], *(copies[k][i] for k in kinds)] for i in ids], dtype=np.float64)
    constant = np.median(answers[:, 0])
    base = np.abs(answers[:, 0] - constant).mean()
    own_median = np.abs(answers - np.median(answers, axis=1, keepdims=True)).mean()
    own_base = np.abs(answers - constant).mean()
    siblings = np.abs(answers[:, 0] - answers[:, 1:].mean(axis=1)).mean()
    n = answers.shape[1]
    print(f"   {label}: {len(ids)} prompts; best constant {constant:.0f} tokens, MAE {base:.1f} on the originals, "
          f"{own_base:.1f} on all {n} answers")
    print(f"     each answer guessed by its prompt's median of {n}: MAE {own_median:.1f} "
          f"({own_median / own_base:.2f}x the constant)")
    print(f"     the original guessed by the mean of its {n - 1} copies: MAE {siblings:.1f} ({siblings / base:.2f}x)")


def compare_training(name: str, make, rows, lengths: np.ndarray, copies: Copies, train: np.ndarray,
                     test: np.ndarray) -> None:
    """``make``'s MAE on the held-out originals and by 5-fold cross-validation, trained on the
    originals alone and with their ``copies``, as multiples of the best constant's."""
    def held_out(training_rows) -> float:
        model = make().fit(*training_rows)
        return float(np.abs(np.asarray(model.predict(take(rows, test))) - lengths[test]).mean())

    constant = np.abs(lengths[test] - np.median(lengths[train])).mean()
    alone = held_out((take(rows, train), lengths[train]))
    augmented = held_out(copies.training_rows(rows, lengths, train))
    folds = KFold(5, shuffle=True, random_state=0).split(lengths)
    cv_constant = np.mean([np.abs(lengths[te] - np.median(lengths[tr])).mean() for tr, te in folds])
    cv_alone = cross_validate(make, rows, lengths).mae / cv_constant
    cv_copies = cross_validate(make, rows, lengths, copies=copies).mae / cv_constant
    print(f"   {name:<28} held out: alone {alone:6.1f} ({alone / constant:.2f}x), with copies {augmented:6.1f} "
          f"({augmented / constant:.2f}x) | 5-fold: alone {cv_alone:.2f}x, with copies {cv_copies:.2f}x")


def copies_of(kinds: list[str], inputs: dict, copy_lengths: dict) -> Copies:
    """The answered copies of ``kinds`` as one ``Copies`` (``inputs[kind]``, ``copy_lengths[kind]``
    aligned with the originals; a length is None where a copy has no answer)."""
    rows, lengths, origin = [], [], []
    for kind in kinds:
        for i, length in enumerate(copy_lengths[kind]):
            if length is not None:
                rows.append(inputs[kind][i])
                lengths.append(length)
                origin.append(i)
    if rows and isinstance(rows[0], np.ndarray):
        rows = np.stack(rows)
    return Copies(rows, np.array(lengths, dtype=np.float64), np.array(origin, dtype=int))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", help="the labelled prompts (JSONL with 'id' and 'prompt')")
    parser.add_argument("labels", help="their lengths (JSONL with 'id' and 'completion_tokens')")
    parser.add_argument("answers", help="the copies' lengths: tdpipe run's answers to perturbed_prompts.py's output")
    parser.add_argument("--model", help="HF directory or .gguf (default: the shipped SmolLM2)")
    parser.add_argument("--probe-layers", default="20", help="comma-separated probe layers ('' skips the probe)")
    parser.add_argument("--kinds", default="space,stop", help="the copies sections 2 and 3 use (default space,stop)")
    parser.add_argument("--cap", type=int, default=512)
    args = parser.parse_args()

    jobs = {job.id: job for _, job in read_jobs(args.prompts) if isinstance(job, Job)}
    original = answer_lengths(args.labels)
    copies: dict[str, dict[str, int]] = defaultdict(dict)
    for key, length in answer_lengths(args.answers).items():
        kind, _, pid = key.partition(":")
        copies[kind][pid] = length
    stability(original, copies, args.cap)

    print("2. what the prompt's meaning can tell at best")
    order = [pid for pid in jobs if pid in original]  # input order: the order split() indexes
    train, test = split(len(order), 0.2, 0)
    kinds = [k for k in args.kinds.split(",") if k]
    meaning_bound(original, copies, kinds, order, "all prompts")
    meaning_bound(original, copies, kinds, [order[i] for i in test], "held-out split")

    print("3. the copies of the training prompts as more training data")
    model, tokenizer = load_model_and_tokenizer(args.model)
    use_template = getattr(tokenizer, "chat_template", None) is not None
    ids = [tokenize_job(tokenizer, jobs[pid], use_template) for pid in order]
    lengths = np.array([original[pid] for pid in order], dtype=np.float64)
    copy_ids = {k: [tokenize_job(tokenizer, parse_line(json.dumps(copy_line(jobs[pid], k)), 0), use_template)
                    for pid in order] for k in kinds}
    copy_lengths = {k: [copies[k].get(pid) for pid in order] for k in kinds}
    compare_training("prompt only (sklearn)", LearnedLengthPredictor, ids, lengths,
                     copies_of(kinds, copy_ids, copy_lengths), train, test)
    layers = [int(x) for x in args.probe_layers.split(",") if x]
    if layers:
        states = last_token_states(model, ids, layers, progress=True)
        copy_states = {k: last_token_states(model, copy_ids[k], layers, progress=True) for k in kinds}
        for layer in layers:
            for C in (0.001, 0.003, 0.01):
                compare_training(f"probe, layer {layer}, C {C}", lambda layer=layer, C=C: HiddenStateProbe(layer, C=C),
                                 states[layer], lengths,
                                 copies_of(kinds, {k: copy_states[k][layer] for k in kinds}, copy_lengths), train, test)


if __name__ == "__main__":
    main()
