"""The server: concurrent callers share one engine and each gets exactly HF's tokens."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import hf_generate, left_padded, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf.apps.serving import Server


@contextmanager
def serving(model, **options):
    """A server over ``model`` wrapped with ``options``; closed and unwrapped afterwards."""
    tdpipe_hf.wrap(model, **options)
    server = Server(model)
    try:
        yield server
    finally:
        server.close()
        tdpipe_hf.unwrap(model)


def test_concurrent_callers_get_their_own_exact_tokens():
    model = tiny_model("llama", seed=71)
    prompts = random_prompts(8, low=2, high=20, seed=72)
    expected = [hf_generate(model, torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    eos = model.generation_config.eos_token_id
    expected = [e[: e.index(eos) + 1] if eos in e else e for e in expected]
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=64)
    server = Server(model)
    results: dict[int, list[int]] = {}

    def user(index):
        results[index] = list(server.submit(prompts[index], max_new_tokens=12))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    server.close()
    assert [results[i] for i in range(len(prompts))] == expected
    assert server.stats.generated_tokens == sum(len(e) for e in expected)
    # requests overlapped: some micro-batch carried more than one user's request
    assert max(rows for rows, _ in server.stats.decode_batches) > 1


def test_bad_requests_are_refused_and_the_server_keeps_serving():
    model = tdpipe_hf.wrap(tiny_model("llama", seed=73), num_stages=1, block_size=4, kv_blocks=16)
    server = Server(model)
    with pytest.raises(ValueError, match="empty"):
        server.submit([])
    with pytest.raises(ValueError, match="KV budget"):
        server.submit([5] * 60, max_new_tokens=20)
    with pytest.raises(ValueError, match="max_new_tokens"):
        server.submit([5, 6], max_new_tokens=0)
    assert len(server.submit([5, 6, 7], max_new_tokens=4).tokens()) >= 1
    server.close()


def test_a_stage_that_dies_between_requests_does_not_fail_the_next_one():
    """A stage process killed while the server is idle is noticed by the server (its stages are
    closed and restart with the next request), instead of the next request failing on it; the
    new stages' KV is empty, so the prefix cache must not hand out the old blocks."""
    import os
    import signal

    model = tiny_model("llama", seed=71)
    prompt = random_prompts(1, low=2, high=20, seed=73)[0]
    expected = hf_generate(model, torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    with serving(model, num_stages=2, executor="distributed", block_size=4, kv_blocks=64) as server:
        executor = model.tdpipe_engine.executor
        assert list(server.submit(prompt, max_new_tokens=6)) == expected  # starts the stage processes
        assert list(server.submit(prompt, max_new_tokens=6)) == expected
        cached = server.totals["cached_tokens"]
        assert cached >= len(prompt) - 4  # the repeat took the first one's blocks
        os.kill(executor._procs[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + 60  # a hang guard: the idle check runs every second
        while executor.running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not executor.running and server.stage_restarts == 1
        assert list(server.submit(prompt, max_new_tokens=6)) == expected
        assert server.totals["cached_tokens"] == cached  # nothing taken from before the restart


def test_generate_on_the_served_model_does_not_leave_the_server_a_stale_prefix_cache():
    """``model.generate`` on a model a server also runs writes the same KV cache blocks with its
    own run; the server's prefix cache must not hand them out afterwards as the start it cached
    (it did: the next request that shared the start answered from another prompt's KV)."""
    model = tiny_model("llama", seed=75)
    start = random_prompts(1, low=12, high=12, seed=76)[0]
    first, second = start + [5, 6, 7], start + [8, 9]
    others = random_prompts(3, low=20, high=30, seed=77)

    def hf(prompt):
        return hf_generate(model, torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()

    expected = hf(second)
    with serving(model, num_stages=2, block_size=4, kv_blocks=64) as server:
        list(server.submit(first, max_new_tokens=6))  # caches the start's three blocks
        ids, mask = left_padded(others)
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)  # overwrites blocks 0, 1, ...
        assert list(server.submit(second, max_new_tokens=6)) == expected


def test_totals_survive_a_failed_run():
    """After a failure the server starts a fresh controller (its ``stats`` restart); the totals a
    Prometheus counter reports must not go back to 0."""
    model = tiny_model("llama", seed=71)
    prompt = random_prompts(1, low=2, high=20, seed=74)[0]
    with serving(model, num_stages=2, block_size=4, kv_blocks=64) as server:
        first = list(server.submit(prompt, max_new_tokens=5))
        before = server.totals["generated_tokens"]
        assert before == len(first) > 0

        def broken_step():
            raise RuntimeError("a stage failed")

        server.controller.step = broken_step
        stream = server.submit(prompt, max_new_tokens=5)
        with pytest.raises(RuntimeError, match="a stage failed"):
            list(stream)
        assert server.engine_failures == 1 and server.stats.generated_tokens == 0
        assert server.totals["generated_tokens"] == before
        assert list(server.submit(prompt, max_new_tokens=5)) == first  # the fresh controller serves
        assert server.totals["generated_tokens"] == 2 * before


def test_a_failed_step_leaves_nothing_behind_for_the_next_requests(monkeypatch):
    """A step that fails outside the stages (here sampling) while another micro-batch is in the
    pipeline: the callers learn of it, and the fresh controller must not receive the old one's
    micro-batches (it would fail on them, and every request after them) nor lose requests
    queued behind the failure."""
    import tdpipe_hf.runtime.local as local

    model = tiny_model("llama", seed=71)
    prompts = random_prompts(6, low=2, high=20, seed=75)
    with serving(model, num_stages=2, block_size=4, kv_blocks=64) as server:
        expected = [list(server.submit(p, max_new_tokens=6)) for p in prompts]
        sample, calls = local.sample_batch, []

        queued = server.engine.executor._queue

        def fails_once(hidden, batch):  # the first time another micro-batch waits in the pipeline
            if queued and not calls:
                calls.append(batch.batch_id)
                raise RuntimeError("sampling failed")
            return sample(hidden, batch)

        monkeypatch.setattr(local, "sample_batch", fails_once)
        streams = [server.submit(p, max_new_tokens=6) for p in prompts]
        outcomes = []
        for stream in streams:
            try:
                outcomes.append(list(stream))
            except RuntimeError as exc:
                outcomes.append(str(exc))
        assert calls and "sampling failed" in outcomes and server.engine_failures == 1
        assert all(o == "sampling failed" or o == e for o, e in zip(outcomes, expected))
        assert [list(server.submit(p, max_new_tokens=6)) for p in prompts] == expected
        assert server.engine_failures == 1


def test_closing_the_engine_under_a_live_server_drops_its_prefix_cache():
    """``engine.close()`` while a server lives drops the stages' KV; the server's next request
    that shares a cached start must compute it again, not read the new, empty cache."""
    model = tiny_model("llama", seed=75)
    prompt = random_prompts(1, low=14, high=14, seed=78)[0]
    expected = hf_generate(model, torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    with serving(model, num_stages=2, block_size=4, kv_blocks=64) as server:
        assert list(server.submit(prompt, max_new_tokens=6)) == expected
        cached = server.totals["cached_tokens"]
        model.tdpipe_engine.close()
        assert list(server.submit(prompt, max_new_tokens=6)) == expected
        assert server.totals["cached_tokens"] == cached  # nothing taken from the closed stages


def test_a_closed_server_leaves_the_engine_ready_for_generate():
    """Closing a server while its requests run leaves no micro-batch in the engine's pipeline:
    ``model.generate`` afterwards gets HF's tokens (it failed on the server's leftovers)."""
    model = tiny_model("llama", seed=79)
    prompts = random_prompts(4, low=4, high=20, seed=80)
    ids, mask = left_padded(prompts)
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with serving(model, num_stages=2, block_size=4, kv_blocks=256) as server:
        streams = [server.submit(p, max_new_tokens=400) for p in prompts]
        next(iter(streams[0]))  # running
        server.close()
        for stream in streams:
            with pytest.raises(RuntimeError, match="closed"):
                list(stream)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), expected)


def test_a_sink_that_raises_ends_its_own_request_only():
    """A caller's token sink that raises cancels that request; the others sharing the run get
    their exact tokens and the engine run does not fail."""
    model = tiny_model("llama", seed=81)
    prompts = random_prompts(3, low=4, high=20, seed=82)
    with serving(model, num_stages=2, block_size=4, kv_blocks=64) as server:
        expected = [list(server.submit(p, max_new_tokens=8)) for p in prompts]

        def broken(item):
            raise OSError("the caller went away")

        bad = server.submit(prompts[0], max_new_tokens=8, sink=broken)
        good = [server.submit(p, max_new_tokens=8) for p in prompts[1:]]
        assert [list(s) for s in good] == expected[1:]
        assert server.engine_failures == 0 and isinstance(bad.error, OSError)
        deadline = time.monotonic() + 30
        while server.num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.controller.scheduler.blocks.num_used == 0  # the cancelled request's KV is free


def test_generate_beside_a_busy_server_waits_its_turn_and_both_are_exact():
    """``model.generate`` while the server's requests are in the pipeline: the run waits until
    the server is idle (mixing micro-batches on one executor mixed their results and KV), and
    both get HF's tokens."""
    model = tiny_model("llama", seed=83)
    served = random_prompts(3, low=4, high=16, seed=84)
    asked = random_prompts(2, low=4, high=16, seed=85)
    expected_served = [hf_generate(model, torch.tensor([p]), max_new_tokens=60, do_sample=False)[0, len(p):].tolist()
                       for p in served]
    ids, mask = left_padded(asked)
    expected_asked = hf_generate(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with serving(model, num_stages=2, block_size=4, kv_blocks=128) as server:
        streams = [server.submit(p, max_new_tokens=60) for p in served]
        next(iter(streams[0]))  # the server's requests are running
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected_asked)
        tails = [list(s) for s in streams]
        assert [expected_served[0][1:]] + expected_served[1:] == tails
