"""`tdpipe run` / `run_batch`: formats, bad lines, resume after a crash, HF pipeline compatibility."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model, tiny_model_dir
from transformers import pipeline

import tdpipe_hf
from tdpipe_hf.apps.offline import parse_line, run_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", seed=51, vocab_size=len(tokenizer))
    return tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=200), tokenizer


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_answers_match_generate_and_bad_lines_are_reported(tiny, tmp_path):
    model, tokenizer = tiny
    lines = [{"prompt": "hello there"}, "{not json", {"prompt": "   "}, {"prompt": "x" * 300},
             {"messages": [{"role": "user", "content": "abc"}], "id": "chat-1"}, {"nothing": 1},
             {"prompt": "count to three", "max_new_tokens": 3}, {"prompt": "hello there", "id": "line-1"}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    summary = run_batch(model, tokenizer, source, tmp_path / "out.jsonl", max_new_tokens=6, progress=False)
    answers = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert set(answers) == {"line-1", "chat-1", "line-7"}
    assert summary.requests == 3 and summary.errors == 5
    expected = model.generate_batch([tokenizer("hello there")["input_ids"]], max_new_tokens=6)[0]
    assert answers["line-1"]["completion_tokens"] == len(expected)
    assert answers["line-1"]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert answers["line-7"]["completion_tokens"] <= 3
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    by_line = {e["line"]: e["error"] for e in errors}
    assert by_line[2].startswith("not valid JSON")
    assert by_line[3] == "empty prompt"
    assert "more than the model's context of 256" in by_line[4]
    assert "needs 'prompt', 'messages'" in by_line[6]
    assert "duplicate id 'line-1'" in by_line[8]


def test_openai_batch_format_round_trips(tiny, tmp_path):
    model, tokenizer = tiny
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "x", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4}}
             for i in range(3)]
    source = write_lines(tmp_path / "batch.jsonl", lines)
    run_batch(model, tokenizer, source, tmp_path / "out.jsonl", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == ["req-0", "req-1", "req-2"]
    for record in records:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= 4
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_bad_messages_lines_are_reported_and_the_rest_answered(tiny, tmp_path):
    model, tokenizer = tiny
    lines = [{"id": "parts", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                       {"type": "text", "text": "there"}]}]},
             {"id": "number", "messages": [{"role": "user", "content": 42}]},
             {"id": "no-role", "messages": [{"content": "hello"}]},
             {"id": "image", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
             {"custom_id": "plain-custom", "prompt": "hello there"},
             {"id": "after", "prompt": "still answered"}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    summary = run_batch(model, tokenizer, source, tmp_path / "out.jsonl", max_new_tokens=4, progress=False)
    answers = {r["id"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert answers == {"parts", "plain-custom", "after"}
    errors = {e["id"] or e["line"]: e["error"] for e in
              map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert summary.errors == 3
    assert "messages[0].content must be a string" in errors["number"]
    assert "messages[0] must be an object with a 'role'" in errors["no-role"]
    assert "only text parts" in errors["image"]


def test_undecodable_and_huge_lines_are_reported_and_the_rest_answered(tiny, tmp_path):
    model, tokenizer = tiny
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": "before", "prompt": "hello"}\n'
                       b'{"id": "latin-1", "prompt": "caf\xe9"}\n'  # not UTF-8
                       b'\xff\xfe{"id": "bom16"}\n'
                       b'{"id": "lone-surrogate", "prompt": "a\\ud800b"}\n'  # valid JSON, not encodable text
                       + json.dumps({"id": "huge", "prompt": "word " * 200_000}).encode() + b"\n"
                       b'{"id": "after", "prompt": "still answered"}\n')
    summary = run_batch(model, tokenizer, source, tmp_path / "out.jsonl", max_new_tokens=4, progress=False)
    answers = {r["id"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert answers == {"before", "after"}
    errors = {e["line"]: e["error"] for e in
              map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert summary.errors == 4 and set(errors) == {2, 3, 4, 5}
    assert errors[2] == "not valid UTF-8: byte 0xe9 at column 33"
    assert errors[3] == "not valid UTF-8: byte 0xff at column 1"
    assert errors[4] == "'prompt' is not valid Unicode text: surrogates not allowed at position 1"
    assert "more than the model's context of 256" in errors[5]


def test_bad_line_reports_keep_their_id_and_a_rerun_reports_duplicates_again(tiny, tmp_path):
    """A bad line with an id is reported under it, a prompt of the wrong type is called that (not
    "empty"), and a duplicate id is a duplicate in every run, also once its first line is answered."""
    model, tokenizer = tiny
    lines = [{"prompt": "hello", "id": "a"}, {"prompt": 42, "id": "num"}, {"messages": "hi", "id": "msgs"},
             {"prompt": "again", "id": "a"}, {"body": {"messages": []}, "id": "batch"}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    for run in range(2):
        summary = run_batch(model, tokenizer, source, tmp_path / "out.jsonl", max_new_tokens=4, progress=False)
        errors = {e["line"]: e for e in
                  map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
        assert errors[2] == {"line": 2, "id": "num", "error": "'prompt' must be a string, got int"}
        assert errors[3]["id"] == "msgs" and "messages" in errors[3]["error"]
        assert errors[4] == {"line": 4, "id": "a", "error": "duplicate id 'a'"}
        assert errors[5]["id"] == "batch" and "custom_id" in errors[5]["error"]
        assert summary.errors == 4 and (summary.requests, summary.skipped) == ((1, 0) if run == 0 else (0, 1))
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a"]


def test_parse_line_rejects_nonsense():
    with pytest.raises(ValueError, match="positive integer"):
        parse_line(json.dumps({"prompt": "a", "max_new_tokens": 0}), 1)
    with pytest.raises(ValueError, match="custom_id"):
        parse_line(json.dumps({"body": {"messages": []}}), 1)
    with pytest.raises(ValueError, match="JSON object"):
        parse_line("[1, 2]", 1)
    for lone_surrogate in ('{"prompt": "a\\ud800"}', '{"messages": [{"role": "user", "content": "\\udfff"}]}'):
        with pytest.raises(ValueError, match="not valid Unicode text"):
            parse_line(lone_surrogate, 1)


def _run_cli(model_dir: Path, source: Path, output: Path) -> subprocess.Popen:
    """The job in its own process; its console output goes to OUTPUT.log (a pipe could fill up)."""
    command = [sys.executable, "-m", "tdpipe_hf.apps.cli", "run", str(source), "-o", str(output), "--model",
               str(model_dir), "--max-new-tokens", "8", "--kv-blocks", "400"]
    log = open(f"{output}.log", "w")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_job_resumes_with_every_answer_exactly_once(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "tiny", seed=52)
    gen = torch.Generator().manual_seed(53)
    words = ["alpha", "beta", "gamma", "delta", "pipeline", "stage", "token", "cache"]
    lines = [{"prompt": " ".join(words[int(i)] for i in torch.randint(0, 8, (int(n),), generator=gen))}
             for n in torch.randint(1, 12, (2000,), generator=gen)]
    source = write_lines(tmp_path / "in.jsonl", lines)

    reference = tmp_path / "reference.jsonl"
    done = _run_cli(model_dir, source, reference)
    assert done.wait(timeout=600) == 0, Path(f"{reference}.log").read_text()[-2000:]

    # killed three times at random points (seeded), the last time with a line torn mid-write
    # (what a kill inside write() leaves), then run to the end
    output = tmp_path / "out.jsonl"
    kill_points = sorted(int(n) for n in torch.randint(100, 1700, (3,), generator=gen))
    for kill_number, kill_at in enumerate(kill_points):
        before = output.read_text().count("\n") if output.exists() else 0
        job = _run_cli(model_dir, source, output)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if output.exists() and output.read_text().count("\n") >= max(kill_at, before + 50):
                break
            time.sleep(0.02)
        assert job.poll() is None, "the job finished before it could be killed"
        job.send_signal(signal.SIGKILL)
        job.wait()
        if kill_number == len(kill_points) - 1:
            last = output.read_text().splitlines()[-1]
            with open(output, "a", encoding="utf-8") as handle:
                handle.write(last[: len(last) // 2])  # half a line, no newline
    partial = output.read_text().count("\n")
    assert 100 <= partial < 2000
    again = _run_cli(model_dir, source, output)
    assert again.wait(timeout=600) == 0, Path(f"{output}.log").read_text()[-2000:]
    assert f"({partial} already in the output" in Path(f"{output}.log").read_text()

    def by_id(path):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        ids = [r["id"] for r in records]
        assert len(ids) == len(set(ids)), "an answer was written twice"
        return {r["id"]: r for r in records}

    assert by_id(output) == by_id(reference)
    assert len(by_id(output)) == 2000


def test_transformers_pipeline_runs_through_the_engine(tiny):
    model, tokenizer = tiny
    tokenizer.padding_side = "left"
    prompts = ["hello", "a longer prompt here", "xyz"]
    tdpipe_hf.unwrap(model)
    plain = pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = plain(prompts, max_new_tokens=5, do_sample=False, batch_size=3)
    tdpipe_hf.wrap(model, num_stages=2)
    runs_before = model.tdpipe_engine.last_stats
    wrapped = pipeline("text-generation", model=model, tokenizer=tokenizer)
    actual = wrapped(prompts, max_new_tokens=5, do_sample=False, batch_size=3)
    assert actual == expected
    assert model.tdpipe_engine.last_stats is not runs_before


def test_cli_names_a_missing_input(tmp_path, capsys):
    from tdpipe_hf.apps import cli

    assert cli.main(["run", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--stages", "0"])


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "/no/such/model"], "model /no/such/model does not exist"),
    (["generate", "  "], "empty prompt"),
    (["serve", "--port", "99999"], "a port is at most 65535, got 99999"),
    (["serve", "--port", "abc"], "expected a positive integer, got abc"),
    (["run", "--kv-blocks", "1.5"], "expected a positive integer, got 1.5"),
    (["serve", "--shutdown-grace", "-1"], "expected a number of seconds >= 0, got -1"),
    (["serve", "--shutdown-grace", "nan"], "expected a number of seconds >= 0, got nan"),
    (["generate", "hi", "--temperature", "0.5"], "add --sample"),
    (["bench", "--systems", "nope"], "unknown system(s) ['nope']"),
    (["bench", "--local-threads", "0"], "expected comma-separated counts >= 1"),
    (["simulate", "--gpus", "41", "--requests", "5"], "llama2-13b has 40 layers, so at most 40 pipeline stages"),
    (["simulate", "--policies", ",", "--requests", "5"], "--policies names no policy"),
    (["simulate", "--requests", "5", "--json", "/no/such/folder/rows.json"], "the folder /no/such/folder does not exist"),
    (["bench", "--json", "/no/such/folder/rows.json"], "--json /no/such/folder/rows.json: the folder"),
    (["simulate", "--requests", "5", "--out", "/proc/no-plots-here"], "/proc/no-plots-here"),
])
def test_cli_refuses_bad_arguments_with_the_reason(argv, message, capsys):
    from tdpipe_hf.apps import cli

    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_eval_predictor_names_an_undecodable_line(tmp_path, capsys):
    from tdpipe_hf.apps import cli

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_bytes(b'{"prompt": "hello", "output_tokens": 3}\n{"prompt": "caf\xe9", "output_tokens": 3}\n')
    assert cli.main(["eval-predictor", str(labelled)]) == 2
    assert "labelled.jsonl line 2: not valid UTF-8: byte 0xe9 at column 16" in capsys.readouterr().err


def test_cli_places_stages_and_names_a_missing_gpu(tmp_path, capsys):
    from tdpipe_hf.apps import cli

    model_dir = tiny_model_dir(tmp_path / "tiny", seed=53)
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "hello"}, {"prompt": "pipelines"}])
    common = ["run", str(source), "--model", str(model_dir), "--stages", "2", "--executor", "local",
              "--max-new-tokens", "4", "--no-chat-template"]
    assert cli.main([*common, "-o", str(tmp_path / "gpu.jsonl"), "--devices", "cuda:99"]) == 2
    assert "'cuda:99' asked for, but this machine has" in capsys.readouterr().err
    output = tmp_path / "out.jsonl"
    assert cli.main([*common, "-o", str(output), "--devices", "cpu,cpu", "--dtype", "bfloat16"]) == 0
    assert sorted(json.loads(line)["id"] for line in output.read_text().splitlines()) == ["line-1", "line-2"]


def test_an_interrupted_run_says_what_it_kept(tmp_path, capsys, monkeypatch):
    """Ctrl-C during ``tdpipe run``: exit 130 and a line saying how many answers are kept and that
    a rerun resumes, not a traceback; the engine is closed either way."""
    from tdpipe_hf.apps import cli, offline

    def one_answer_then_ctrl_c(model, tokenizer, input_path, output, *args, **kwargs):
        with open(output, "a") as out:
            out.write(json.dumps({"id": "line-1", "output": "hi"}) + "\n")
        raise KeyboardInterrupt

    closed = []
    monkeypatch.setattr(offline, "run_batch", one_answer_then_ctrl_c)
    monkeypatch.setattr(tdpipe_hf.engine.TDPipeEngine, "close", lambda self: closed.append(True))
    model_dir = tiny_model_dir(tmp_path / "tiny", seed=53)
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "hello"}, {"prompt": "pipelines"}])
    output = tmp_path / "out.jsonl"
    assert cli.main(["run", str(source), "--model", str(model_dir), "-o", str(output), "--no-chat-template"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; 1 answer(s) are in {output}, and the same command resumes" in err
    assert "Traceback" not in err and closed


def test_eval_predictor_compares_with_the_best_constant(tmp_path, capsys):
    from tdpipe_hf.apps import cli

    model_dir = tiny_model_dir(tmp_path / "model")
    good = write_lines(tmp_path / "labels.jsonl", [{"prompt": f"question {i}", "output_tokens": 10 * i} for i in range(6)])
    assert cli.main(["eval-predictor", str(good), "--model", str(model_dir), "--predictor", "constant",
                     "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "6 labelled prompts" in out and "median" in out and "x the best constant's error" in out
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "output_tokens": "many"}])
    assert cli.main(["eval-predictor", str(bad), "--model", str(model_dir), "--predictor", "constant"]) == 2
    assert "line 1: 'output_tokens' must be a whole number" in capsys.readouterr().err


def test_an_output_that_is_not_an_answers_file_is_left_untouched(tiny, tmp_path):
    """A file that is not answers (or the input itself) as the output: refused by name, and not a
    byte of it changed (its last line used to be cut off as a 'torn' answer)."""
    model, tokenizer = tiny
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    notes = tmp_path / "notes.txt"
    notes.write_text("my important notes\nlast line without newline")
    with pytest.raises(ValueError, match="notes.txt is not an answers file of tdpipe run"):
        run_batch(model, tokenizer, source, notes, progress=False)
    assert notes.read_text() == "my important notes\nlast line without newline"
    before = source.read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        run_batch(model, tokenizer, source, source, progress=False)
    assert source.read_bytes() == before
    with pytest.raises(ValueError, match="is a folder"):
        run_batch(model, tokenizer, source, tmp_path, progress=False)
    with pytest.raises(ValueError, match="folder .*nowhere does not exist"):
        run_batch(model, tokenizer, source, tmp_path / "nowhere" / "out.jsonl", progress=False)


def test_answers_of_another_input_with_the_same_ids_are_not_taken_as_done(tiny, tmp_path):
    """Two inputs numbered line-1, line-2: the second run into the first one's output reports each
    colliding id instead of skipping it (it used to hand back the first input's answers)."""
    model, tokenizer = tiny
    output = tmp_path / "answers.jsonl"
    first = write_lines(tmp_path / "a.jsonl", [{"prompt": "hello"}, {"prompt": "pipelines"}])
    assert run_batch(model, tokenizer, first, output, max_new_tokens=4, progress=False).requests == 2
    again = run_batch(model, tokenizer, first, output, max_new_tokens=4, progress=False)
    assert (again.requests, again.skipped, again.errors) == (0, 2, 0)  # the same input resumes
    second = write_lines(tmp_path / "b.jsonl", [{"prompt": "hello"}, {"prompt": "something else"},
                                                {"prompt": "a third"}])
    engine = model.tdpipe_engine
    totals = []

    def counting_run_stream(*args, total=None, **kwargs):
        totals.append(total)
        return run_stream(*args, total=total, **kwargs)

    run_stream = engine.run_stream
    engine.run_stream = counting_run_stream
    try:
        summary = run_batch(model, tokenizer, second, output, max_new_tokens=4, progress=False)
    finally:
        engine.run_stream = run_stream
    assert summary.requests == 1 and summary.errors == 1  # line-1 is the same prompt: done
    assert summary.skipped == 1 and totals == [1]  # neither counts the colliding line-2
    error = json.loads((tmp_path / "answers.jsonl.errors.jsonl").read_text())
    assert error["id"] == "line-2" and "answered in" in error["error"] and "for another prompt" in error["error"]


def test_two_runs_on_one_output_are_refused(tiny, tmp_path):
    import fcntl

    model, tokenizer = tiny
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    output = tmp_path / "out.jsonl"
    with open(output, "a") as other:  # another run holding the output
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="being written by another tdpipe run"):
            run_batch(model, tokenizer, source, output, progress=False)
    assert run_batch(model, tokenizer, source, output, max_new_tokens=3, progress=False).requests == 1


def test_a_bom_a_null_id_unknown_roles_and_other_endpoints(tiny, tmp_path):
    model, tokenizer = tiny
    source = tmp_path / "in.jsonl"
    lines = [{"prompt": "first", "id": None}, {"messages": [{"role": "wizard", "content": "hi"}]},
             {"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}},
             {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions", "body": {"prompt": "hi"}}]
    source.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(line) + "\n" for line in lines).encode())
    summary = run_batch(model, tokenizer, source, tmp_path / "out.jsonl", max_new_tokens=3, progress=False)
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["line-1"] and summary.errors == 3
    errors = {e["line"]: e["error"] for e in map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert "role 'wizard' is not one of system, developer, user, assistant, tool" in errors[2]
    assert "only /v1/chat/completions batch lines" in errors[3]
    assert "body needs 'messages'" in errors[4]


def test_a_stage_failure_in_tdpipe_run_says_what_it_kept(tmp_path, capsys, monkeypatch):
    """A stage process that dies: exit 3 and a line naming the stage, the answers kept and that a
    rerun resumes (a traceback and exit 1, the bad-lines code, before)."""
    from tdpipe_hf.apps import cli, offline
    from tdpipe_hf.runtime.local import StageError

    def one_answer_then_a_dead_stage(model, tokenizer, input_path, output, *args, **kwargs):
        with open(output, "a") as out:
            out.write(json.dumps({"id": "line-1", "text": "hi"}) + "\n")
        raise StageError("stage 1 (layers 2-3, pid 4242) died with exit code -9")

    monkeypatch.setattr(offline, "run_batch", one_answer_then_a_dead_stage)
    model_dir = tiny_model_dir(tmp_path / "tiny", seed=54)
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "hello"}, {"prompt": "pipelines"}])
    output = tmp_path / "out.jsonl"
    assert cli.main(["run", str(source), "--model", str(model_dir), "-o", str(output), "--no-chat-template"]) == 3
    err = capsys.readouterr().err
    assert "stage 1 (layers 2-3, pid 4242) died" in err and f"1 answer(s) are in {output}" in err
    assert "Traceback" not in err


def test_tdpipe_run_checks_its_files_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from tdpipe_hf.apps import cli

    monkeypatch.setattr(tdpipe_hf, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    source = write_lines(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    assert cli.main(["run", str(source), "-o", str(tmp_path / "missing" / "out.jsonl")]) == 2
    assert "the output's folder" in capsys.readouterr().err
    assert cli.main(["run", str(source), "-o", str(source)]) == 2
    assert "is the input file" in capsys.readouterr().err
