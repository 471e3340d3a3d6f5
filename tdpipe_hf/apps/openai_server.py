"""``tdpipe serve``: the OpenAI HTTP API (completions, chat completions, models) on one engine.

Every HTTP request becomes one engine request per choice (``n``) in a ``Server``, whose thread
runs the TD-Pipe controller continuously: requests that arrive together share micro-batches like
any others. Tokens travel from the engine thread to the event loop through
``loop.call_soon_threadsafe``, so a thousand open streams cost no threads. A client that goes
away cancels its request (its KV is freed); stop strings are found in the decoded text, which is
cut there, and end the request the same way. Errors use OpenAI's JSON shape; anything the engine
cannot honour exactly (log-probabilities, penalties, ``best_of``...) is refused, never ignored.
Needs the ``serve`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .. import metrics as run_metrics
from ..models import check_text, normalize_messages
from ..plan import GREEDY, SamplingSpec
from .serving import DONE, Server, TokenStream

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows


class APIError(Exception):
    """A request the API refuses: HTTP ``status`` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields the engine cannot honour exactly, with the value that means "not used".
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "prediction": (None,), "audio": (None,),
               "modalities": (None, ["text"]), "parallel_tool_calls": (None,)}
IGNORED = {"user", "metadata", "store", "service_tier", "stream_options", "model", "reasoning_effort"}
# A temperature this small is greedy decoding, as in vLLM (``_SAMPLING_EPS``): dividing float32
# logits by 1e-40 overflows to inf, and the sampler would fail the whole micro-batch, every
# request in it included.
GREEDY_BELOW = 1e-5


@dataclass
class Sampling:
    """The sampling fields of one API request, checked."""

    max_tokens: int | None  # None: as many as fit
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    cache_salt: str | None = None  # vLLM's field: requests share prefix-cached KV only with the same salt

    def spec(self, choice: int) -> SamplingSpec:
        """The engine's sampling for choice ``choice``: greedy at temperature 0 (and below
        ``GREEDY_BELOW``), else HF's own temperature and top-p warpers; ``seed`` differs per choice
        so n > 1 gives n samples."""
        if self.temperature < GREEDY_BELOW:
            return GREEDY
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        processors = LogitsProcessorList()
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        seed = None if self.seed is None else self.seed + choice
        return SamplingSpec(do_sample=True, processors=processors or None, seed=seed)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise APIError(f"'{name}' must be {what} in [{low}, {high}], got {value!r}", name)
    return value


def _means_unused(value, unused: tuple) -> bool:
    """Whether ``value`` is one of ``unused``, type included: ``logprobs: 0`` (an int: the sampled
    token's log-probability, in the completions API) is not ``logprobs: false``."""
    return any(value is v or (type(value) is type(v) and value == v) for v in unused)


def parse_sampling(body: dict) -> Sampling:
    for name in body:
        if name in UNSUPPORTED and not _means_unused(body[name], UNSUPPORTED[name]):
            raise APIError(f"'{name}' is not supported by tdpipe_hf", name, code="unsupported_parameter")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)  # null is unset, as OpenAI reads it
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise APIError(f"'{param}' must be a positive integer, got {max_tokens!r}", param)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(f"'seed' must be an integer, got {seed!r}", "seed")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError(f"'cache_salt' must be a non-empty string, got {salt!r}", "cache_salt")
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed,
                    n=_number(body, "n", 1, 1, MAX_N, integer=True), stop=stop, cache_salt=salt)


class TextTracker:
    """Turns one choice's tokens into text as they come: emits only complete characters, holds
    back what could still become a stop string, and cuts the text at the first stop string.

    Decoding is incremental (each token decodes a short window of the tokens before it, as vLLM's
    detokenizer does), so a long answer costs linear time, and a window whose text ends in an
    unfinished character (one or more U+FFFD: a byte-fallback tokenizer spends one per byte)
    waits for the tokens that finish it; text once emitted never changes."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (complete characters)
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._window = self._read = 0  # token offsets: the decoding window's start; the first token not in ``text``

    def add(self, token: int) -> str:
        """The new text ``token`` makes safe to send ("" if none yet)."""
        self.tokens.append(token)
        if self.stopped:
            return ""
        self._decode(final=False)
        if self.stopped:
            return self.flush()
        ready = len(self.text) - self._hold
        if ready <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:ready], ready
        return delta

    def flush(self) -> str:
        """All the text not sent yet (the answer is over: unfinished characters are decoded as they are)."""
        if not self.stopped:
            self._decode(final=True)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def _decode(self, final: bool) -> None:
        def decode(ids):  # no clean-up of spaces: it can change text already sent (" ," -> ",")
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        before, after = decode(self.tokens[self._window:self._read]), decode(self.tokens[self._window:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return  # nothing new yet, or a character still split over tokens
        searched_from = max(0, len(self.text) - self._hold)  # a stop string may end in the new text
        self.text += after[len(before):]
        self._window, self._read = self._read, len(self.tokens)
        for stop in self.stop:
            at = self.text.find(stop, searched_from)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True  # a later stop found in what is left comes earlier


@dataclass
class Choice:
    index: int
    stream: TokenStream
    text: TextTracker
    finish_reason: str | None = None


class OpenAIService:
    """The API's logic over one ``Server``, independent of the web framework."""

    def __init__(self, server: Server, tokenizer, model_name: str, max_tokens_limit: int = 1024):
        self.server = server
        self.tokenizer = tokenizer  # decodes answers, on the event loop
        # Prompts are tokenized off the event loop, so a long one holds up no other request, each
        # worker thread with its own copy of the tokenizer: a fast tokenizer used from two threads
        # at once can raise "Already borrowed" (transformers#47085).
        self.tokenizing = ThreadPoolExecutor(max_workers=TOKENIZING_THREADS, thread_name_prefix="tdpipe-tokenize")
        self._thread_local = threading.local()
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.created = int(time.time())
        self.finished: dict[str, int] = {}  # finish reason -> requests, for /metrics
        self.http_requests = 0

    @property
    def prompt_tokenizer(self):
        """This thread's copy of the tokenizer (made on its first use)."""
        mine = getattr(self._thread_local, "tokenizer", None)
        if mine is None:
            mine = self._thread_local.tokenizer = _private_copy(self.tokenizer)
        return mine

    # ---- request parsing --------------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise APIError("'model' is required", "model")
        if model != self.model_name:
            raise APIError(f"model {model!r} does not exist; this server serves {self.model_name!r}", "model",
                           status=404, code="model_not_found")

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt in a list, as the openai client may send it
        if isinstance(prompt, str):
            if not prompt:
                raise APIError("'prompt' is empty", "prompt")
            try:
                check_text("'prompt'", prompt)
            except ValueError as exc:
                raise APIError(str(exc), "prompt") from None
            return self.prompt_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise APIError("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")

    def chat_prompt(self, body: dict) -> list[int]:
        try:
            clean = normalize_messages(body.get("messages"))
        except ValueError as exc:
            raise APIError(str(exc), "messages") from None
        try:
            return list(self.prompt_tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False))
        except Exception as exc:
            raise APIError(f"the chat template rejected the messages: {exc}", "messages") from None

    # ---- running ----------------------------------------------------------------------------
    def start(self, prompt: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop,
              queue: asyncio.Queue, prompt_field: str = "prompt") -> list[Choice]:
        """Submit one engine request per choice; their tokens arrive on ``queue`` as (index, item).
        ``prompt_field`` (``messages`` or ``prompt``) is what an error blames when the prompt alone
        leaves no room for an answer."""
        context = getattr(self.server.engine_model_config, "max_position_embeddings", None)
        limits = [(limit, where) for limit, where in ((context, "model's context"),
                                                      (self.server.engine.request_capacity_tokens, "server's KV budget"))
                  if limit is not None]
        for limit, where in limits:
            if len(prompt) >= limit:
                raise APIError(f"the prompt has {len(prompt)} tokens: the {where} of {limit} tokens leaves no room "
                               f"for an answer", prompt_field, code="context_length_exceeded")
        if sampling.max_tokens is None:  # as much as fits, up to the server's default cap
            room = min(limit for limit, _ in limits) - len(prompt) if limits else self.max_tokens_limit
            sampling.max_tokens = max(1, min(self.max_tokens_limit, room))
        for limit, where in limits:
            if len(prompt) + sampling.max_tokens > limit:
                raise APIError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
                               f"the {where} of {limit} tokens", "max_tokens", code="context_length_exceeded")
        choices: list[Choice] = []
        try:
            for index in range(sampling.n):
                def sink(item, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, item))

                stream = self.server.submit(prompt, sampling.max_tokens, sampling.spec(index), sink=sink,
                                            cache_salt=sampling.cache_salt)
                choices.append(Choice(index, stream, TextTracker(self.tokenizer, sampling.stop)))
        except ValueError as exc:
            self.cancel(choices)
            raise APIError(str(exc), "prompt") from None
        except RuntimeError as exc:  # the engine's server closed (shutting down) before this request got in
            self.cancel(choices)
            raise APIError(f"{exc}: the server is shutting down", status=503, kind="server_error") from None
        return choices

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            if choice.finish_reason is None:
                self.server.cancel(choice.stream)

    async def events(self, choices: list[Choice], queue: asyncio.Queue) -> AsyncIterator[tuple[Choice, str]]:
        """(choice, new text) as tokens arrive, then ("", finish) once per choice; a choice whose
        text hit a stop string is cancelled in the engine and finishes with "stop"."""
        open_choices = len(choices)
        while open_choices:
            index, item = await queue.get()
            choice = choices[index]
            if choice.finish_reason is not None:
                continue  # tokens after a stop string, already cancelled
            if item is DONE:
                if choice.stream.error is not None:
                    raise RuntimeError(f"the engine failed: {choice.stream.error}")
                reason = choice.stream.finish_reason
                choice.finish_reason = "length" if reason == "length" else "stop"
                open_choices -= 1
                yield choice, choice.text.flush()
                continue
            delta = choice.text.add(item)
            if choice.text.stopped:
                self.server.cancel(choice.stream)
                choice.finish_reason = "stop"
                open_choices -= 1
                yield choice, delta
            elif delta:
                yield choice, delta

    def record(self, choices: list[Choice]) -> None:
        for choice in choices:
            reason = choice.finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1

    @staticmethod
    def usage(prompt: list[int], choices: list[Choice]) -> dict:
        completion = sum(len(c.text.tokens) for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion}

    # ---- monitoring -------------------------------------------------------------------------
    def prometheus(self) -> str:
        """The engine's state in Prometheus' text format."""
        server = self.server
        stats = server.stats
        blocks = server.controller.scheduler.blocks
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP tdpipe_{name} {help_text}", f"# TYPE tdpipe_{name} {kind}"])
            lines.extend(f"tdpipe_{name}{labels} {value}" for labels, value in samples)

        metric("requests_running", "gauge", "Requests holding KV in the engine.", [("", server.num_running)])
        metric("requests_waiting", "gauge", "Requests queued for admission.", [("", server.num_waiting)])
        metric("requests_finished_total", "counter", "Choices finished, by finish reason.",
               [(f'{{reason="{reason}"}}', count) for reason, count in sorted(self.finished.items())] or [("", 0)])
        metric("http_requests_total", "counter", "Completion requests received.", [("", self.http_requests)])
        totals = server.totals
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", totals["generated_tokens"])])
        metric("kv_blocks_used", "gauge", "KV cache blocks in use.", [("", blocks.num_used)])
        metric("kv_blocks_total", "gauge", "KV cache blocks in the budget.", [("", blocks.num_blocks)])
        metric("prefix_cache_tokens_total", "counter", "Prompt tokens taken from the prefix cache, not computed.",
               [("", totals["cached_tokens"])])
        metric("preemptions_total", "counter", "Requests preempted (recomputed later).", [("", totals["preemptions"])])
        metric("phase_switches_total", "counter", "Prefill/decode phase switches.", [("", totals["phase_switches"])])
        metric("engine_failures_total", "counter", "Runs that failed (their requests with them) and restarted.",
               [("", server.engine_failures)])
        metric("stage_restarts_total", "counter", "Stage failures noticed between requests (no request lost).",
               [("", server.stage_restarts)])
        bubbles = run_metrics.bubble_ratios(list(stats.timeline)).get("all", {})
        metric("stage_bubble_ratio", "gauge", "Idle share of each stage over the recent timeline.",
               [(f'{{stage="{stage}"}}', round(ratio, 4)) for stage, ratio in sorted(bubbles.items())] or [("", 0)])
        return "\n".join(lines) + "\n"


def build_app(model, tokenizer, model_name: str = "tdpipe", max_tokens_limit: int = 1024,
              close_engine: bool = False, demo: bool = False, model_path: str | None = None):
    """The FastAPI app serving ``model`` (wrapped with ``tdpipe_hf.wrap``). ``close_engine``: on
    shutdown, also close the engine (its stage processes). ``demo``: also mount the Gradio demo
    at ``/demo``, its chat on this server's engine (its throughput tab loads ``model_path`` again
    for runs of its own)."""
    server = Server(model)
    service = OpenAIService(server, tokenizer, model_name, max_tokens_limit)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()  # open streams end with an error; the engine thread stops
        service.tokenizing.shutdown(wait=False, cancel_futures=True)
        if close_engine:
            model.tdpipe_engine.close()

    app = FastAPI(title="tdpipe_hf", lifespan=lifespan)
    app.state.service = service

    if demo:
        import gradio as gr

        from .demo import DemoBackend
        from .demo import build_app as build_demo

        app.state.demo = DemoBackend(model_path, server=server)
        app = gr.mount_gradio_app(app, build_demo(app.state.demo), path="/demo")

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc):
        return JSONResponse(APIError(f"invalid request: {exc.errors()[0].get('msg', exc)}").body(), status_code=400)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(f"the request body ({int(declared)} bytes) is over the server's limit of {MAX_BODY_BYTES}",
                           status=413)
        chunks, size = [], 0
        async for chunk in request.stream():  # read what a body without a length sends, up to the limit
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(f"the request body is over the server's limit of {MAX_BODY_BYTES} bytes", status=413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise APIError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        if not server.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(service.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "tdpipe_hf"}]}

    async def complete(request: Request, chat: bool):
        body = await read_json(request)
        service.http_requests += 1
        for name in body:
            if name not in UNSUPPORTED and name not in IGNORED and name not in KNOWN[chat]:
                raise APIError(f"unknown parameter '{name}'", name, code="unknown_parameter")
        service.check_model(body)
        sampling = parse_sampling(body)
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(service.tokenizing, service.chat_prompt if chat else service.completion_prompt,
                                            body)
        stream = body.get("stream")
        stream = False if stream is None else stream  # null is unset
        if not isinstance(stream, bool):
            raise APIError("'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError("'stream_options' must be an object", "stream_options")
        include_usage = bool(options.get("include_usage")) if stream else False
        queue: asyncio.Queue = asyncio.Queue()
        choices = service.start(prompt, sampling, loop, queue, "messages" if chat else "prompt")
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        if stream:
            return StreamingResponse(_sse(service, choices, queue, ident, kind, created, chat, prompt, include_usage),
                                     media_type="text/event-stream")
        texts = {c.index: "" for c in choices}
        try:
            waiter = asyncio.ensure_future(_collect(service, choices, queue, texts))
            while not waiter.done():  # a client that goes away cancels its request
                await asyncio.wait([waiter], timeout=0.5)
                if not waiter.done() and await request.is_disconnected():
                    waiter.cancel()
                    service.cancel(choices)
                    return JSONResponse({}, status_code=499)
            waiter.result()
        except RuntimeError as exc:  # the engine failed: every caller hears of it
            raise APIError(str(exc), status=500, kind="server_error") from None
        finally:
            service.cancel(choices)  # choices still running (after a failure) have no reader any more
            service.record(choices)
        out = []
        for c in choices:
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": texts[c.index]},
                            "finish_reason": c.finish_reason, "logprobs": None})
            else:
                out.append({"index": c.index, "text": texts[c.index], "finish_reason": c.finish_reason,
                            "logprobs": None})
        return {"id": ident, "object": kind, "created": created, "model": model_name, "choices": out,
                "usage": service.usage(prompt, choices)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


TOKENIZING_THREADS = 4
# a request body larger than this is refused (413) before it is parsed: one huge body must not
# take the memory of the process that holds the model (a context of 128k tokens as JSON text or
# token ids is a few MiB)
MAX_BODY_BYTES = 32 * 2**20


def _private_copy(tokenizer):
    """A copy of ``tokenizer`` for one thread's use (the tokenizer itself if it cannot be copied)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # an object that cannot be copied: shared, as before
        return tokenizer


KNOWN = {False: {"prompt", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "stream", "cache_salt"},
         True: {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop",
                "stream", "cache_salt"}}


async def _collect(service: OpenAIService, choices: list[Choice], queue: asyncio.Queue, texts: dict) -> None:
    async for choice, delta in service.events(choices, queue):
        texts[choice.index] += delta


async def _sse(service: OpenAIService, choices: list[Choice], queue: asyncio.Queue, ident: str, kind: str,
               created: int, chat: bool, prompt: list[int], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per choice with its finish
    reason, the usage chunk if asked for, then ``[DONE]``. If the client goes away, the generator
    is closed and the choices still running are cancelled."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    model = service.model_name

    def chunk(choice_part: list[dict], usage: dict | None = None) -> str:
        data = {"id": ident, "object": chunk_kind, "created": created, "model": model, "choices": choice_part}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for c in choices])
        async for choice, delta in service.events(choices, queue):
            if chat:
                part = {"index": choice.index, "delta": {"content": delta} if delta else {},
                        "finish_reason": choice.finish_reason, "logprobs": None}
            else:
                part = {"index": choice.index, "text": delta, "finish_reason": choice.finish_reason, "logprobs": None}
            yield chunk([part])
        if include_usage:
            yield chunk([], service.usage(prompt, choices))
        yield "data: [DONE]\n\n"
    except RuntimeError as exc:  # the engine failed mid-stream (or the server is closing): say so
        yield f"data: {json.dumps(APIError(str(exc), status=500, kind='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        service.cancel(choices)
        service.record(choices)


def serve(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_tokens_limit: int = 1024, log_level: str = "info", demo: bool = False,
          model_path: str | None = None, shutdown_grace: float = 10.0) -> None:
    """Run the server until SIGTERM / Ctrl-C: it stops accepting, gives open requests up to
    ``shutdown_grace`` seconds, ends the rest with an error (an error event and ``[DONE]`` on a
    stream, a JSON 500 otherwise) and closes the engine (no stage process is left behind)."""
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises the signal after its graceful shutdown, so the process would die of
        it (exit -15); once everything is closed, exiting 0 is the truth."""

        async def shutdown(self, sockets=None):
            # After the grace period close the engine's server: every open request then ends with
            # the documented error instead of being cancelled by uvicorn mid-response.
            loop = asyncio.get_running_loop()
            timer = loop.call_later(shutdown_grace, lambda: loop.run_in_executor(None, engine_server.close))
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    app = build_app(model, tokenizer, model_name, max_tokens_limit, close_engine=True, demo=demo,
                    model_path=model_path)
    engine_server = app.state.service.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_grace + 30)  # a last resort: the engine closes first
    GracefulServer(config).run()


@contextmanager
def running_in_thread(app, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 60.0):
    """Serve ``app`` with uvicorn on a thread of this process (tests, benchmarks, notebooks);
    yields the base URL and stops the server on exit."""
    import threading

    import uvicorn

    from ..runtime.spawn import free_port

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="tdpipe-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
