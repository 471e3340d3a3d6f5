"""Prefill admission: how many waiting requests enter the running set now.

``GreedyPrefill`` is TD-Pipe's AI-based greedy prefill: it admits while the *future* KV usage of
the running set plus the newcomers, simulated from predicted output lengths, stays under the
budget. ``AdmitWhileFits`` is the baseline that only looks at the KV free now (vLLM's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..controller.kv import BlockManager
from ..controller.request import Request
from ..predictors.base import checked_predictions


class AdmitWhileFits:
    """Baseline rule: admit in arrival order while the prompts' blocks fit in the free KV now.

    ``watermark`` keeps a share of the blocks free at admission so that the first decode steps
    do not preempt at once. Requests that later outgrow the cache are preempted by the scheduler.
    """

    def __init__(self, watermark: float = 0.01):
        self.watermark = watermark

    def admit(self, waiting: Sequence[Request], running: Sequence[Request], blocks: BlockManager,
              max_running: int) -> int:
        reserve = int(self.watermark * blocks.num_blocks)
        free = blocks.num_free
        count = 0
        for request in waiting:
            if len(running) + count >= max_running:
                break
            need = blocks.extra_blocks(request, request.num_tokens)
            # the reserve never blocks the only request: it would wait forever
            if need > free - (reserve if running or count else 0):
                break
            free -= need
            count += 1
        return count


def simulated_peak_blocks(tokens: np.ndarray, remaining: np.ndarray, block_size: int) -> int:
    """Peak KV blocks over the future of requests holding ``tokens`` now that will generate
    ``remaining`` more tokens each, one per decode step, freeing their blocks when done.

    Usage only grows between two finishes, so the peak is just before one of them: checking every
    request's finish step is exact, where the paper's code samples fixed steps (5, 8, 16, ..., 4096)
    and can miss a peak between two of them.
    """
    if tokens.size == 0:
        return 0
    steps = np.unique(np.concatenate(([0], remaining)))
    alive = remaining[:, None] >= steps[None, :]
    held = -(-(tokens[:, None] + np.minimum(steps[None, :], remaining[:, None])) // block_size)
    return int((held * alive).sum(axis=0).max())


class GreedyPrefill:
    """Admit in arrival order the longest prefix of the waiting queue whose simulated peak KV
    usage, with the running requests, stays <= ``kv_threshold`` x the blocks (0.9 in the paper's
    code). ``length_scale`` inflates predictions as a safety margin. A misprediction costs a
    preemption (recompute), never a wrong token.

    With ``online``, finished requests' true lengths go to ``predictor.update`` every
    ``update_every`` finishes (and cached predictions are refreshed).
    """

    def __init__(self, predictor, kv_threshold: float = 0.9, length_scale: float = 1.0,
                 online: bool = False, update_every: int = 16, name: str = ""):
        self.predictor = predictor
        self.kv_threshold = kv_threshold
        self.length_scale = length_scale
        self.online = online and callable(getattr(predictor, "update", None))
        self.update_every = update_every
        self.name = name or type(predictor).__name__
        self._predicted: dict[int, float] = {}
        self._finished: list[tuple[list[int], int]] = []

    def _predictions(self, requests: Sequence[Request]) -> list[float]:
        missing = [r for r in requests if r.request_id not in self._predicted]
        if missing:
            values = checked_predictions(self.predictor, [r.prompt_ids for r in missing], self.name)
            self._predicted.update((r.request_id, v) for r, v in zip(missing, values))
        return [self._predicted[r.request_id] for r in requests]

    def _state(self, requests: Sequence[Request], block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens held now, tokens still to generate) per request, from the predictions."""
        tokens = np.array([r.num_tokens for r in requests], dtype=np.int64)
        generated = np.array([len(r.output_ids) for r in requests], dtype=np.int64)
        cap = np.array([r.max_new_tokens for r in requests], dtype=np.int64) - generated
        guess = np.array(self._predictions(requests)) * self.length_scale - generated
        # a request that outlived its prediction is expected to need at least one more block
        remaining = np.clip(np.maximum(np.ceil(guess), block_size), 1, np.maximum(cap, 1)).astype(np.int64)
        return tokens, remaining

    def admit(self, waiting: Sequence[Request], running: Sequence[Request], blocks: BlockManager,
              max_running: int) -> int:
        room = min(len(waiting), max_running - len(running))
        if room <= 0:
            return 0
        # what fits in the free blocks right now bounds the search
        free, fits_now = blocks.num_free, 0
        for request in list(waiting)[:room]:
            need = blocks.extra_blocks(request, request.num_tokens)
            if need > free:
                break
            free -= need
            fits_now += 1
        if fits_now == 0:
            return 0
        candidates = list(waiting)[:fits_now]
        run_tokens, run_remaining = self._state(running, blocks.block_size)
        new_tokens, new_remaining = self._state(candidates, blocks.block_size)
        budget = self.kv_threshold * blocks.num_blocks

        def fits(count: int) -> bool:
            tokens = np.concatenate([run_tokens, new_tokens[:count]])
            remaining = np.concatenate([run_remaining, new_remaining[:count]])
            return simulated_peak_blocks(tokens, remaining, blocks.block_size) <= budget

        # the peak grows with every admitted request, so the longest admissible prefix is a bisection
        low, high = 0, fits_now
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        if low == 0 and not running:
            return 1  # an empty engine always takes one request, or it would wait forever
        return low

    def observe(self, request: Request) -> None:
        """A request finished: its true length is a training label."""
        self._predicted.pop(request.request_id, None)
        if not self.online:
            return
        self._finished.append((request.prompt_ids, len(request.output_ids)))
        if len(self._finished) >= self.update_every:
            prompts, lengths = zip(*self._finished)
            self.predictor.update(list(prompts), list(lengths))
            self._finished.clear()
            self._predicted.clear()
