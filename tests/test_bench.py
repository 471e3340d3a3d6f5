"""``tdpipe bench`` rows: tdpipe's tokens equal HF generate's, a missing vLLM environment is
reported without stopping the run, and the dense-product bound is measured."""

from __future__ import annotations

from conftest import tiny_model

from tdpipe_hf.apps import bench
from tdpipe_hf.models import byte_tokenizer


def test_bench_reports_a_missing_vllm_and_measures_the_rest():
    tokenizer = byte_tokenizer(chat_template=True)
    model = tiny_model("llama", seed=81, vocab_size=len(tokenizer))
    logged: list[str] = []
    rows = bench.run_benchmark(model, tokenizer, ["hello there", "a longer prompt about pipelines"],
                               max_new_tokens=6, stages=(1,), systems=("hf-generate", "vllm", "gemm-bound", "tdpipe"),
                               vllm_python="/nonexistent/python", log=logged.append)
    systems = [row.system for row in rows]
    assert systems == ["hf-generate", "gemm-bound", "tdpipe-local"]
    assert any("vllm failed" in line and "vllm_peer.sh" in line for line in logged), logged
    assert rows[1].requests == 0  # a bound, not a run of requests
    tdpipe_row = rows[2]
    assert tdpipe_row.same_as_hf == tdpipe_row.requests == 2
    table = bench.format_table(rows)
    assert "vs vLLM" in table.splitlines()[0]


def test_gemm_bound_counts_every_linear_layer_once():
    model = tiny_model("llama", seed=82)
    linears = [m for m in model.modules() if m.__class__.__name__ == "Linear"]
    _, flops = bench.gemm_bound(model, rows=4, repeats=1)
    assert flops == sum(2 * m.in_features * m.out_features for m in linears)
    assert any(m is model.lm_head for m in linears), "the LM head is part of a token's cost"


def test_bench_runs_tdpipe_once_per_backend_and_names_it():
    """... and hands over the rows so far after each one (the CLI rewrites its JSON then)."""
    tokenizer = byte_tokenizer(chat_template=True)
    model = tiny_model("llama", seed=83, vocab_size=len(tokenizer))
    seen: list[int] = []
    rows = bench.run_benchmark(model, tokenizer, ["hello there", "a longer prompt about pipelines"],
                               max_new_tokens=6, stages=(1,), systems=("hf-generate", "tdpipe"),
                               backends=("paged-sdpa", "paged-batched"), log=lambda line: None,
                               on_row=lambda so_far: seen.append(len(so_far)))
    assert seen == [1, 2, 3]
    assert [(row.system, row.backend) for row in rows] == [
        ("hf-generate", None), ("tdpipe-local", "paged-sdpa"), ("tdpipe-local", "paged-batched")]
    for row in rows[1:]:
        assert row.same_as_hf == 2 and row.matching_prefix == 1.0
    assert "| paged-batched |" in bench.format_table(rows)


def test_matching_prefix_measures_how_early_answers_part():
    reference = [[1, 2, 3, 4], [5, 6], [7]]
    assert bench.matching_prefix(reference, reference) == 1.0
    # parts at the third token of 4; at the first of 2; stops early (1 of 2 tokens: the longer counts)
    assert bench.matching_prefix([[1, 2, 9, 4], [0, 6], [7, 8]], reference) == (0.5 + 0.0 + 0.5) / 3


def test_run_vllm_finds_a_relative_python_from_its_scratch_directory(tmp_path, monkeypatch):
    """The runner starts in a scratch directory: ``--vllm-python ../vllm-venv/bin/python`` (the
    README's form) must still name the caller's file. A stand-in interpreter answers the job."""
    import stat

    from tdpipe_hf.apps.vllm_peer import run_vllm

    fake = tmp_path / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n"  # $1 runner.py, $2 job.json, $3 result.json
                    "echo '{\"outputs\": [[7, 8]], \"seconds\": 0.5}' > \"$3\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    outputs, seconds, cached = run_vllm("../venv/bin/python", "model-dir", [[1, 2, 3]], max_new_tokens=2, eos={0})
    assert (outputs, seconds, cached) == ([[7, 8]], 0.5, None)


def test_rounds_alternate_the_order_and_pair_ratios_within_a_round():
    """With rounds, the tdpipe rows run forward, then backward, ...; HF runs once; the summary
    takes each row's ratio to the first configuration within the same round."""
    tokenizer = byte_tokenizer(chat_template=True)
    model = tiny_model("llama", seed=84, vocab_size=len(tokenizer))
    rows = bench.run_benchmark(model, tokenizer, ["hello there", "a longer prompt about pipelines"],
                               max_new_tokens=4, stages=(1,), systems=("hf-generate", "tdpipe"),
                               policies=("tdpipe", "vllm-v0-pp"), log=lambda line: None, rounds=3)
    order = [(row.policy, row.round) for row in rows[1:]]
    assert rows[0].system == "hf-generate" and all(r.system != "hf-generate" for r in rows[1:])
    assert order == [("tdpipe", 0), ("vllm-v0-pp", 0), ("vllm-v0-pp", 1), ("tdpipe", 1),
                     ("tdpipe", 2), ("vllm-v0-pp", 2)]
    assert all(row.same_as_hf == 2 for row in rows[1:])
    # the summary pairs rows of one round: made-up rates whose per-round ratios are 2, 3 and 4
    for row, rate in zip(rows[1:], [10.0, 20.0, 90.0, 30.0, 5.0, 20.0]):
        row.tokens_per_s = rate
    summary = bench.format_rounds(rows).splitlines()
    assert summary[2].startswith("| tdpipe-local | tdpipe |") and "| 3 | 10.0 | 5.0-30.0 | 1.000x |" in summary[2]
    assert "| 3 | 20.0 | 20.0-90.0 | 3.000x |" in summary[3]
    assert bench.format_rounds(rows[:3]) == ""  # one round: nothing to pair
