"""Which decoder layers each stage runs: contiguous ranges that balance the stages' decode time.

The decode phase is where a pipeline spends its time, and a stage's decode time is its layers'
time plus, on the last stage, the LM head's. How the head compares with a layer depends on the
machine and the kernels (SmolLM2, one thread per stage: about 5 layers on 2 Xeon cores, about 7
on the AMD cores measured earlier, against the 8 its weight bytes suggest), so each stage
process times its own layers and head on a typical decode micro-batch (:func:`probe_stage`)
before it serves, and the executor re-splits once if the measured costs call for it (the
running workers swap stages; nothing restarts). The first split, and the one used
where nothing is measured, weighs layers and head by their weight bytes (:func:`size_costs`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from accelerate.utils import compute_module_sizes

from ..plan import MicroBatch, SequencePlan
from .attention import AttentionContext
from .sampler import greedy_tokens

# A typical decode micro-batch to time: rows and context tokens per row.
PROBE_ROWS = 32
PROBE_CONTEXT = 128  # the token-weighted mean decode context of 64 chat prompts answered in 128 tokens is 109
PROBE_SECONDS = 0.3
RESPLIT_GAIN = 0.05  # re-split when the slowest stage would get at least this much faster


@dataclass(frozen=True)
class StageCosts:
    """Decode cost of each decoder layer and of the final norm + LM head, in one unit."""

    layers: tuple[float, ...]
    head: float
    source: str  # "measured" (seconds) or "sizes" (bytes)

    def slowest(self, ranges: list[range]) -> float:
        """The cost of the slowest stage under the split ``ranges``."""
        totals = [sum(self.layers[i] for i in r) for r in ranges]
        totals[-1] += self.head
        return max(totals)


def size_costs(model) -> StageCosts:
    """Costs in proportion to weight bytes (accelerate's ``compute_module_sizes``); the head
    counts as its full weight, tied to the embedding or not."""
    sizes = compute_module_sizes(model)
    layers = tuple(float(sizes[f"model.layers.{i}"]) for i in range(len(model.model.layers)))
    head = float(model.lm_head.weight.numel() * model.lm_head.weight.element_size())
    return StageCosts(layers, head, "sizes")


def measured_costs(num_layers: int, probes: list[tuple[float, float | None]]) -> StageCosts:
    """Combine the stages' :func:`probe_stage` answers: every layer costs the mean per-layer
    time measured, the head what the last stage measured."""
    per_layer = statistics.fmean(layer for layer, _ in probes)
    return StageCosts(tuple(per_layer for _ in range(num_layers)), probes[-1][1] or 0.0, "measured")


def probe_stage(stage, build=AttentionContext.build) -> tuple[float, float | None]:
    """(seconds per layer, seconds for norm + head + greedy pick, or None) of ``stage`` on a
    decode micro-batch of up to ``PROBE_ROWS`` rows at ``PROBE_CONTEXT`` tokens, timed in this
    process as it will run: its threads, packed weights, all its layers in a row (so weights
    stream from memory as in a real pass), its attention backend's metadata (``build``) and its
    own KV cache, still unused, as scratch."""
    kv = stage.kv
    block_size = kv.block_size
    num_blocks = kv.keys.shape[1]
    rows = max(1, min(PROBE_ROWS, num_blocks // -(-(PROBE_CONTEXT + 1) // block_size)))
    context = min(PROBE_CONTEXT, num_blocks // rows * block_size - 1)  # a small cache gets a shorter probe
    blocks_per_row = -(-(context + 1) // block_size)
    seqs = [SequencePlan(row, [3], context, list(range(row * blocks_per_row, (row + 1) * blocks_per_row)))
            for row in range(rows)]
    weight = next(stage.layers[0].parameters())
    ctx = build(MicroBatch(-1, "decode", seqs), block_size, weight.device)
    hidden = torch.randn(1, rows, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    with torch.inference_mode(), stage.weights():
        per_layer = _seconds(lambda: stage.run_layers(hidden, ctx), weight.device) / len(stage.layers)
        head = None
        if stage.lm_head is not None:
            head = _seconds(lambda: greedy_tokens(stage.lm_head(stage.norm(hidden[0]))), weight.device)
        kv.keys.zero_()  # the cache's promise: slots never written hold zeros (finite), not probe values
        kv.values.zero_()
    return per_layer, head


def split_layers(costs: StageCosts, num_stages: int) -> list[range]:
    """Contiguous layer ranges that minimise the slowest stage's cost (the head on the last)."""
    num_layers = len(costs.layers)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be between 1 and the model's {num_layers} decoder layers, got {num_stages}")
    prefix = [0.0]
    for cost in costs.layers:
        prefix.append(prefix[-1] + cost)
    # best[s][j]: smallest possible slowest-stage cost when the first j layers form s stages
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, num_layers + 1):
            extra = costs.head if (s == num_stages and j == num_layers) else 0.0
            for i in range(s - 1, j):
                value = max(best[s - 1][i], prefix[j] - prefix[i] + extra)
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds = [num_layers]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _seconds(fn, device: torch.device) -> float:
    """Median time of ``fn`` over repeats filling about ``PROBE_SECONDS`` (after one warm-up)."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed()
    repeats = max(3, min(20, int(PROBE_SECONDS / max(first, 1e-6))))
    return statistics.median(timed() for _ in range(repeats))

