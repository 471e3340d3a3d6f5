"""Serve one wrapped model to many callers at once (the demo's chat, any app).

One engine thread owns the controller and runs its loop step by step; callers on any thread
``submit`` prompts and iterate their tokens as they are sampled. A request that arrives while
others run joins them at the next step, so concurrent users share the pipeline's micro-batches
(which is where TD-Pipe's throughput comes from).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator

from ..controller import Request
from ..controller.controller import RunStats

_DONE = object()
KEEP_EVENTS = 20_000  # timeline events kept for a long-lived server (the most recent)


class TokenStream:
    """The tokens of one request, as they come. Iterate it, or call ``tokens()`` to wait for all.
    If the engine fails, iteration raises the engine's error."""

    def __init__(self, request: Request):
        self.request = request
        self._queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if item is _DONE:
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
        from ..mixin import eos_token_ids

        self.engine = model.tdpipe_engine
        self.eos = frozenset(eos_token_ids(model.generation_config))
        self._incoming: queue.Queue = queue.Queue()
        self._streams: dict[int, TokenStream] = {}
        self._ids = itertools.count()
        self._closed = threading.Event()
        self.controller = self.engine.controller(on_token=self._on_token, on_finish=self._on_finish)
        self._thread = threading.Thread(target=self._loop, name="tdpipe-server", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> RunStats:
        """The running totals and recent timeline of everything served so far."""
        return self.controller.stats

    def submit(self, prompt_ids: list[int], max_new_tokens: int = 128) -> TokenStream:
        """Queue one prompt (token ids, chat template applied); ``ValueError`` if it can never run."""
        if self._closed.is_set():
            raise RuntimeError("the server is closed")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        request = Request(next(self._ids), list(prompt_ids), max_new_tokens, self.eos)
        self.engine.check_fits([request])
        stream = TokenStream(request)
        self._streams[request.request_id] = stream
        self._incoming.put(request)
        return stream

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=30)

    def _on_token(self, request: Request, token: int) -> None:
        self._streams[request.request_id]._queue.put(token)

    def _on_finish(self, request: Request) -> None:
        self._streams.pop(request.request_id)._queue.put(_DONE)

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:  # wait for work when idle; otherwise only take what has arrived
                idle = not self.controller.has_work
                request = self._incoming.get(timeout=0.1) if idle else self._incoming.get_nowait()
                self.controller.add(request)
                continue
            except queue.Empty:
                if not self.controller.has_work:
                    continue
            try:
                self.controller.step()
            except Exception as exc:  # every caller learns of it; the server starts afresh
                for stream in list(self._streams.values()):
                    stream.error = exc
                    stream._queue.put(_DONE)
                self._streams.clear()
                self.controller = self.engine.controller(on_token=self._on_token, on_finish=self._on_finish)
            del self.controller.stats.timeline[:-KEEP_EVENTS]
