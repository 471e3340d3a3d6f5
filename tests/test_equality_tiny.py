"""Greedy tdpipe_hf output equals HF ``generate`` token for token on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_generate, left_padded, random_prompts, tdpipe_generate, tiny_model

import tdpipe_hf
from tdpipe_hf.mixin import TDPipeGenerationMixin
from tdpipe_hf.variants import ENGINE_VARIANTS, VARIANTS

MAX_NEW = 24


def eos_mid_batch(model, ids, mask) -> int:
    """A token the model emits early in row 0, so using it as EOS stops that row mid-batch."""
    out = hf_generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None)
    return int(out[0, ids.shape[1] + 3])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("kv_blocks", [None, 20], ids=["ample-kv", "tight-kv"])
def test_padded_batch_with_eos_matches_hf(model_type, num_stages, kv_blocks):
    model = tiny_model(model_type)
    prompts = random_prompts(8, low=2, high=30, seed=1)
    ids, mask = left_padded(prompts)
    eos = eos_mid_batch(model, ids, mask)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    # the baseline admission rule ignores future growth, so the tight budget forces preemption
    options = {"kv_blocks": kv_blocks, "admission": "fits"} if kv_blocks else {}
    tdpipe_hf.wrap(model, num_stages=num_stages, block_size=4, prefill_chunk_tokens=64, **options)
    with torch.inference_mode():
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    assert torch.equal(actual, expected)
    new = expected[:, ids.shape[1]:]
    assert (new == eos).any(dim=1).sum() >= 1, "the test needs a row that stops at EOS"
    assert not (new == eos).any(dim=1).all(), "the test needs a row that runs to max_new_tokens"
    stats = model.tdpipe_engine.last_stats
    if kv_blocks:
        assert stats.preemptions > 0, "the tight budget must force preemption"
    assert stats.micro_batches["prefill"] >= 2, "prompts should span several prefill micro-batches"


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 10, "suppress_tokens": [5, 6]},
    {"do_sample": True, "top_k": 1},  # sampling path, deterministic
], ids=lambda o: ",".join(o))
def test_logits_processors_match_hf(options):
    model = tiny_model("llama", seed=3)
    ids, mask = left_padded(random_prompts(5, low=3, high=20, seed=4))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=16, **{"do_sample": False, **options})
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=30)
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=16, **{"do_sample": False, **options})
    assert torch.equal(actual, expected)


def test_stopping_criteria_and_streamer_match_hf():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    model = tiny_model("llama", seed=5)
    ids = torch.tensor([random_prompts(1, low=6, high=6, seed=6)[0]])
    free = hf_generate(model, ids, max_new_tokens=20, do_sample=False)
    stop = StoppingCriteriaList([StopAfterToken(int(free[0, 6 + 4]))])
    expected = hf_generate(model, ids, max_new_tokens=20, do_sample=False, stopping_criteria=stop)
    assert expected.shape[1] < free.shape[1]
    tdpipe_hf.wrap(model, num_stages=2)
    streamer = Collect()
    actual = model.generate(ids, max_new_tokens=20, do_sample=False, stopping_criteria=stop, streamer=streamer)
    assert torch.equal(actual, expected)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == actual[0, 6:].tolist()


def test_num_return_sequences_and_dict_output():
    model = tiny_model("llama", seed=7)
    ids, mask = left_padded(random_prompts(2, low=4, high=9, seed=8))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=8, num_return_sequences=2,
                           do_sample=True, top_k=1, return_dict_in_generate=True)
    tdpipe_hf.wrap(model, num_stages=2)
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_return_sequences=2,
                            do_sample=True, top_k=1, return_dict_in_generate=True)
    assert torch.equal(actual.sequences, expected.sequences)


def test_generate_batch_returns_each_request_in_order():
    model = tiny_model("qwen2", seed=9)
    prompts = random_prompts(12, low=1, high=25, seed=10)
    expected = [hf_generate(model, torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    tdpipe_hf.wrap(model, num_stages=3, block_size=4, kv_blocks=24)
    actual = model.generate_batch(prompts, max_new_tokens=10, do_sample=False)
    assert actual == [_until_eos(e, model.generation_config.eos_token_id) for e in expected]


def _until_eos(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_sampling_is_reproducible_with_a_seed():
    model = tdpipe_hf.wrap(tiny_model("llama", seed=11), num_stages=2)
    prompts = random_prompts(4, seed=12)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate_batch(prompts, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9))
    assert runs[0] == runs[1]
    assert all(0 <= t < model.config.vocab_size for out in runs[0] for t in out)


def test_forward_still_plain_hf_after_wrap():
    model = tiny_model("llama", seed=13)
    ids = torch.tensor(random_prompts(2, low=7, high=7, seed=14))
    with torch.inference_mode():
        before = model(ids).logits
        tdpipe_hf.wrap(model, num_stages=2)
        after = model(ids).logits
    torch.testing.assert_close(after, before)
    assert isinstance(model, TDPipeGenerationMixin) and type(model).__name__ == "LlamaForCausalLM"
    tdpipe_hf.unwrap(model)
    assert type(model).__name__ == "LlamaForCausalLM" and not isinstance(model, TDPipeGenerationMixin)


@pytest.mark.parametrize("variant", ENGINE_VARIANTS)
@pytest.mark.parametrize("num_stages, executor", [(2, "local"), (3, "local"), (2, "distributed")])
def test_every_policy_matches_hf(variant, num_stages, executor):
    """Greedy tokens equal HF generate's under every policy and stage count, on a KV budget that
    makes the policies' admission and preemption decisions differ."""
    if executor == "distributed" and variant not in ("tdpipe", "hybrid", "naive"):
        pytest.skip("the distributed executor runs the same plans; one run per schedule shape is enough")
    model = tiny_model("llama", seed=51)
    ids, mask = left_padded(random_prompts(10, low=2, high=30, seed=52))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    # small prefill chunks: hybrid splits prompts over several mixed micro-batches
    tdpipe_hf.wrap(model, num_stages=num_stages, block_size=4, kv_blocks=40, executor=executor,
                   prefill_chunk_tokens=16, **VARIANTS[variant].options)
    try:
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("variant", ENGINE_VARIANTS)
def test_every_policy_matches_hf_with_prompts_sharing_their_start(variant):
    """A shared start of 18 tokens (a system prompt) and repeated prompts on a tight budget: the
    prefix cache hands computed blocks to later requests (and back to preempted ones) under
    every policy but vLLM v0's, which never caches, and the variant without it; the tokens stay HF's."""
    model = tiny_model("llama", seed=57)
    start = random_prompts(1, low=18, high=18, seed=58)[0]
    ends = random_prompts(9, low=1, high=12, seed=59)
    ids, mask = left_padded([start + end for end in ends] + [start + ends[1]] * 2)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    actual, stats = tdpipe_generate(model, ids, mask, 20, num_stages=2, block_size=4, kv_blocks=48,
                                    prefill_chunk_tokens=24, **VARIANTS[variant].options)
    assert torch.equal(actual, expected)
    caches = variant != "vllm-v0-pp" and VARIANTS[variant].options.get("prefix_caching", True)
    assert (stats.cached_tokens > 0) == caches


@pytest.mark.parametrize("num_stages", [2, 3])
def test_decode_fill_chunks_match_hf(num_stages):
    """Prompt chunks riding decode micro-batches (``decode_fill_tokens``), split over several of
    them, give HF's greedy tokens; the run does carry mixed micro-batches."""
    model = tiny_model("llama", seed=53)
    ids, mask = left_padded(random_prompts(12, low=2, high=30, seed=54))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    actual, stats = tdpipe_generate(model, ids, mask, 24, num_stages=num_stages, block_size=4, kv_blocks=48,
                                    prefill_chunk_tokens=16, decode_fill_tokens=10, switch_policy="threshold",
                                    switch_fraction=0.1)
    assert torch.equal(actual, expected)
    assert stats.micro_batches.get("mixed", 0) >= 3


@pytest.mark.parametrize("num_stages, executor", [(1, "local"), (2, "local"), (1, "distributed"),
                                                  (2, "distributed"), (3, "distributed")])
def test_decode_steps_planned_ahead_match_hf(num_stages, executor, monkeypatch):
    """``plan_ahead``: decode steps planned before the tokens they compute come back (stage 0
    gets them from the last stage) give HF's greedy tokens, with rows stopping at EOS mid-step
    (their step planned ahead is dropped) and preemptions under a tight KV budget."""
    from tdpipe_hf.controller.scheduler import Scheduler

    planned = []
    follow_up = Scheduler.follow_up

    def counting(self, batch):
        follow = follow_up(self, batch)
        planned.extend(seq.request_id for seq in (follow.seqs if follow else []) if seq.follows is not None)
        return follow

    monkeypatch.setattr(Scheduler, "follow_up", counting)
    model = tiny_model("llama", seed=55)
    ids, mask = left_padded(random_prompts(10, low=2, high=30, seed=56))
    eos = eos_mid_batch(model, ids, mask)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    tdpipe_hf.wrap(model, num_stages=num_stages, block_size=4, kv_blocks=40, executor=executor, admission="fits",
                   plan_ahead=True)
    try:
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
        stats = model.tdpipe_engine.last_stats
        # a second run on the same stages: tokens relayed in the first must not be taken for its own
        again = model.generate(ids[:5], attention_mask=mask[:5], max_new_tokens=MAX_NEW, do_sample=False,
                               eos_token_id=eos)
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)
    assert torch.equal(again, expected[:5])
    assert len(planned) >= 50, "most decode rows should have been planned ahead"
    assert stats.preemptions > 0
    assert (expected[:, ids.shape[1]:] == eos).any(dim=1).sum() >= 1


def test_a_run_whose_last_request_stops_on_eos_leaves_nothing_in_flight():
    """The last request stops on EOS while its next step, planned ahead, is in the pipeline: the
    run collects that step before it returns, so the next run on the same stages is clean."""
    model = tiny_model("llama", seed=57)
    ids, mask = left_padded(random_prompts(1, low=5, high=12, seed=58))
    eos = eos_mid_batch(model, ids, mask)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    assert expected.shape[1] - ids.shape[1] < MAX_NEW, "the answer must stop on EOS"
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40, plan_ahead=True)
    try:
        for _ in range(2):
            actual = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                    eos_token_id=eos)
            assert torch.equal(actual, expected)
            assert not model.tdpipe_engine.executor._queue
    finally:
        tdpipe_hf.unwrap(model)


def test_a_failed_step_drops_the_step_planned_ahead_of_it(monkeypatch):
    """A batch that fails after its stages ran (here the sampler) never hands its tokens over;
    the step planned ahead of it must go with it instead of waiting forever, and the engine
    answers the next call exactly."""
    import threading

    from tdpipe_hf.runtime import local

    model = tiny_model("llama", seed=59)
    ids, mask = left_padded(random_prompts(4, low=3, high=12, seed=60))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    sample_batch = local.sample_batch
    failed = []

    def failing(hidden, batch):
        if batch.forward_tokens and not failed:
            failed.append(batch.batch_id)
            raise ValueError("a logits processor failed")
        return sample_batch(hidden, batch)

    monkeypatch.setattr(local, "sample_batch", failing)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40, plan_ahead=True)
    outcome = []

    def first_call():
        try:
            model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        except ValueError as exc:
            outcome.append(exc)

    try:
        call = threading.Thread(target=first_call, daemon=True)
        call.start()
        call.join(120)  # a hang guard, not a speed limit
        assert not call.is_alive(), "the run hung on a step waiting for tokens that never come"
        assert failed and outcome and "logits processor failed" in str(outcome[0])
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        assert torch.equal(actual, expected)
    finally:
        tdpipe_hf.unwrap(model)
