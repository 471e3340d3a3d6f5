"""Serve one wrapped model to many callers at once (the demo's chat, any app).

One engine thread owns the controller and runs its loop step by step; callers on any thread
``submit`` prompts and iterate their tokens as they are sampled. A request that arrives while
others run joins them at the next step, so concurrent users share the pipeline's micro-batches
(which is where TD-Pipe's throughput comes from).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from ..controller import Request
from ..controller.controller import RunStats
from ..mixin import check_vocabulary, eos_token_ids
from ..plan import GREEDY, SamplingSpec

DONE = object()  # the last item a TokenStream's sink receives
logger = logging.getLogger(__name__)
IDLE_CHECK_SECONDS = 1.0  # how often an idle server looks at its stage processes
KEEP_EVENTS = 20_000  # timeline events kept for a long-lived server (the most recent)


class TokenStream:
    """The tokens of one request, as they come. Iterate it, or call ``tokens()`` to wait for all.
    If the engine fails, iteration raises the engine's error.

    ``sink``: where the engine thread puts each token and, last, the end marker ``DONE``, in
    place of this object's own queue (an asyncio server passes a thread-safe hand-over to its
    event loop; it then reads ``error`` and ``finish_reason`` itself after ``DONE``)."""

    def __init__(self, request: Request, sink: Callable[[object], None] | None = None):
        self.request = request
        self._queue: queue.Queue = queue.Queue()
        self.put = sink or self._queue.put
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if item is DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def tokens(self) -> list[int]:
        return list(self)

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason


class Server:
    """``Server(model)`` for a model wrapped with ``tdpipe_hf.wrap``; ``close()`` stops the thread
    (the engine stays open; ``tdpipe_hf.unwrap`` closes it)."""

    def __init__(self, model):

        self.model = model
        self.engine = model.tdpipe_engine
        self.eos = frozenset(eos_token_ids(model.generation_config))
        self.vocab_size = model.config.vocab_size
        self.engine_model_config = model.config
        self._incoming: queue.Queue = queue.Queue()
        self._streams: dict[int, TokenStream] = {}
        self._in_engine: set[int] = set()  # ids of the requests handed to the current controller
        self._holding = False  # whether this server holds the engine's pipeline (``_hold_pipeline``)
        self._ids = itertools.count()
        self._closed = threading.Event()
        self._idle_checked = time.monotonic()
        self.stage_restarts = 0  # stage failures noticed between requests (see ``_check_idle_stages``)
        self.engine_failures = 0  # runs that failed and were started afresh
        self._totals_lock = threading.Lock()
        self._earlier = dict.fromkeys(("generated_tokens", "preemptions", "phase_switches", "cached_tokens"), 0)
        self.controller = self.engine.controller(on_token=self._on_token, on_finish=self._on_finish)
        self._thread = threading.Thread(target=self._loop, name="tdpipe-server", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> RunStats:
        """The running totals and recent timeline of the current engine run (they restart after
        an engine failure; ``totals`` does not)."""
        return self.controller.stats

    def _counts(self) -> dict[str, int]:
        scheduler = self.controller.scheduler
        return {"generated_tokens": self.controller.stats.generated_tokens,
                "preemptions": scheduler.num_preemptions, "phase_switches": scheduler.num_phase_switches,
                "cached_tokens": getattr(scheduler.blocks, "cached_tokens", 0)}

    @property
    def totals(self) -> dict[str, int]:
        """Tokens generated, preemptions, phase switches and prompt tokens taken from the prefix
        cache since the server started (``stats`` restarts with the engine after a failure; these
        do not, as counters must not)."""
        with self._totals_lock:
            return {name: self._earlier[name] + value for name, value in self._counts().items()}

    @property
    def is_running(self) -> bool:
        """Whether the engine thread is serving (False once closed, or if it died)."""
        return self._thread.is_alive() and not self._closed.is_set()

    @property
    def num_running(self) -> int:
        return len(self.controller.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.controller.scheduler.waiting) + self._incoming.qsize()

    def submit(self, prompt_ids: list[int], max_new_tokens: int = 128, sampling: SamplingSpec = GREEDY,
               sink: Callable[[object], None] | None = None, cache_salt: str | None = None) -> TokenStream:
        """Queue one prompt (token ids, chat template applied). A ``ValueError`` naming the problem
        if it can never run (empty, ids outside the vocabulary, longer than the KV budget); the
        requests already queued are untouched. Requests share prefix-cached KV blocks only with
        requests of the same ``cache_salt`` (give each tenant its own)."""
        if self._closed.is_set():
            raise RuntimeError("the server is closed")
        if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__"):
            raise ValueError(f"the prompt must be a list of token ids, got {type(prompt_ids).__name__}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        check_vocabulary("the prompt", prompt_ids, self.vocab_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        request = Request(next(self._ids), list(prompt_ids), max_new_tokens, self.eos, sampling=sampling,
                          cache_salt=cache_salt)
        self.engine.check_fits([request])
        stream = TokenStream(request, sink)
        self._streams[request.request_id] = stream
        self._incoming.put(request)
        return stream

    def cancel(self, stream: TokenStream) -> None:
        """Stop ``stream``'s request wherever it is; its KV is freed and its stream ends (finish
        reason ``"abort"``). Safe from any thread, and for a request that already finished."""
        self._incoming.put(stream.request.request_id)

    def close(self) -> None:
        """Stop the engine thread; requests not finished end with an error. The engine's pipeline
        is left empty (the thread drains it), so ``model.generate`` or another server can go on."""
        self._closed.set()
        self._thread.join(timeout=30)
        for request_id in list(self._streams):  # nothing may wait forever on a closed server
            self._end(request_id, RuntimeError("the server closed before this request finished"))

    def _on_token(self, request: Request, token: int) -> None:
        self._deliver(request.request_id, token)

    def _on_finish(self, request: Request) -> None:
        self._in_engine.discard(request.request_id)
        self._deliver(request.request_id, DONE)
        self._streams.pop(request.request_id, None)

    def _deliver(self, request_id: int, item: object) -> None:
        """Hand ``item`` to a request's stream. A caller's sink that raises ends that request
        alone (it is cancelled), not the engine run every other request shares."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.put(item)
        except Exception as exc:
            logger.warning("tdpipe_hf: request %d's token sink raised %r; the request is cancelled", request_id, exc)
            self._streams.pop(request_id, None)
            stream.error = exc
            if item is not DONE:
                self._incoming.put(request_id)

    def _end(self, request_id: int, error: BaseException) -> None:
        """End a request's stream with ``error`` (its caller's iteration raises it)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.error = error
            try:
                stream.put(DONE)
            except Exception:  # a sink that raises cannot be told more
                logger.warning("tdpipe_hf: request %d's token sink raised on its end", request_id)

    def _check_idle_stages(self) -> None:
        """Every ``IDLE_CHECK_SECONDS`` while idle: a stage process that died (or froze) between
        requests is noticed now and the stages are closed, so the next request starts fresh
        ones instead of being the one that fails on it."""
        now = time.monotonic()
        if now - self._idle_checked < IDLE_CHECK_SECONDS:
            return
        self._idle_checked = now
        failure = getattr(self.engine.executor, "idle_failure", lambda: None)()
        if failure is not None:
            logger.warning("tdpipe_hf: %s while the server was idle; the stages restart with the next request",
                           failure)
            self.stage_restarts += 1
            self._new_controller()  # the new stages' caches are empty: so must the prefix cache's index be

    def _new_controller(self) -> None:
        """Start afresh after a failure: a new scheduler (its prefix cache empty, as the KV is)."""
        controller = self.engine.controller(on_token=self._on_token, on_finish=self._on_finish)
        with self._totals_lock:  # totals stay totals across a restart, and never count one run twice
            for name, value in self._counts().items():
                self._earlier[name] += value
            self.controller = controller

    def _loop(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    self._serve_once()
                except Exception as exc:  # its requests' callers learn of it; the server starts afresh
                    self._fail_run(exc)
        finally:  # closed: leave the engine's pipeline empty for whoever runs it next
            try:
                self.controller.drain()
            finally:
                self._hold_pipeline(False)

    def _hold_pipeline(self, hold: bool) -> None:
        """Hold the engine's pipeline while this server has work in it, so that a
        ``model.generate`` on the same model waits for the server to be idle (and the other way
        round) instead of mixing its micro-batches with the server's."""
        if hold and not self._holding:
            self.engine.pipeline_lock.acquire()
        elif not hold and self._holding:
            self.engine.pipeline_lock.release()
        self._holding = hold

    def _serve_once(self) -> None:
        """Take one arrival (a request, or a request id to cancel), or run one engine step."""
        try:  # wait for work when idle; otherwise only take what has arrived
            idle = not self.controller.has_work
            item = self._incoming.get(timeout=0.1) if idle else self._incoming.get_nowait()
        except queue.Empty:
            if not self.controller.has_work:
                self._hold_pipeline(False)
                if self.engine.pipeline_lock.acquire(blocking=False):  # not while a run uses the stages
                    try:
                        self._check_idle_stages()
                    finally:
                        self.engine.pipeline_lock.release()
                return
        else:
            if isinstance(item, Request):
                self._in_engine.add(item.request_id)
                self.controller.add(item)
            else:
                self.controller.abort(item)
            return
        self._hold_pipeline(True)
        self.controller.step()
        del self.controller.stats.timeline[:-KEEP_EVENTS]

    def _fail_run(self, error: Exception) -> None:
        """The engine run failed: end the requests it held with ``error``, empty the pipeline (the
        next controller must not receive this one's micro-batches) and start a fresh controller;
        requests still queued go to it."""
        self.controller.drain()
        for request_id in self._in_engine:
            self._end(request_id, error)
        self._in_engine.clear()
        self.engine_failures += 1
        self._new_controller()
