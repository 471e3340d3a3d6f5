"""Soak: 10 000 requests through two stage processes on a KV budget that forces many
preemptions. Every request comes back exactly once with the tokens it gets alone (greedy), and
the controller's memory stays bounded. Slow (a few minutes); CI runs it."""

from __future__ import annotations

import random
import resource

import pytest
import torch
from conftest import hf_generate, tiny_model

import tdpipe_hf
from tdpipe_hf.predictors import ConstantPredictor

REQUESTS = 10_000
DISTINCT = 160  # distinct prompts; each request takes one with its own max_new_tokens
MAX_NEW = 24


@pytest.mark.slow
def test_ten_thousand_requests_with_preemption_each_exactly_once_and_exact():
    model = tiny_model("llama", seed=91)
    rng = random.Random(92)
    prompts = [[rng.randrange(3, 97) for _ in range(rng.randint(1, 40))] for _ in range(DISTINCT)]
    # each distinct prompt alone through HF generate, at the longest length any request asks for
    alone = []
    for prompt in prompts:
        out = hf_generate(model, torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):].tolist()
        alone.append(out[:out.index(2) + 1] if 2 in out else out)
    picks = [(rng.randrange(DISTINCT), rng.randint(1, MAX_NEW)) for _ in range(REQUESTS)]
    # a predictor that expects 1-token answers makes greedy prefill over-admit: many preemptions
    tdpipe_hf.wrap(model, num_stages=2, executor="distributed", block_size=4, kv_blocks=160,
                   predictor=ConstantPredictor(1.0))
    try:
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outputs = model.generate_batch([prompts[i] for i, _ in picks[:REQUESTS // 2]], max_new_tokens=MAX_NEW)
        first_half_stats = model.tdpipe_engine.last_stats
        rss_half = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # the second half with each request's own max_new_tokens, through the offline request path
        from tdpipe_hf.controller import Request

        requests = [Request(n, prompts[i], new, frozenset({2})) for n, (i, new) in enumerate(picks[REQUESTS // 2:])]
        stats = model.tdpipe_engine.run(requests)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        tdpipe_hf.unwrap(model)
    assert len(outputs) == REQUESTS // 2
    for (i, _), output in zip(picks, outputs):
        assert output == alone[i]
    for request, (i, new) in zip(requests, picks[REQUESTS // 2:]):
        expected = alone[i][:new]
        assert request.output_ids == expected, (request.request_id, request.output_ids, expected)
        assert request.finish_reason in ("stop", "length")
    assert first_half_stats.preemptions > 100  # the second half, with shorter limits, preempts less
    print(f"soak: {REQUESTS} requests, {first_half_stats.preemptions + stats.preemptions} preemptions, "
          f"peak RSS {rss_before / 1024:.0f} -> {rss_half / 1024:.0f} -> {rss_after / 1024:.0f} MiB")
    # the second half (as many requests again) may not grow the peak by more than a quarter
    assert rss_after <= rss_half * 1.25
