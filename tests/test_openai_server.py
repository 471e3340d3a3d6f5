"""`tdpipe serve`: the OpenAI API over the engine, checked with FastAPI's test client, a real
uvicorn server on 127.0.0.1, the `openai` client package, and `tdpipe serve` as a process.

Greedy answers must equal `model.generate` for the same prompt; bad requests get HTTP 400 in
OpenAI's error shape and leave other requests alone; a client that goes away frees its KV."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import tdpipe_hf  # noqa: E402
from conftest import byte_tokenizer, process_running, tiny_model, tiny_model_dir  # noqa: E402
from tdpipe_hf.apps.openai_server import TextTracker, build_app, running_in_thread  # noqa: E402
from tdpipe_hf.runtime.spawn import free_port  # noqa: E402

NAME = "smol"


@pytest.fixture(scope="module")
def served(smollm2):
    """SmolLM2 wrapped with 2 local stages, behind the app (the test client starts its lifespan)."""
    from fastapi.testclient import TestClient

    model, tokenizer = smollm2
    tdpipe_hf.wrap(model, num_stages=2, kv_blocks=400)
    app = build_app(model, tokenizer, NAME)
    with TestClient(app) as client:
        yield client, model, tokenizer
    tdpipe_hf.unwrap(model)


def greedy_text(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"tdpipe_{name}"))


def test_models_health_and_metrics(served):
    client, _, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    text = client.get("/metrics").text
    for name in ("requests_running", "requests_waiting", "generated_tokens_total", "kv_blocks_used",
                 "kv_blocks_total", "preemptions_total", "phase_switches_total", "stage_bubble_ratio",
                 "prefix_cache_tokens_total"):
        assert f"# TYPE tdpipe_{name} " in text
    assert metric(client, "kv_blocks_total") == 400


def test_chat_and_completion_are_greedy_generate(served):
    client, model, tokenizer = served
    question = "Name three colours."
    ask = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}
    reply = client.post("/v1/chat/completions", json=ask)
    assert reply.status_code == 200, reply.text
    cached = metric(client, "prefix_cache_tokens_total")
    again = client.post("/v1/chat/completions", json=ask)  # from the blocks the first one computed
    cached_now = metric(client, "prefix_cache_tokens_total")
    assert cached_now - cached == 16 * ((len(chat_ids(tokenizer, question)) - 1) // 16)
    salted = client.post("/v1/chat/completions", json={**ask, "cache_salt": "tenant-b"})  # computed afresh
    assert metric(client, "prefix_cache_tokens_total") == cached_now
    body = reply.json()
    expected = greedy_text(model, tokenizer, chat_ids(tokenizer, question), 24)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert again.json()["choices"][0]["message"]["content"] == expected
    assert salted.json()["choices"][0]["message"]["content"] == expected
    assert body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == len(chat_ids(tokenizer, question))
    assert 1 <= body["usage"]["completion_tokens"] <= 24
    prompt = "The three primary colours are"
    body = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 16,
                                                "temperature": 0}).json()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert body["choices"][0]["text"] == greedy_text(model, tokenizer, ids, 16)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def sse_events(client, path: str, payload: dict) -> list:
    events = []
    with client.stream("POST", path, json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_gives_the_same_text_then_usage_and_done(served):
    client, model, tokenizer = served
    question = "Write one sentence about the sea."
    events = sse_events(client, "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 20, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    chunks = [e for e in events[:-2] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == greedy_text(model, tokenizer, chat_ids(tokenizer, question), 20)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    completion = sse_events(client, "/v1/completions", {"model": NAME, "prompt": "Once upon a time",
                                                         "max_tokens": 12, "temperature": 0, "stream": True})
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert "".join(e["choices"][0]["text"] for e in completion[:-1]) == greedy_text(model, tokenizer, ids, 12)


def test_stop_strings_cut_the_text_and_free_the_kv(served):
    client, model, tokenizer = served
    prompt = "List the days of the week:"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = greedy_text(model, tokenizer, ids, 40)
    stop = full.strip().split()[2]  # a word in the middle of the greedy answer
    cut = full[:full.find(stop)]
    for stream in (False, True):
        payload = {"model": NAME, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": [stop, "@@@"],
                   "stream": stream}
        if stream:
            events = sse_events(client, "/v1/completions", payload)
            text = "".join(e["choices"][0]["text"] for e in events[:-1])
            reason = events[-2]["choices"][0]["finish_reason"]
        else:
            choice = client.post("/v1/completions", json=payload).json()["choices"][0]
            text, reason = choice["text"], choice["finish_reason"]
        assert (text, reason) == (cut, "stop")
    deadline = time.monotonic() + 30
    while metric(client, "kv_blocks_used") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(client, "kv_blocks_used") == 0 and metric(client, "requests_running") == 0


def test_text_tracker_holds_back_partial_characters_and_stop_prefixes():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True, **_):
            return bytes(ids).decode("utf-8", errors="replace")

    tracker = TextTracker(Bytes(), ["END"])
    pieces = [tracker.add(b) for b in "héllo EN".encode()]
    assert not any("\ufffd" in piece for piece in pieces)  # 'é' is two tokens: sent whole
    assert "".join(pieces) == "héllo "  # 'EN' is held back: it may start the stop string
    assert tracker.add(ord("D")) == "" and tracker.stopped and tracker.text == "héllo "
    free = TextTracker(Bytes(), [])
    assert "".join(free.add(b) for b in "né".encode()) == "né" and not free.stopped


def test_text_tracker_waits_for_every_byte_of_a_byte_fallback_character():
    """A SentencePiece byte-fallback tokenizer (Llama-2, Mistral) decodes one U+FFFD per byte of an
    unfinished character: none may be sent, and the character must come whole once finished."""
    from tokenizers import decoders

    decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    pieces = ["A", "<0xE4>", "<0xBD>", "<0xA0>", "▁B", "<0xC3>"]  # "A你 B" and a byte left unfinished

    class Pieces:
        def decode(self, ids, skip_special_tokens=True, **_):
            return decoder.decode([pieces[i] for i in ids])

    for stop in ([], ["zz"]):
        tracker = TextTracker(Pieces(), stop)
        sent = [tracker.add(i) for i in range(len(pieces))]
        assert not any("\ufffd" in piece for piece in sent)
        assert "".join(sent) + tracker.flush() == "A你▁B\ufffd"  # ended mid-character: sent as decoded


def test_n_choices_with_a_seed_are_reproducible(served):
    client, _, _ = served
    payload = {"model": NAME, "messages": [{"role": "user", "content": "Invent a name for a cat."}],
               "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 3}
    first = client.post("/v1/chat/completions", json=payload).json()
    second = client.post("/v1/chat/completions", json=payload).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert len(set(texts)) > 1  # three samples, not one answer three times


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "'model' is required"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, "'messages' must be"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "hi"}]}, "'role'"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, "content must be"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role 'wizard' is not one of system, developer, user, assistant, tool"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "only text parts"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, "'prompt' is empty"),
    ("/v1/completions", b'{"model": "smol", "prompt": "a\\ud800b"}', "'prompt' is not valid Unicode text"),
    ("/v1/chat/completions", b'{"model": "smol", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content is not valid Unicode text"),  # lone surrogates: JSON allows the escape
    ("/v1/completions", {"model": NAME, "prompt": {"text": "a"}}, "'prompt' must be"),
    ("/v1/completions", {"model": NAME, "prompt": [10**9]}, "outside the vocabulary"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": "ten"}, "'max_tokens' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, "'max_tokens' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 100_000}, "context"),
    ("/v1/completions", {"model": NAME, "prompt": "word " * 20_000}, "leaves no room for an answer"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 7000}, "KV budget"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": 5}, "'temperature' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 0}, "'n' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stop": 3}, "'stop' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "seed": "x"}, "'seed' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "cache_salt": 7}, "'cache_salt' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stream": "yes"}, "'stream' must be"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 2}, "'logprobs' is not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 0}, "'logprobs' is not supported"),  # not False
    ("/v1/completions", {"model": NAME, "prompt": "a", "stream": 0}, "'stream' must be true or false"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "presence_penalty": 0.5}, "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "best_of": 3}, "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "tempreature": 0}, "unknown parameter 'tempreature'"),
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nested past Python's recursion limit
    ("/v1/completions", {"model": NAME, "prompt": "a", "stream": True, "stream_options": "usage"},
     "'stream_options' must be an object"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", b"\xff\xfe", "not valid JSON"),
]


def test_bad_requests_get_openai_errors_and_others_are_untouched(served):
    client, model, tokenizer = served
    question = "What is the capital of Italy?"
    expected = greedy_text(model, tokenizer, chat_ids(tokenizer, question), 30)
    result = {}

    def good():
        result["events"] = sse_events(client, "/v1/chat/completions", {
            "model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 30,
            "temperature": 0, "stream": True})

    runner = threading.Thread(target=good)
    runner.start()
    for path, payload, message in BAD_REQUESTS:
        if isinstance(payload, bytes):
            reply = client.post(path, content=payload, headers={"content-type": "application/json"})
        else:
            reply = client.post(path, json=payload)
        assert reply.status_code == 400, (payload, reply.text)
        error = reply.json()["error"]
        assert message in error["message"], (payload, error)
        assert error["type"] == "invalid_request_error"
    runner.join(timeout=120)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in result["events"][:-1])
    assert text == expected


def test_an_unknown_model_is_not_found_and_a_null_stream_is_unset(served):
    client, _, _ = served
    reply = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert "does not exist" in reply.json()["error"]["message"]
    reply = client.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2, "stream": None})
    assert reply.status_code == 200 and reply.json()["object"] == "text_completion"


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(served, monkeypatch):
    """413 in OpenAI's shape, whether the body says its length or streams it in chunks."""
    import tdpipe_hf.apps.openai_server as api

    client, _, _ = served
    monkeypatch.setattr(api, "MAX_BODY_BYTES", 1000)
    body = json.dumps({"model": NAME, "prompt": "x" * 2000, "max_tokens": 2}).encode()
    for content in (body, iter([body[:600], body[600:]])):  # with a Content-Length, then chunked
        reply = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert reply.status_code == 413, reply.text
        assert "over the server's limit of 1000" in reply.json()["error"]["message"]
    small = client.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2})
    assert small.status_code == 200


def test_a_tiny_or_whole_number_temperature_is_served(served):
    """A temperature of 1e-300 overflowed float32 logits and failed every request in the
    micro-batch; below 1e-5 it is greedy now (as in vLLM). A whole number such as 2 was refused
    by HF's warper (it wants a float) with an error that blamed the prompt."""
    client, model, tokenizer = served
    prompt = "Name three colours."
    expected = greedy_text(model, tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"], 8)
    for temperature in (1e-300, 1e-6):
        reply = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 8,
                                                     "temperature": temperature})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
    reply = client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 2, "seed": 1})
    assert reply.status_code == 200, reply.text


def test_a_prompt_over_the_context_is_blamed_on_the_prompt(served):
    client = served[0]
    for path, field, payload in (("/v1/chat/completions", "messages",
                                  {"messages": [{"role": "user", "content": "word " * 20_000}]}),
                                 ("/v1/completions", "prompt", {"prompt": "word " * 20_000})):
        reply = client.post(path, json={"model": NAME, "max_tokens": 8, **payload})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == field, error
        assert "leaves no room for an answer" in error["message"] and error["code"] == "context_length_exceeded"


@pytest.fixture(scope="module")
def live(smollm2):
    """A real uvicorn server on 127.0.0.1 (in a thread) over SmolLM2 with 1 stage."""
    model, tokenizer = smollm2
    tdpipe_hf.wrap(model, num_stages=1, kv_blocks=600)
    with running_in_thread(build_app(model, tokenizer, NAME)) as base:
        yield base, model, tokenizer
    tdpipe_hf.unwrap(model)


def test_the_openai_client_package_gets_greedy_generate(live):
    openai = pytest.importorskip("openai")
    base, model, tokenizer = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    question = "Give me a word that rhymes with cat."
    expected = greedy_text(model, tokenizer, chat_ids(tokenizer, question), 20)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                          max_tokens=20, temperature=0)
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                            max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    prompt = "Water boils at"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert completion.choices[0].text == greedy_text(model, tokenizer, ids, 10)
    assert completion.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.NotFoundError, match="does not exist"):  # 404, as OpenAI and vLLM answer
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=5)


def test_a_client_that_goes_away_cancels_its_request(live):
    base, _, _ = live
    payload = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a very long story."}],
               "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few chunks, then hang up
        assert any(line.startswith("data: ") for line in received)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                      if line and not line.startswith("#")}
            if values.get('tdpipe_requests_finished_total{reason="abort"}') and not values["tdpipe_kv_blocks_used"]:
                break
            time.sleep(0.1)
        assert values.get('tdpipe_requests_finished_total{reason="abort"}') == 1
        assert values["tdpipe_kv_blocks_used"] == 0 and values["tdpipe_requests_running"] == 0
        assert values["tdpipe_generated_tokens_total"] < 500  # it stopped, long before max_tokens


def children_of(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found |= {int(p) for p in handle.read().split()}
    return found | {grandchild for child in found for grandchild in children_of_safe(child)}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def children_of_safe(pid: int) -> set[int]:
    try:
        return children_of(pid)
    except FileNotFoundError:
        return set()


def wait_until_healthy(proc: subprocess.Popen, base: str, timeout: float = 240) -> None:
    """Until ``tdpipe serve`` at ``base`` answers /health (or its process ends, or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)


def test_tdpipe_serve_answers_then_shuts_down_on_sigterm_leaving_no_stage_process(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "tiny", seed=5)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tdpipe_hf", "serve", str(model_dir), "--num-stages", "2",
                             "--port", str(port), "--kv-blocks", "64", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, base)
        reply = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8,
                                                            "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        workers = {pid for pid in children_of(proc.pid) if "spawn_main" in cmdline(pid)}  # not the resource tracker
        assert len(workers) == 2, "expected the two stage processes"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output[-3000:]
        assert not [pid for pid in workers if process_running(pid)], "stage processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_requests_still_open_after_the_shutdown_grace_end_with_an_error(tmp_path):
    """SIGTERM with ``--shutdown-grace 0``: a stream still running gets an error event and
    ``[DONE]``, a plain request a JSON 500 saying the server closed; neither is cut off."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tdpipe_hf", "serve", "--port", str(port), "--shutdown-grace", "0",
                             "--served-model-name", NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    payload = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
               "temperature": 0}
    try:
        wait_until_healthy(proc, base)
        plain: dict = {}
        waiter = threading.Thread(target=lambda: plain.update(reply=httpx.post(
            f"{base}/v1/chat/completions", json=payload, timeout=120)))
        waiter.start()
        deadline = time.monotonic() + 120  # a hang guard: wait until the plain request runs
        with httpx.Client(base_url=base, timeout=10) as client:
            while metric(client, "requests_running") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        lines = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**payload, "stream": True},
                          timeout=120) as stream:
            for line in stream.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # the first chunk is out: both requests are running
                lines.append(line)
        waiter.join(timeout=120)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "the server closed before this request finished" in json.loads(events[-2])["error"]["message"]
    reply = plain["reply"]
    assert reply.status_code == 500 and "the server closed" in reply.json()["error"]["message"]


def test_the_demo_mounts_on_the_server_and_chats_through_its_engine(tmp_path):
    pytest.importorskip("gradio")
    from fastapi.testclient import TestClient

    model_dir = str(tiny_model_dir(tmp_path / "tiny", seed=9))
    model, tokenizer = tdpipe_hf.from_pretrained(model_dir, num_stages=2, kv_blocks=64)
    app = build_app(model, tokenizer, "tiny", demo=True, model_path=model_dir)
    try:
        with TestClient(app) as client:
            assert client.get("/demo/").status_code == 200
            backend = app.state.demo
            before = metric(client, "generated_tokens_total")
            *_, (history, status) = backend.chat("hello", [], 6)
            assert status.startswith("answered: 6 tokens")
            assert metric(client, "generated_tokens_total") == before + 6  # the server's own engine answered
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": [3, 4], "max_tokens": 4})
            assert reply.status_code == 200
    finally:
        tdpipe_hf.unwrap(model)


def test_a_request_that_arrives_while_the_server_closes_gets_a_json_503():
    import asyncio

    from tdpipe_hf.apps.openai_server import APIError, OpenAIService, Sampling
    from tdpipe_hf.apps.serving import Server

    model = tdpipe_hf.wrap(tiny_model("llama", seed=5), num_stages=1)
    server = Server(model)
    service = OpenAIService(server, byte_tokenizer(), "tiny", 64)
    server.close()
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(APIError) as refused:
            service.start([5, 6, 7], Sampling(max_tokens=4), loop, asyncio.Queue())
    finally:
        loop.close()
        tdpipe_hf.unwrap(model)
    assert refused.value.status == 503 and "the server is shutting down" in refused.value.message


def test_the_server_answers_others_while_a_prompt_is_tokenized():
    """A long prompt's tokenization runs off the event loop: while one is under way, ``/health``
    and other requests are answered (before, a 4 MB prompt held every request for seconds)."""
    entered, release = threading.Event(), threading.Event()
    tokenizer = byte_tokenizer()

    class SlowTokenizer:
        """The byte tokenizer, holding any prompt that starts with "slow" until released."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            if text.startswith("slow"):
                entered.set()
                release.wait(timeout=60)
            return tokenizer(text, **kwargs)

    model = tdpipe_hf.wrap(tiny_model("llama", seed=5, vocab_size=len(tokenizer)), num_stages=1)
    try:
        with running_in_thread(build_app(model, SlowTokenizer(), "tiny", 64)) as base:
            answers = []
            slow = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{base}/v1/completions", json={"model": "tiny", "prompt": "slow one", "max_tokens": 3,
                                                "temperature": 0}, timeout=120)))
            slow.start()
            assert entered.wait(timeout=60)
            try:
                health = httpx.get(f"{base}/health", timeout=30)
                other = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "quick",
                                                                   "max_tokens": 3, "temperature": 0}, timeout=30)
            finally:
                release.set()
                slow.join(timeout=120)
    finally:
        tdpipe_hf.unwrap(model)
    assert health.status_code == 200 and other.status_code == 200
    assert other.json()["usage"]["completion_tokens"] == 3
    assert answers and answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["usage"]["completion_tokens"] == 3



def test_a_null_max_completion_tokens_leaves_max_tokens_in_force():
    from tdpipe_hf.apps.openai_server import parse_sampling

    assert parse_sampling({"max_completion_tokens": None, "max_tokens": 5}).max_tokens == 5
    assert parse_sampling({"max_completion_tokens": 3, "max_tokens": 5}).max_tokens == 3
