"""Prefill admission: how many waiting requests enter the running set now.

``GreedyPrefill`` is TD-Pipe's AI-based greedy prefill: it admits while the *future* KV usage of
the running set plus the newcomers, simulated from predicted output lengths, stays under the
budget. ``AdmitWhileFits`` is the baseline that only looks at the KV free now (vLLM's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import OVERBOOKING
from ..controller.kv import BlockManager
from ..controller.request import Request
from ..predictors.base import (
    LearnsOnline,
    PredictsOutcomes,
    checked_outcomes,
    checked_predictions,
)


class AdmitWhileFits:
    """Baseline rule: admit in arrival order while the prompts' blocks fit in the free KV now.

    ``watermark`` keeps a share of the blocks free at admission so that the first decode steps
    do not preempt at once. Requests that later outgrow the cache are preempted by the scheduler.
    """

    def __init__(self, watermark: float = 0.01):
        self.watermark = watermark

    @classmethod
    def from_config(cls, config, predictor=None) -> "AdmitWhileFits":
        return cls()

    def observe(self, request: Request) -> None:
        """The rule learns nothing from finished requests."""

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


def simulated_peak_blocks(tokens: np.ndarray, remaining: np.ndarray, block_size: int,
                          weights: np.ndarray | None = None) -> float:
    """Peak KV blocks over the future of requests holding ``tokens`` now that will generate
    ``remaining`` more tokens each, one per decode step, freeing their blocks when done.

    Usage only grows between two finishes, so the peak is just before one of them: checking every
    request's finish step is exact, where the paper's code samples fixed steps (5, 8, 16, ..., 4096)
    and can miss a peak between two of them. With ``weights`` each row is one possible outcome of
    a request, counted with its probability: the result is the peak of the *expected* usage.

    Admission calls this for every candidate prefix, so it runs in O(rows x block_size) rather
    than rows x steps: at step t = T * block_size + u a live row with ceil((tokens + block_size
    - 1) / block_size) = q and remainder r holds q + T blocks, plus one if r >= block_size - u;
    with rows sorted by finish step, the live rows are a suffix, and suffix sums of the weights,
    of q and of a histogram of r give every step's usage at once.
    """
    if tokens.size == 0:
        return 0
    order = np.argsort(remaining, kind="stable")
    finish = remaining[order]
    weight = np.ones(len(order), dtype=np.int64) if weights is None else weights[order]
    whole, part = np.divmod(tokens[order] + block_size - 1, block_size)

    def suffix_sums(values: np.ndarray) -> np.ndarray:  # row s: the sum over rows s.. (zero past the end)
        return np.concatenate([np.cumsum(values[::-1], axis=0)[::-1], np.zeros_like(values[:1])])

    live_weight = suffix_sums(weight)
    live_whole = suffix_sums(weight * whole)
    by_part = np.zeros((len(order), block_size + 1), dtype=weight.dtype)
    by_part[np.arange(len(order)), part] = weight
    live_at_least = suffix_sums(np.cumsum(by_part[:, ::-1], axis=1)[:, ::-1])  # [s, r]: live rows with part >= r
    steps = np.unique(np.concatenate(([0], finish)))
    first_live = np.searchsorted(finish, steps, side="left")
    laps, offset = np.divmod(steps, block_size)
    usage = (live_whole[first_live] + live_weight[first_live] * laps
             + live_at_least[first_live, block_size - offset])
    return float(usage.max()) if weights is not None else int(usage.max())


MAX_OVERBOOK_TRIALS = 8  # set sizes tried between the threshold's and what fits now
RATE_SAMPLES = 32  # future decode steps sampled per set (the admission runs on the critical path)
RATE_HORIZON = 0.5  # a decode phase is taken to end when half of its rows have finished


def expected_rate(tokens: np.ndarray, remaining: np.ndarray, weights: np.ndarray, block_size: int, num_blocks: int,
                  round_time, per_prefill_token: float, prefill_tokens: int) -> float:
    """Expected tokens/s of a running set while its decode phase lasts (rows as in
    ``simulated_peak_blocks``).

    The phase is taken to last while at least ``RATE_HORIZON`` of the set's rows are live: by then
    the switch has usually handed back to prefill, and the thin tail it avoids would otherwise
    reward any set that fills it. Time: a decode round for every step (one token for each live
    row; ``round_time(rows, context)`` gives the seconds of an array of rounds, sampled every
    ``block_size`` steps or a multiple of it, about ``RATE_SAMPLES`` samples at most), the
    prefill of ``prefill_tokens`` new prompt tokens, and the recomputation of what overflows the
    cache at any time: at the expected usage's peak, the blocks past ``num_blocks`` are preempted
    and prefilled again (``per_prefill_token`` seconds a token).
    """
    if tokens.size == 0:
        return 0.0
    stride = block_size * max(1, int(remaining.max()) // (block_size * RATE_SAMPLES))
    steps = np.arange(0, int(remaining.max()), stride)
    live = remaining[:, None] > steps[None, :]
    held = tokens[:, None] + steps[None, :]
    rows = weights @ live
    usage = weights @ (live * -(-held // block_size))
    phase = rows >= RATE_HORIZON * rows[0]
    context = weights @ (live[:, phase] * held[:, phase])
    decode = stride * float(np.sum(round_time(rows[phase], context)))
    overflow = max(0.0, float(usage.max()) - num_blocks) * block_size
    seconds = decode + per_prefill_token * (prefill_tokens + overflow)
    return stride * float(rows[phase].sum()) / seconds if seconds > 0 else 0.0


def _spread_of(model) -> tuple[float, float]:
    """(``length_spread``, the cap its "runs to the cap" outcome stands for) of a predictor or
    probe; a spread of 0 where it has none (its lengths are planned as points)."""
    spread = getattr(model, "length_spread", None) or 0.0
    return float(spread), float(getattr(model, "max_length", None) or np.inf)


class GreedyPrefill:
    """Admit in arrival order the longest prefix of the waiting queue whose simulated peak KV
    usage, with the running requests, stays <= ``kv_threshold`` x the blocks (0.9 in the paper's
    code). ``length_scale`` inflates predictions as a safety margin. A misprediction costs a
    preemption (recompute), never a wrong token.

    ``planning="distribution"`` (beyond the paper) plans with the predictor's length distribution
    when it has ``predict_outcomes``: every outcome of every request enters the simulation with its
    probability (a running request's outcomes it has already outlived are dropped and the rest
    renormalised; with a predictor's ``length_spread``, weighed by the chance of lasting so long),
    so the plan follows the expected KV use of the whole set. ``"point"`` plans with one length per
    request, the likeliest outcome, as the paper does with its bucket classifier's class
    (``predict`` for a predictor without outcomes).

    With ``online``, finished requests' true lengths go to ``predictor.update`` every
    ``update_every`` finishes (and cached predictions are refreshed).

    With a length probe (``use_probe``, beyond the paper), a request's prompt-only prediction is
    replaced by the probe's as soon as its prefill ends: the pipeline sends back the hidden state
    the probe reads, and every later simulation plans the request with the better guess.

    With ``overbooking="cost"`` (beyond the paper; the engine's default through ``TDPipeConfig``,
    while this class alone defaults to the paper's rule), the threshold's prefix is a floor:
    admission goes further, up to what fits in the free blocks now, when the run's fitted stage
    times say it pays. A bigger set decodes in bigger batches (cheaper per token where a step's
    cost is mostly fixed) but, past the cache, recomputes what is preempted; ``expected_rate``
    weighs the two.
    """

    def __init__(self, predictor, kv_threshold: float = 0.9, length_scale: float = 1.0,
                 online: bool = False, update_every: int = 16, name: str = "", planning: str = "distribution",
                 overbooking: str = "off"):
        if overbooking not in OVERBOOKING:
            raise ValueError(f"overbooking must be one of {OVERBOOKING}, got {overbooking!r}")
        self.predictor = predictor
        self.overbooking = overbooking
        self.stage_times = None  # (StageTimeModel, stages, prefill chunk tokens), from the scheduler
        self.kv_threshold = kv_threshold
        self.length_scale = length_scale
        self.online = online and isinstance(predictor, LearnsOnline)
        self.update_every = update_every
        self.name = name or type(predictor).__name__
        self.planning = planning
        self._predicted: dict[int, list[tuple[float, float]]] = {}
        self._refined: dict[int, list[tuple[float, float]]] = {}  # the probe's, after prefill: preferred
        self._finished: list[tuple[list[int], int]] = []
        self.probe = None
        self.num_refined = 0

    def use_stage_times(self, cost, num_stages: int, prefill_chunk_tokens: int) -> None:
        """Plan overbooking with ``cost`` (the scheduler's StageTimeModel, fitted as the run goes)."""
        self.stage_times = (cost, num_stages, prefill_chunk_tokens)

    def use_probe(self, probe) -> None:
        """Refine predictions after prefill with ``probe`` (see ``predictors.probe``)."""
        self.probe = probe

    @property
    def probe_layer(self) -> int | None:
        """The layer whose hidden state the scheduler asks the pipeline for, or None."""
        return self.probe.layer if self.probe is not None else None

    def refine(self, states: dict) -> None:
        """Prefill ended for these requests (request id -> hidden state): plan them with the probe."""
        if self.probe is None or not states:
            return
        ids = list(states)
        matrix = np.stack([np.asarray(states[i], dtype=np.float32) for i in ids])
        self._refined.update(zip(ids, self._ask(self.probe, matrix, "length probe")))
        self.num_refined += len(ids)

    def _ask(self, model, inputs, name: str) -> list[list[tuple[float, float]]]:
        """``model``'s (length, probability) outcomes for each input (prompts for the predictor,
        hidden states for the probe): its distribution when planning with distributions and it
        has one; else one sure outcome: the likeliest of its outcomes (the paper's class, ties to
        the shorter), or its point prediction where it gives no outcomes."""
        if isinstance(model, PredictsOutcomes):
            outcomes = checked_outcomes(model, inputs, name)
            if self.planning == "distribution":
                return outcomes
            return [[(max(pairs, key=lambda pair: (pair[1], -pair[0]))[0], 1.0)] for pairs in outcomes]
        return [[(length, 1.0)] for length in checked_predictions(model, inputs, name)]

    @classmethod
    def from_config(cls, config, predictor) -> "GreedyPrefill":
        """Over ``predictor`` with the config's threshold, scale, planning and online learning."""
        return cls(predictor, config.kv_threshold, config.length_scale, online=config.online_learning,
                   name=config.predictor if isinstance(config.predictor, str) else "",
                   planning=config.length_planning, overbooking=config.overbooking_name)

    def _outcomes(self, requests: Sequence[Request]) -> list[list[tuple[float, float]]]:
        """Each request's (length, probability) outcomes; one sure outcome for point planning."""
        missing = [r for r in requests if r.request_id not in self._predicted and r.request_id not in self._refined]
        if missing:
            values = self._ask(self.predictor, [r.prompt_ids for r in missing], self.name)
            self._predicted.update((r.request_id, v) for r, v in zip(missing, values))
        return [self._refined.get(r.request_id) or self._predicted[r.request_id] for r in requests]

    def _state(self, requests: Sequence[Request], block_size: int) -> tuple[np.ndarray, ...]:
        """One row per (request, outcome), grouped by request in order: tokens held now, tokens
        still to generate, probability, and the request's index. Outcomes a request has outlived
        are dropped and the rest renormalised; a request that outlived all of them is expected to
        need one more block. Vectorised: admission builds this for every running request.

        Where the predictor says how far a "stops earlier" answer lands from its predicted length
        (``length_spread``: the standard deviation of log length, measured out of sample), such an
        outcome is a log-normal around that length, not a point: a request that has generated g
        tokens keeps it with the probability of lasting past g and plans its median given that,
        so the longer a request runs the likelier its "runs to the cap" outcome becomes. (As a
        point, an outcome just past g kept its whole weight and promised an early finish: for
        SmolLM2's requests still running after 16-256 tokens that planned worse than a constant,
        1.02-1.31x its error, and 0.94-1.06x with the spread; ``benchmarks/decode_probe.py``.)"""
        count = len(requests)
        outcomes = self._outcomes(requests)
        per_request = np.fromiter(map(len, outcomes), dtype=np.int64, count=count)
        pairs = np.array([pair for request_outcomes in outcomes for pair in request_outcomes],
                         dtype=np.float64).reshape(-1, 2)
        owner = np.repeat(np.arange(count), per_request)
        generated = np.fromiter((len(r.output_ids) for r in requests), dtype=np.int64, count=count)
        held = np.fromiter((r.num_tokens for r in requests), dtype=np.int64, count=count)
        cap = np.maximum(np.fromiter((r.max_new_tokens for r in requests), dtype=np.int64, count=count)
                         - generated, 1)
        lengths, probs = pairs[:, 0], pairs[:, 1]
        if _spread_of(self.predictor)[0] or _spread_of(self.probe)[0]:
            lengths, probs = self._given_survival(requests, owner, lengths, probs, generated)
        left = np.ceil(lengths * self.length_scale).astype(np.int64) - generated[owner]
        possible = (left > 0) & (probs > 0)
        outlived = np.flatnonzero(np.bincount(owner[possible], minlength=count) == 0)
        owner = np.concatenate([owner[possible], outlived])
        left = np.concatenate([left[possible], np.full(len(outlived), block_size, dtype=np.int64)])
        prob = np.concatenate([probs[possible], np.ones(len(outlived))])
        order = np.argsort(owner, kind="stable")  # grouped by request, outcomes in their order
        owner, left, prob = owner[order], left[order], prob[order]
        weights = prob / np.bincount(owner, weights=prob, minlength=count)[owner]
        return held[owner], np.minimum(left, cap[owner]), weights, owner

    def _given_survival(self, requests: Sequence[Request], owner: np.ndarray, lengths: np.ndarray,
                        probs: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lengths and probabilities of the outcomes given that each request has already made
        ``generated`` tokens: "stops earlier" outcomes of a model with a spread become their
        median past that point, weighted by the chance of getting there (see ``_state``)."""
        from scipy.special import ndtr, ndtri

        # each request's outcomes come from the probe once it has refined them, else the predictor
        by_model = {True: _spread_of(self.probe), False: _spread_of(self.predictor)}
        known = np.array([by_model[bool(self._refined.get(r.request_id))] for r in requests]).reshape(-1, 2)
        sigma, model_cap = known[owner, 0], known[owner, 1]
        made = generated[owner].astype(np.float64)
        spread = (sigma > 0) & (lengths < model_cap) & (made > 0)
        if not spread.any():
            return lengths, probs
        lengths, probs = lengths.copy(), probs.copy()
        log_length, sig = np.log(np.maximum(lengths[spread], 1.0)), sigma[spread]
        below = ndtr((np.log(made[spread]) - log_length) / sig)  # P(it would have stopped by now)
        probs[spread] *= 1.0 - below
        halfway = np.clip((below + 1.0) / 2.0, 1e-12, 1.0 - 1e-12)
        lengths[spread] = np.maximum(np.exp(log_length + sig * ndtri(halfway)), made[spread] + 1.0)
        return lengths, probs

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
        run = self._state(running, blocks.block_size)[:3]
        *new, new_owner = self._state(candidates, blocks.block_size)
        budget = self.kv_threshold * blocks.num_blocks

        def with_first(count: int) -> tuple[np.ndarray, ...]:
            """Tokens, remaining and weights of the running rows plus the first ``count`` candidates'."""
            rows = np.searchsorted(new_owner, count)
            return tuple(np.concatenate([a, b[:rows]]) for a, b in zip(run, new))

        def fits(count: int) -> bool:
            tokens, remaining, weights = with_first(count)
            return simulated_peak_blocks(tokens, remaining, blocks.block_size, weights) <= budget

        # the peak grows with every admitted request, so the longest admissible prefix is a bisection
        low, high = 0, fits_now
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        if self.overbooking == "cost" and low < fits_now:
            low = self._best_rate(low, fits_now, with_first, candidates, blocks)
        if low == 0 and not running:
            return 1  # an empty engine always takes one request, or it would wait forever
        return low

    def _best_rate(self, floor: int, most: int, with_first, candidates, blocks: BlockManager) -> int:
        """The count in ``floor..most`` whose set (``with_first(count)``'s rows) has the highest
        expected tokens/s, or ``floor`` while the stage-time model has no fit for both phases yet."""
        if self.stage_times is None:
            return floor
        cost, stages, chunk = self.stage_times
        per_prefill_token = cost.prefill_time(chunk)
        if per_prefill_token is None or cost.decode_time(1, 1) is None:
            return floor
        per_prefill_token /= chunk
        counts = np.unique(np.linspace(floor, most, min(most - floor + 1, MAX_OVERBOOK_TRIALS)).round().astype(int))
        prompt_tokens = np.cumsum([0] + [r.num_tokens for r in candidates])
        best, best_rate = floor, -1.0
        for count in counts:
            rate = expected_rate(*with_first(count), blocks.block_size, blocks.num_blocks,
                                 lambda n, ctx: stages * cost.decode_times(n / stages, ctx / stages),
                                 per_prefill_token, prompt_tokens[count])
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = int(count), rate
        return best

    def observe(self, request: Request) -> None:
        """A request finished: its true length is a training label."""
        self._predicted.pop(request.request_id, None)
        self._refined.pop(request.request_id, None)
        if not self.online:
            return
        self._finished.append((request.prompt_ids, len(request.output_ids)))
        if len(self._finished) >= self.update_every:
            prompts, lengths = zip(*self._finished)
            self.predictor.update(list(prompts), list(lengths))
            self._finished.clear()
            self._predicted.clear()
