"""Greedy prefill admission (predicted lengths + simulated future KV usage) on the fake paged
pipeline of test_scheduler, and the predictors it relies on."""

from __future__ import annotations

import re

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import tiny_model
from test_scheduler import reference, run

import tdpipe_hf
from tdpipe_hf.controller import BlockManager, Request
from tdpipe_hf.controller.cost import StageTimeModel
from tdpipe_hf.policies import GreedyPrefill
from tdpipe_hf.policies.prefill import expected_rate, simulated_peak_blocks
from tdpipe_hf.predictors import (
    ConstantPredictor,
    HiddenStateProbe,
    LearnedLengthPredictor,
    OraclePredictor,
    load_predictor,
    load_predictor_file,
)
from tdpipe_hf.scheduling import build_scheduler


def workload(count=24, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, size=int(rng.integers(3, 14))).tolist() for _ in range(count)]


@settings(max_examples=80, deadline=None)
@given(tokens=st.lists(st.integers(1, 60), min_size=1, max_size=12), data=st.data(),
       block_size=st.integers(1, 8))
def test_simulated_peak_matches_step_by_step(tokens, data, block_size):
    remaining = data.draw(st.lists(st.integers(1, 40), min_size=len(tokens), max_size=len(tokens)))
    brute = 0
    for step in range(max(remaining) + 1):
        held = sum(-(-(t + step) // block_size) for t, r in zip(tokens, remaining) if r >= step)
        brute = max(brute, held)
    assert simulated_peak_blocks(np.array(tokens), np.array(remaining), block_size) == brute


@settings(max_examples=60, deadline=None)
@given(outcomes=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40), st.floats(0.0, 1.0)), min_size=1,
                         max_size=10), block_size=st.integers(1, 8))
def test_weighted_peak_is_the_peak_of_expected_usage(outcomes, block_size):
    tokens, remaining, weights = (np.array(column) for column in zip(*outcomes))
    expected = max(sum(w * -(-(t + step) // block_size) for t, r, w in outcomes if r >= step)
                   for step in range(max(remaining) + 1))
    assert simulated_peak_blocks(tokens, remaining, block_size, weights.astype(float)) == pytest.approx(expected)


class TwoOutcomes:
    """Every answer runs to ``cap`` with probability ``p``, else stops after ``short`` tokens."""

    def __init__(self, cap, short, p):
        self.cap, self.short, self.p = cap, short, p

    def predict(self, prompts):
        return [self.cap if self.p > 0.5 else self.short] * len(prompts)

    def predict_outcomes(self, prompts):
        return [[(self.cap, self.p), (self.short, 1 - self.p)]] * len(prompts)


def test_distribution_planning_books_expected_use_not_the_likelier_class():
    waiting = [Request(i, [1] * 16, 100) for i in range(20)]
    blocks = BlockManager(90, 16)
    predictor = TwoOutcomes(cap=100, short=10, p=0.6)
    # point: every request planned at the cap, ceil((16 + 100) / 16) = 8 blocks each -> 11 fit
    assert GreedyPrefill(predictor, kv_threshold=1.0, planning="point").admit(waiting, [], blocks, 64) == 11
    # distribution: the peak is at the cap, where 0.6 x 8 = 4.8 blocks each are expected -> 18 fit
    assert GreedyPrefill(predictor, kv_threshold=1.0).admit(waiting, [], blocks, 64) == 18


def test_point_planning_takes_the_likeliest_outcome_not_predict():
    """``predict`` is a predictor's MAE-best guess (the median); "point" planning is the paper's
    class: a request whose likeliest outcome is "stops at 10" is planned at 10 even if its
    ``predict`` says 60."""

    class MedianAboveItsClass(TwoOutcomes):
        def predict(self, prompts):
            return [60] * len(prompts)

    waiting = [Request(i, [1] * 16, 100) for i in range(20)]
    predictor = MedianAboveItsClass(cap=100, short=10, p=0.4)
    # the likeliest outcome, 10 tokens: ceil((16 + 10) / 16) = 2 blocks each -> all 20 fit in 45
    assert GreedyPrefill(predictor, kv_threshold=1.0, planning="point").admit(waiting, [], BlockManager(45, 16),
                                                                              64) == 20


def test_median_length_is_the_median_of_the_predicted_distribution():
    """With a spread, the guess for p < 0.5 is where the mixture (p at the cap, the rest a
    log-normal below it) reaches half its mass; p >= 0.5 guesses the cap; no spread: the class."""
    from scipy.stats import norm

    from tdpipe_hf.predictors.base import median_length

    cap, spread = 512.0, 0.8
    p = np.array([0.0, 0.2, 0.45, 0.5, 0.7])
    short = np.array([100.0, 100.0, 60.0, 300.0, 50.0])
    guess = np.array(median_length(p, short, cap, spread))

    def mixture_cdf(x, p, s):
        below = norm.cdf((np.log(x) - np.log(s)) / spread) / norm.cdf((np.log(cap) - np.log(s)) / spread)
        return (1 - p) * below

    for i in range(3):
        assert guess[i] < cap
        assert mixture_cdf(guess[i], p[i], short[i]) == pytest.approx(0.5, abs=1e-9)
    assert guess[1] > guess[0] and guess[3] == 300.0 and guess[4] == cap
    assert median_length(p, short, cap) == [100.0, 100.0, 60.0, 300.0, cap]


def test_the_median_guess_has_a_lower_absolute_error_than_the_likelier_class():
    """The reason ``predict`` gives the median: on answers drawn from the predicted distributions
    it errs less, on average, than the likelier outcome does."""
    from tdpipe_hf.predictors.base import median_length

    rng = np.random.default_rng(0)
    cap, spread, n = 512.0, 0.9, 20_000
    p, short = rng.uniform(0, 1, n), np.exp(rng.uniform(np.log(20), np.log(300), n))
    early = np.exp(np.log(short) + spread * rng.standard_normal(n))
    while (early >= cap).any():  # the "stops earlier" outcome lives below the cap
        again = early >= cap
        early[again] = np.exp(np.log(short[again]) + spread * rng.standard_normal(again.sum()))
    truth = np.where(rng.uniform(0, 1, n) < p, cap, early)
    median_error = np.abs(np.array(median_length(p, short, cap, spread)) - truth).mean()
    class_error = np.abs(np.array(median_length(p, short, cap)) - truth).mean()
    assert median_error < 0.99 * class_error  # 121.7 against 124.8 tokens


def test_running_request_past_its_short_outcome_is_planned_at_the_cap():
    predictor = TwoOutcomes(cap=100, short=10, p=0.1)
    policy = GreedyPrefill(predictor, kv_threshold=1.0)
    running = Request(0, [1] * 16, 100)
    running.output_ids = [2] * 20  # already longer than the short outcome
    tokens, remaining, weights, _ = policy._state([running], 16)
    assert remaining.tolist() == [80] and weights.tolist() == [1.0]


def test_a_spread_makes_a_long_running_request_likelier_to_run_to_the_cap():
    """With ``length_spread`` the "stops earlier" outcome is a log-normal around its length: a
    request at 0 tokens plans both outcomes as given; past the short guess it keeps that outcome
    with the chance of lasting so long (less and less), planned at its median from there on; a
    request far past it plans almost only the cap. Without a spread the point rule stands."""
    from scipy.stats import norm

    predictor = TwoOutcomes(cap=100, short=20, p=0.5)
    predictor.max_length, predictor.length_spread = 100, 0.7
    policy = GreedyPrefill(predictor, kv_threshold=1.0)

    def plan(generated: int):
        request = Request(0, [1] * 16, 100)
        request.output_ids = [2] * generated
        _, remaining, weights, _ = policy._state([request], 16)
        return remaining.tolist(), weights.tolist()

    assert plan(0) == ([100, 20], [0.5, 0.5])
    remaining, weights = plan(15)
    below = norm.cdf((np.log(15) - np.log(20)) / 0.7)
    assert weights[1] == pytest.approx((1 - below) / (2 - below))  # Bayes: P(early | lasted 15 tokens)
    median = 20 * np.exp(0.7 * norm.ppf((below + 1) / 2))
    assert remaining == [85, int(np.ceil(median)) - 15]
    assert plan(40)[1][1] < weights[1] and plan(90)[1][1] < 0.05  # ever likelier to run to the cap
    predictor.length_spread = None
    policy = GreedyPrefill(predictor, kv_threshold=1.0)
    assert plan(15) == ([85, 5], [0.5, 0.5]) and plan(40) == ([60], [1.0])


def test_training_measures_the_spread_out_of_sample_and_saves_it(tmp_path):
    from tdpipe_hf.apps.training import cross_validate

    rng = np.random.default_rng(0)
    states = rng.normal(size=(300, 8))
    true_log = 3.0 + states[:, 0]  # the log length a probe can read off the state ...
    lengths = np.minimum(np.round(np.expm1(true_log + rng.normal(scale=0.5, size=300))), 200)  # ... give or take 0.5
    spread = cross_validate(lambda: HiddenStateProbe(1, C=0.01, alpha=1.0), states, lengths).spread
    assert 0.4 < spread < 0.7
    probe = HiddenStateProbe(1).fit(states, lengths)
    probe.length_spread = spread
    assert HiddenStateProbe.load(probe.save(tmp_path / "probe.npz")).length_spread == spread


def test_predict_guesses_the_median_once_the_spread_is_known():
    """Both two-part models guess the median of their distribution with a spread, the likelier
    outcome without; cross-validation scores the guess they will make once shipped."""
    from tdpipe_hf.apps.training import cross_validate
    from tdpipe_hf.predictors.base import median_length

    rng = np.random.default_rng(1)
    states = rng.normal(size=(300, 8))
    at_cap = states[:, 1] + rng.normal(scale=1.5, size=300) > 0.3
    lengths = np.where(at_cap, 200, np.minimum(np.round(np.expm1(3.0 + states[:, 0])), 199))
    prompts = [rng.integers(1, 50, size=int(n)).tolist() for n in rng.integers(3, 12, size=300)]
    for model, inputs in ((HiddenStateProbe(1, C=0.01, alpha=1.0).fit(states, lengths), states),
                          (LearnedLengthPredictor(epochs=5).fit(prompts, lengths.tolist()), prompts)):
        parts = model._parts(inputs)
        assert model.predict(inputs) == median_length(*parts, 200.0)
        model.length_spread = 0.8
        guesses = model.predict(inputs)
        assert guesses == median_length(*parts, 200.0, 0.8)
        early = parts[0] < 0.5
        assert early.any() and guesses != median_length(*parts, 200.0)
    found = cross_validate(lambda: HiddenStateProbe(1, C=0.01, alpha=1.0), states, lengths)
    as_classes = cross_validate(lambda: LikelierProbe(1, C=0.01, alpha=1.0), states, lengths)
    assert found.spread == as_classes.spread and found.mae != as_classes.mae


class LikelierProbe(HiddenStateProbe):
    """A probe that always guesses its likelier outcome, whatever its spread."""

    def predict(self, states):
        from tdpipe_hf.predictors.base import median_length

        return median_length(*self._parts(states), self.max_length)


def test_prompt_copies_change_only_the_last_user_message():
    from tdpipe_hf.apps.offline import Job
    from tdpipe_hf.apps.training import copy_line

    chat = Job(1, "7", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                        {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another one?"}],
               None, 20)
    line = copy_line(chat, "stop")
    assert line["id"] == "stop:7" and line["max_new_tokens"] == 20
    assert [m["content"] for m in line["messages"]] == ["Be brief.", "Name a fruit.", "Apple.", "Another one"]
    assert chat.messages[3]["content"] == "Another one?"  # the original is left alone
    plain = Job(2, "8", None, "List three colours ", None)
    assert copy_line(plain, "space") == {"id": "space:8", "prompt": "List three colours "}
    assert copy_line(plain, "stop") == {"id": "stop:8", "prompt": "List three colours."}
    assert copy_line(plain, "case")["prompt"] == "list three colours "
    assert copy_line(Job(3, "9", None, "  2 + 2?", None), "case")["prompt"] == "  2 + 2? "  # no letter: a space
    assert copy_line(plain, "newline")["prompt"] == "List three colours\n"
    with pytest.raises(ValueError, match="unknown prompt copy 'shout'"):
        copy_line(plain, "shout")


def test_copies_train_only_where_their_original_does():
    """A copy of a held-out prompt, or of a prompt in the fold being tested, never trains: a copy
    carrying its original's exact answer would otherwise leak it."""
    from tdpipe_hf.apps.training import Copies, cross_validate

    features = np.arange(10, dtype=np.float64)[:, None]
    lengths = features[:, 0] * 10
    copies = Copies(features[[1, 4, 4, 8]] + 0.5, np.array([11.0, 44.0, 45.0, 88.0]), np.array([1, 4, 4, 8]))
    mine = copies.within(np.array([4, 8, 9]))
    assert mine.origin.tolist() == [0, 0, 1] and mine.lengths.tolist() == [44.0, 45.0, 88.0]
    rows, target = copies.training_rows(features, lengths, np.array([4, 8, 9]))
    assert rows[:, 0].tolist() == [4, 8, 9, 4.5, 4.5, 8.5] and target.tolist() == [40, 80, 90, 44, 45, 88]

    class Memorise:
        """Predicts the length of the training row with the same integer feature; fails on a leak."""

        def fit(self, x, y):
            self.table = {}
            for value, length in zip(x[:, 0], y):
                self.table.setdefault(int(value), []).append(length)
            return self

        def predict(self, x):
            return [np.mean(self.table.get(int(value), [0.0])) for value in x[:, 0]]

    # a leak would let each tested prompt read its own copy's length off the table
    leaky = Copies(features + 0.25, lengths.copy(), np.arange(10))
    assert cross_validate(Memorise, features, lengths, copies=leaky).mae == pytest.approx(np.mean(lengths))


def test_train_predictor_augments_the_probe_with_copies_of_train_prompts(tmp_path, capsys):
    from conftest import tiny_model_dir

    from tdpipe_hf.apps import cli
    from tdpipe_hf.apps.offline import answer_lengths
    from tdpipe_hf.apps.training import split

    model_dir = tiny_model_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": {i}, "prompt": "word{i % 7} and more {i}."}}\n' for i in range(20)))
    labels, output = tmp_path / "labels.jsonl", tmp_path / "predictor.npz"
    base = ["train-predictor", str(prompts), "--labels", str(labels), "-o", str(output), "--model", str(model_dir),
            "--max-new-tokens", "6"]
    assert cli.main(base + ["--augment", "space,stop"]) == 0
    printed = capsys.readouterr().out
    assert "trained with 32 copies of the train prompts" in printed and "no copies" in printed
    copies = answer_lengths(tmp_path / "labels.copies.jsonl")
    train_ids = {key.partition(":")[2] for key in copies}
    assert len(copies) == 32 and train_ids == {str(i) for i in split(20, 0.2, 0)[0]}  # train prompts only
    assert {key.partition(":")[0] for key in copies} == {"space", "stop"}
    assert cli.main(base + ["--augment", "shout"]) == 2
    assert re.search(r"--augment takes kinds of space, stop.*, got shout", capsys.readouterr().err)
    # without the probe the copies are still offered to the prompt-only predictor
    assert cli.main(base + ["--augment", "space", "--no-probe", "-o", str(tmp_path / "alone.npz")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"copies: (trained with|left out) 16 copies", printed) and "length probe" not in printed
    assert not (tmp_path / "alone.probe.npz").exists()


def test_copies_train_the_prompt_only_predictor_where_cross_validation_says_they_help(tmp_path):
    """The length depends on the prompt's first token only; copies with their original's length
    teach that (chosen), copies with the opposite length mislead (left out, and the held-out
    report shows what they would have cost)."""
    from tdpipe_hf.apps.training import Copies, fit_and_report

    rng = np.random.default_rng(0)

    def prompt(key: int) -> list[int]:
        return [key] + rng.integers(100, 5000, 8).tolist()

    keys = [1 + i % 2 for i in range(20)]
    prompts, lengths = [prompt(k) for k in keys], [20 if k == 1 else 400 for k in keys]
    origin = np.repeat(np.arange(20), 5)
    good = Copies([prompt(keys[o]) for o in origin], np.array([lengths[o] for o in origin], float), origin)
    bad = Copies(good.inputs, 420.0 - good.lengths, origin)
    helped = fit_and_report(prompts, lengths, tmp_path / "helped.npz", copies=good)
    misled = fit_and_report(prompts, lengths, tmp_path / "misled.npz", copies=bad)
    assert helped.copies.used and helped.copies.count == 80  # the 16 train prompts' copies only
    assert helped.copies.with_copies < helped.copies.without
    assert not misled.copies.used and misled.copies.other.mae > misled.learned.mae
    assert "left out 80 copies" in misled.format()
    plain = fit_and_report(prompts, lengths, tmp_path / "plain.npz")
    assert plain.copies is None and misled.learned.mae == plain.learned.mae


def test_bad_outcomes_name_the_predictor():
    class Lopsided(TwoOutcomes):
        def predict_outcomes(self, prompts):
            return [[(10, 0.7), (20, 0.7)]] * len(prompts)

    policy = GreedyPrefill(Lopsided(100, 10, 0.5), name="lopsided")
    with pytest.raises(ValueError, match=r"predictor 'lopsided' returned outcomes .* summing to 1"):
        policy.admit([Request(0, [1, 2, 3], 4)], [], BlockManager(10, 4), 8)
    with pytest.raises(ValueError, match="TDPipeConfig.length_planning"):
        tdpipe_hf.TDPipeConfig(length_planning="vibes")


@pytest.mark.parametrize("threshold", [0.9, 0.7])
def test_oracle_admission_stays_under_the_budget_without_preemption(threshold):
    prompts, max_new, num_blocks = workload(), 40, 48
    truth = [len(reference(p, max_new)) for p in prompts]
    oracle = OraclePredictor().fit(prompts, truth)
    requests, stats, _, blocks = run(prompts, max_new, num_blocks=num_blocks,
                                     admission=GreedyPrefill(oracle, kv_threshold=threshold))
    assert [r.output_ids for r in requests] == [reference(p, max_new) for p in prompts]
    assert stats.preemptions == 0
    assert max(used for _, used in stats.kv_used) <= threshold * num_blocks
    assert blocks.num_free == num_blocks


def test_greedy_admits_more_than_fits_now_would_allow_safely():
    """Baseline admission over-commits and preempts on the same budget; greedy does not."""
    prompts, max_new = workload(), 40
    _, baseline, _, _ = run(prompts, max_new, num_blocks=48)
    truth = [len(reference(p, max_new)) for p in prompts]
    _, greedy, _, _ = run(prompts, max_new, num_blocks=48,
                          admission=GreedyPrefill(OraclePredictor().fit(prompts, truth)))
    assert baseline.preemptions > 0 and greedy.preemptions == 0


def test_wrong_predictor_is_caught_by_preemption_with_identical_tokens():
    prompts, max_new = workload(), 40
    wrong = GreedyPrefill(ConstantPredictor(1.0), kv_threshold=1.0)  # every answer "1 token"
    requests, stats, _, blocks = run(prompts, max_new, num_blocks=48, admission=wrong)
    assert stats.preemptions > 0
    assert [r.output_ids for r in requests] == [reference(p, max_new) for p in prompts]
    assert blocks.num_free == blocks.num_blocks


def test_online_learning_updates_the_predictor():
    prompts, max_new = workload(32), 40
    predictor = ConstantPredictor(500.0)
    requests, _, _, _ = run(prompts, max_new, num_blocks=200,
                            admission=GreedyPrefill(predictor, online=True, update_every=8))
    true_mean = np.mean([len(r.output_ids) for r in requests])
    assert predictor.count == 32 and predictor.length == pytest.approx(true_mean)  # 500 forgotten


@pytest.mark.parametrize("kind", ["constant", "oracle", "sklearn"])
def test_saved_predictor_predicts_the_same(tmp_path, kind):
    prompts = workload(60, seed=5)
    lengths = [5 + 3 * len(p) + (p[0] % 7) for p in prompts]
    predictor = {"constant": ConstantPredictor, "oracle": OraclePredictor,
                 "sklearn": lambda: LearnedLengthPredictor(n_features=256, epochs=5)}[kind]().fit(prompts, lengths)
    path = predictor.save(tmp_path / kind)
    again = load_predictor_file(path)
    assert type(again) is type(predictor)
    np.testing.assert_allclose(again.predict(prompts), predictor.predict(prompts), rtol=1e-6)
    assert load_predictor(str(path)).predict(prompts[:3]) == again.predict(prompts[:3])


def test_learned_predictor_beats_the_mean_on_learnable_lengths():
    prompts = workload(300, seed=6)
    # bimodal like real chat answers: some prompts run to the cap (100), the others stop early
    lengths = [100 if 7 in p else 10 + p[0] % 3 for p in prompts]
    train, test = slice(0, 240), slice(240, 300)
    learned = LearnedLengthPredictor().fit(prompts[train], lengths[train])
    mean = ConstantPredictor().fit(prompts[train], lengths[train])

    def mae(predictor):
        return np.mean(np.abs(np.array(predictor.predict(prompts[test])) - lengths[test]))

    assert mae(learned) < 0.5 * mae(mean)


def test_unknown_predictor_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown predictor 'nope'; available: .*constant.*oracle.*sklearn"):
        load_predictor("nope")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_predictor("missing.npz")


def test_broken_predictor_is_named():
    class Broken:
        def predict(self, prompts):
            return ["long"] * len(prompts)

    policy = GreedyPrefill(Broken(), name="broken-plugin")
    with pytest.raises(ValueError, match=r"predictor 'broken-plugin' returned 'long'"):
        policy.admit([Request(0, [1, 2, 3], 4)], [], BlockManager(10, 4), 8)
    with pytest.raises(ValueError, match="TDPipeConfig.predictor must be"):
        tdpipe_hf.TDPipeConfig(predictor=42)


def test_train_predictor_cli_labels_fits_reports_and_saves(tmp_path, capsys):
    """End to end on a tiny random model: labels are the engine's own answers (resumable), the
    saved predictor loads by path, and the engine uses it; a rerun reuses the labels."""
    from conftest import tiny_model_dir

    from tdpipe_hf.apps import cli
    from tdpipe_hf.apps.offline import answer_lengths

    model_dir = tiny_model_dir(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    words = ["alpha", "beta", "gamma delta", "epsilon zeta eta", "theta"]
    prompts.write_text("".join(f'{{"id": {i}, "prompt": "{words[i % 5]} {i}"}}\n' for i in range(30)))
    labels, output = tmp_path / "labels.jsonl", tmp_path / "predictor.npz"
    argv = ["train-predictor", str(prompts), "--labels", str(labels), "-o", str(output), "--model",
            str(model_dir), "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out split: 6 prompts (trained on 24)" in printed and "sklearn" in printed and "median" in printed
    assert "length probe after prefill: layer" in printed
    lengths = answer_lengths(labels)
    assert len(lengths) == 30 and all(1 <= n <= 12 for n in lengths.values())
    predictor = load_predictor(str(output))
    assert isinstance(predictor, LearnedLengthPredictor)
    model = tdpipe_hf.from_pretrained(str(model_dir), predictor=str(output))[0]
    assert model.tdpipe_engine.predictor.predict([[5, 6, 7]]) == predictor.predict([[5, 6, 7]])
    probe = HiddenStateProbe.load(tmp_path / "predictor.probe.npz")  # beside the predictor: used with it
    assert model.tdpipe_engine.probe.layer == probe.layer and 1 <= probe.layer < model.config.num_hidden_layers
    before = labels.read_text()
    assert cli.main(argv) == 0
    assert labels.read_text() == before, "a rerun must reuse the labels, not regenerate them"


def test_the_shipped_predictor_is_found_however_smollm2_is_loaded(tmp_path):
    """Loaded the plain HF way (a directory and gguf_file=), or from a copy under another name and
    in another dtype, SmolLM2 is still recognised by its weights and gets its trained predictor."""
    from transformers import AutoModelForCausalLM

    from tdpipe_hf.models import default_model_file, model_name
    from tdpipe_hf.predictors import LearnedLengthPredictor, shipped_name_for

    gguf = default_model_file()
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert model_name(plain) != "SmolLM2-135M-Instruct"  # HF records only the directory
    assert shipped_name_for(plain) == "SmolLM2-135M-Instruct"
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "assistant.gguf").symlink_to(gguf)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "my-model", gguf_file="assistant.gguf",
                                                 dtype=torch.bfloat16)
    assert shipped_name_for(again) == "SmolLM2-135M-Instruct"
    tdpipe_hf.wrap(again, num_stages=1, kv_blocks=64)
    assert isinstance(again.tdpipe_engine.predictor, LearnedLengthPredictor)
    tdpipe_hf.unwrap(again)
    other = tiny_model("llama", seed=3)
    assert shipped_name_for(other) == "LlamaForCausalLM"  # no match: its own name, and a warning at wrap


def test_a_threshold_above_one_overbooks_up_to_what_fits_now():
    """kv_threshold > 1 admits past the planned peak on purpose, but never past the free blocks."""
    waiting = [Request(i, [1] * 16, 100) for i in range(20)]
    blocks = BlockManager(90, 16)
    predictor = TwoOutcomes(cap=100, short=10, p=0.6)
    admitted = {t: GreedyPrefill(predictor, kv_threshold=t).admit(waiting, [], blocks, 64) for t in (1.0, 1.5)}
    # 1.0: 18 (see above); 1.5: the expected peak may reach 135 blocks, about 27 requests: all 20
    assert admitted[1.0] == 18 and admitted[1.5] == 20
    tiny = BlockManager(12, 16)  # a prompt takes one block now: 12 fit, however large the threshold
    assert GreedyPrefill(predictor, kv_threshold=50.0).admit(waiting, [], tiny, 64) == 12
    tdpipe_hf.TDPipeConfig(kv_threshold=1.5)  # accepted
    with pytest.raises(ValueError, match="TDPipeConfig.kv_threshold"):
        tdpipe_hf.TDPipeConfig(kv_threshold=0)


def stage_times(decode_fixed: float, decode_per_row: float, prefill_per_token: float) -> StageTimeModel:
    """A stage-time model fitted to made-up timings of decode and prefill micro-batches."""
    cost = StageTimeModel()
    for rows in (1, 3, 8, 16, 32):
        cost.observe("decode", rows, rows, rows * (20 + rows), decode_fixed + decode_per_row * rows)
    for tokens in (64, 128, 256, 512):
        cost.observe("prefill", 1, tokens, tokens, prefill_per_token * tokens)
    return cost


def test_cost_overbooking_admits_past_the_threshold_only_where_it_pays():
    """With ``overbooking="cost"`` the threshold's prefix is a floor; the fitted stage times decide
    whether the last requests that fit now are worth their expected recomputation."""
    waiting = [Request(i, [1] * 16, 100) for i in range(20)]
    blocks = BlockManager(90, 16)  # every prompt fits now; the plan at threshold 1.0 takes 18 (see above)
    predictor = TwoOutcomes(cap=100, short=10, p=0.6)

    def admitted(cost) -> int:
        policy = GreedyPrefill(predictor, kv_threshold=1.0, overbooking="cost")
        if cost is not None:
            policy.use_stage_times(cost, num_stages=2, prefill_chunk_tokens=512)
        return policy.admit(waiting, [], blocks, 64)

    assert admitted(None) == 18  # no timings yet: the threshold's plan
    # a decode step costs the same for any batch and a recomputation is cheap: all 20
    assert admitted(stage_times(decode_fixed=0.05, decode_per_row=0.0, prefill_per_token=1e-5)) == 20
    # each row costs its own time (a bigger batch gains nothing) and recomputing is dear: the floor
    assert admitted(stage_times(decode_fixed=0.0, decode_per_row=0.01, prefill_per_token=0.01)) == 18
    assert GreedyPrefill(predictor, kv_threshold=1.0).admit(waiting, [], blocks, 64) == 18  # "off" ignores times


def test_expected_rate_weighs_bigger_batches_against_recomputation():
    tokens, remaining = np.full(10, 32), np.full(10, 64)
    weights = np.ones(10)

    def rate(count, blocks, per_token, fixed):
        return expected_rate(tokens[:count], remaining[:count], weights[:count], 16, blocks,
                             lambda rows, context: fixed + 0.001 * np.asarray(rows), per_token, 32 * count)

    # a fixed step cost: ten rows beat five while all fit (each row holds 6 blocks at its end)
    assert rate(10, 60, 1e-4, fixed=0.05) > rate(5, 60, 1e-4, fixed=0.05)
    # 40 blocks: ten rows overflow by 20 blocks; at a dear recomputation five rows are better
    assert rate(10, 40, 0.05, fixed=0.05) < rate(5, 40, 0.05, fixed=0.05)


def test_overbooking_setting_is_checked_and_reaches_the_policy():
    with pytest.raises(ValueError, match="TDPipeConfig.overbooking"):
        tdpipe_hf.TDPipeConfig(overbooking="always")
    with pytest.raises(ValueError, match="overbooking must be one of"):
        GreedyPrefill(ConstantPredictor(10.0), overbooking="sometimes")
    config = tdpipe_hf.TDPipeConfig(num_stages=2)  # ours by default, not under the paper's rules
    scheduler = build_scheduler(config, 64, 2, ConstantPredictor(10.0))
    assert scheduler.admission.overbooking == "cost"
    assert scheduler.admission.stage_times == (scheduler.cost, 2, config.prefill_chunk_tokens)
    paper = build_scheduler(tdpipe_hf.TDPipeConfig(num_stages=2, paper_rules=True), 64, 2, ConstantPredictor(10.0))
    assert paper.admission.overbooking == "off"
    forced = tdpipe_hf.TDPipeConfig(paper_rules=True, overbooking="cost")
    assert build_scheduler(forced, 64, 1, ConstantPredictor(10.0)).admission.overbooking == "cost"
