"""Does the model's hidden state after k generated tokens predict the answer's length better than
the state at the end of the prompt (the shipped length probe's input)?

    python benchmarks/decode_probe.py [--prompts ../shared/data/prompts.jsonl]
        [--labels benchmarks/data/prompts.SmolLM2-135M-Instruct.lengths.jsonl]

The engine could refine a running request's prediction during decode as it does after prefill:
the stage that runs the probe's layer would send back the hidden state of one decode step. This
script measures whether that would pay, offline, on ``train-predictor``'s split (seed 0, 20 %
held out). It answers every prompt's first 64 tokens greedily (through the engine: HF's tokens),
reads decoder-layer outputs at the last prompt token and after k = 8, 16, 32, 64 generated tokens
from one plain forward of prompt + answer, and for the requests still running at k (true length
> k) compares on the held-out prompts:

- the best constant: the median length of the training requests still running at k;
- the point rule (greedy prefill's before 2026-12-07): the after-prefill probe's outcomes, those
  the request has outlived dropped, the likelier of the rest (the cap if none is left);
- the spread rule (since): the probe's "stops earlier" outcome as a log-normal of the spread
  ``train-predictor`` measures (5-fold in the train split), conditioned on lasting k tokens: the
  cap if it is then likelier, else that outcome's median past k;
- a probe refitted on the states after k tokens (its C by 5-fold cross-validation in the train
  split);
- "is it looping": a logistic regression on repetition in the k tokens so far (share of repeated
  4-grams, share of distinct tokens), as ROC AUC for "runs to the cap".
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import tdpipe_hf
from tdpipe_hf.apps.training import cross_validate, read_labels, split
from tdpipe_hf.predictors.probe import HiddenStateProbe

STEPS = (0, 8, 16, 32, 64)
LATE = (128, 256)  # the two rules need only the state after prefill: scored further on too
LAYERS = (15, 20, 26)
C_GRID = (0.0003, 0.001, 0.003, 0.01)


def states_after(model, prompts: list[list[int]], answers: list[list[int]]) -> dict[tuple[int, int], np.ndarray]:
    """{(layer, k): [prompts, hidden]}: decoder layer ``layer - 1``'s output at the token that
    follows k generated ones (k = 0: the last prompt token), from one forward per request."""
    out: dict[tuple[int, int], list] = {(layer, k): [] for layer in LAYERS for k in STEPS}
    current: dict[int, np.ndarray] = {}

    def keeper(layer: int):
        def keep(module, args, output):
            current[layer] = (output[0] if isinstance(output, tuple) else output)[0].float().numpy()
        return keep

    handles = [model.model.layers[layer - 1].register_forward_hook(keeper(layer)) for layer in LAYERS]
    try:
        with torch.inference_mode():
            for prompt, answer in zip(prompts, answers):
                model.model(torch.tensor([prompt + answer[:max(STEPS)]]))
                for layer in LAYERS:
                    for k in STEPS:
                        out[layer, k].append(current[layer][len(prompt) - 1 + min(k, len(answer))])
    finally:
        for handle in handles:
            handle.remove()
    return {key: np.stack(rows) for key, rows in out.items()}


def repetition(answer: list[int], k: int) -> list[float]:
    tokens = answer[:k]
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    if not grams:
        return [0.0, 1.0]
    return [1 - len(set(grams)) / len(grams), len(set(tokens)) / len(tokens)]


def point_rule(probe: HiddenStateProbe, states: np.ndarray, k: int, cap: float) -> np.ndarray:
    guesses = []
    for outcomes in probe.predict_outcomes(states):
        alive = [(length, p) for length, p in outcomes if length > k]
        guesses.append(max(alive, key=lambda pair: pair[1])[0] if alive else cap)
    return np.asarray(guesses)


def spread_rule(probe: HiddenStateProbe, states: np.ndarray, k: int, cap: float, spread: float) -> np.ndarray:
    from scipy.special import ndtr, ndtri

    guesses = []
    for (_, p_cap), (short, _) in probe.predict_outcomes(states):
        below = ndtr((np.log(k) - np.log(short)) / spread) if k > 0 else 0.0
        p_cap = p_cap / (p_cap + (1 - p_cap) * (1 - below))
        median = short * np.exp(spread * ndtri(min(max((below + 1) / 2, 1e-12), 1 - 1e-12)))
        guesses.append(cap if p_cap > 0.5 else min(max(median, k + 1), cap))
    return np.asarray(guesses)


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="../shared/data/prompts.jsonl")
    parser.add_argument("--labels", default="benchmarks/data/prompts.SmolLM2-135M-Instruct.lengths.jsonl")
    args = parser.parse_args()

    model, tokenizer = tdpipe_hf.from_pretrained()
    prompts, lengths = read_labels(args.prompts, args.labels, tokenizer)
    answers = model.generate_batch(prompts, max_new_tokens=max(STEPS), do_sample=False, progress_bar=True)
    agree = sum(len(a) == min(n, max(STEPS)) for a, n in zip(answers, lengths))
    print(f"{len(prompts)} prompts; answers as long as the labels say (up to {max(STEPS)}): {agree}")
    states = states_after(model, prompts, answers)
    lengths = np.asarray(lengths, dtype=np.float64)
    cap = lengths.max()
    train, test = split(len(lengths), 0.2, 0)
    print("| layer | k | held-out requests still running | at the cap | best constant MAE "
          "| point rule | spread rule | probe after k tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in LAYERS:
        after_prefill = HiddenStateProbe(layer, C=0.001).fit(states[layer, 0][train], lengths[train])
        spread = cross_validate(lambda: HiddenStateProbe(layer, C=0.001), states[layer, 0][train],
                                lengths[train]).spread
        for k in STEPS + LATE:
            tr, te = train[lengths[train] > k], test[lengths[test] > k]
            constant = np.mean(np.abs(np.median(lengths[tr]) - lengths[te]))
            rule = np.mean(np.abs(point_rule(after_prefill, states[layer, 0][te], k, cap) - lengths[te]))
            spread_mae = np.mean(np.abs(spread_rule(after_prefill, states[layer, 0][te], k, cap, spread) - lengths[te]))
            refitted = "-"
            if k in STEPS:
                features = states[layer, k]
                C = min(C_GRID, key=lambda c: cross_validate(lambda: HiddenStateProbe(layer, C=c),
                                                               features[tr], lengths[tr]).mae)
                refit = HiddenStateProbe(layer, C=C).fit(features[tr], lengths[tr])
                probe = np.mean(np.abs(np.asarray(refit.predict(features[te])) - lengths[te]))
                refitted = f"{probe:.1f} ({probe / constant:.2f}x)"
            print(f"| {layer} | {k} | {len(te)} | {np.mean(lengths[te] >= cap):.0%} | {constant:.1f} "
                  f"| {rule:.1f} ({rule / constant:.2f}x) | {spread_mae:.1f} ({spread_mae / constant:.2f}x) "
                  f"| {refitted} |")
    for k in STEPS[2:]:
        tr, te = train[lengths[train] > k], test[lengths[test] > k]
        features = np.array([repetition(answer, k) for answer in answers])
        classifier = LogisticRegression().fit(features[tr], lengths[tr] >= cap)
        auc = roc_auc_score(lengths[te] >= cap, classifier.predict_proba(features[te])[:, 1])
        print(f"repetition in the first {k} tokens: ROC AUC for 'runs to the cap' {auc:.3f}")


if __name__ == "__main__":
    main()
