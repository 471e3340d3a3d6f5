"""The length probe: fitted on hidden states, fed by the pipeline at the end of each prefill, and
planning the rest of the run with it, without changing a single token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_generate, left_padded, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf.controller import BlockManager, Request
from tdpipe_hf.policies import GreedyPrefill
from tdpipe_hf.predictors import ConstantPredictor, HiddenStateProbe, load_probe
from tdpipe_hf.predictors.probe import last_token_states


def separable(count: int, width: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """States whose first coordinate says "runs to the cap (100)", the second how long otherwise."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(count, width))
    lengths = np.where(states[:, 0] > 0, 100, np.clip(30 + 15 * states[:, 1], 2, 99)).round()
    return states, lengths


def test_probe_beats_the_best_constant_and_survives_save_and_load(tmp_path):
    states, lengths = separable(400)
    probe = HiddenStateProbe(layer=2).fit(states[:300], lengths[:300])
    error = np.mean(np.abs(np.array(probe.predict(states[300:])) - lengths[300:]))
    constant = np.mean(np.abs(np.median(lengths[:300]) - lengths[300:]))
    assert error < 0.5 * constant
    again = HiddenStateProbe.load(probe.save(tmp_path / "p"))
    assert again.layer == 2
    np.testing.assert_allclose(again.predict(states[300:]), probe.predict(states[300:]), rtol=1e-4)
    outcomes = again.predict_outcomes(states[:3])
    assert all(abs(sum(q for _, q in pairs) - 1) < 1e-9 and pairs[0][0] == 100 for pairs in outcomes)


def test_probe_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="layer must be an integer >= 1"):
        HiddenStateProbe(layer=0)
    with pytest.raises(RuntimeError, match="not trained"):
        HiddenStateProbe(layer=1).predict(np.zeros((1, 4)))
    probe = HiddenStateProbe(layer=3).fit(*separable(50, width=4))
    with pytest.raises(ValueError, match=r"expects \[n, 4\] hidden states, got \(2, 5\)"):
        probe.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="reads layer 3, but the model has 3 decoder layers"):
        load_probe(probe, "any", num_layers=3)
    with pytest.raises(FileNotFoundError, match="no-such.npz"):
        load_probe(str(tmp_path / "no-such.npz"), "any", num_layers=4)
    with pytest.raises(ValueError, match="TDPipeConfig.length_probe must be"):
        tdpipe_hf.TDPipeConfig(length_probe=3)
    assert load_probe(False, "SmolLM2-135M-Instruct", 30) is None
    assert load_probe(None, "no-model-has-this-name", 30) is None


class Spy:
    """Wraps the engine's scheduler factory to record every state the pipeline sends back."""

    def __init__(self, engine):
        self.states, self.refined, make = {}, [], engine._scheduler

        def scheduler():
            built = make()
            refine = built.admission.refine

            def spy(states):
                self.states.update(states)
                refine(states)
                self.refined.append(built.admission)

            built.admission.refine = spy
            return built

        engine._scheduler = scheduler


@pytest.mark.parametrize("num_stages,executor", [(1, "local"), (2, "local"), (3, "distributed")])
def test_the_pipeline_sends_back_the_probed_layer_and_tokens_stay_hf_exact(num_stages, executor):
    """The stage running the probe's layer captures each prompt's last hidden state (after a
    chunked prefill too, and across stage processes); they equal a plain forward's, and greedy
    tokens equal HF generate's with the probe planning."""
    model = tiny_model("llama", seed=2)
    prompts = random_prompts(6, low=3, high=40, seed=7)
    ids, mask = left_padded(prompts)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    reference = last_token_states(model, prompts, [2])[2]
    lengths = np.arange(len(prompts)) * 2 + 3.0
    probe = HiddenStateProbe(layer=2).fit(np.vstack([reference, reference + 0.1]), np.concatenate([lengths, lengths]))
    tdpipe_hf.wrap(model, num_stages=num_stages, executor=executor, block_size=4, prefill_chunk_tokens=16,
                   length_probe=probe)
    spy = Spy(model.tdpipe_engine)
    with torch.inference_mode():
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(actual, expected)
    assert sorted(spy.states) == list(range(len(prompts)))
    for index, state in spy.states.items():
        np.testing.assert_allclose(state, reference[index], rtol=1e-5, atol=1e-5)
    assert spy.refined[-1].num_refined == len(prompts)
    model.tdpipe_engine.close()


def test_a_refined_prediction_changes_what_admission_lets_in():
    """The prompt-only guess says every answer is short; once the probe says the running request
    runs long, the simulated KV peak leaves room for fewer newcomers."""
    short = ConstantPredictor()
    short.length = 4.0
    probe = HiddenStateProbe(layer=1).fit(np.array([[0.0], [1.0], [0.1], [0.9]]), np.array([4, 200, 4, 200]))
    policy = GreedyPrefill(short, planning="point")
    policy.use_probe(probe)
    assert policy.probe_layer == 1
    blocks = BlockManager(40, 4)
    running = [Request(0, [1] * 8, 200)]
    running[0].output_ids = [5]
    blocks.reserve(running[0], running[0].num_tokens)
    waiting = [Request(i, [1] * 8, 200) for i in range(1, 9)]
    before = policy.admit(waiting, running, blocks, 64)
    policy.refine({0: np.array([1.0])})
    after = policy.admit(waiting, running, blocks, 64)
    assert after < before
    policy.observe(running[0])
    assert policy._refined == {}


def test_a_probe_with_point_predictions_only_plans_under_distribution_planning():
    """A plugin probe need not give a distribution: its point prediction is one sure outcome."""

    class PointProbe:
        layer = 1

        def predict(self, states):
            return [300.0] * len(states)

    class TwoOutcomes:  # the predictor gives distributions, so distribution planning is on
        def predict(self, prompts):
            return [4.0] * len(prompts)

        def predict_outcomes(self, prompts):
            return [[(4.0, 0.5), (8.0, 0.5)] for _ in prompts]

    policy = GreedyPrefill(TwoOutcomes())
    policy.use_probe(PointProbe())
    policy.refine({7: np.zeros(3)})
    assert policy._outcomes([Request(7, [1, 2], 400)]) == [[(300.0, 1.0)]]
