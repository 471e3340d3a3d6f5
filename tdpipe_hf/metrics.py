"""What the pipeline did, from the executors' timeline: bubble ratios, a Chrome trace, a plot.

A timeline event is ``(stage, kind, batch_id, phase, start, end)`` with ``kind`` one of
``recv`` (waiting for input), ``compute``, ``sample`` (the last stage picking tokens) or ``send``
(waiting for the previous send to leave), times in ``time.perf_counter`` seconds (one clock for
all processes of a machine). A stage is busy while it computes or samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUSY = ("compute", "sample")


@dataclass
class PhaseWindow:
    phase: str
    batch_ids: set[int]
    start: float
    end: float


def phase_windows(timeline: list[tuple]) -> list[PhaseWindow]:
    """Consecutive micro-batches of one phase (in dispatch order) form a window; the gaps
    between windows are the phase switches."""
    spans: dict[int, tuple[str, float, float]] = {}
    for _, _, batch, phase, start, end in timeline:
        old = spans.get(batch)
        spans[batch] = (phase, start, end) if old is None else (phase, min(old[1], start), max(old[2], end))
    windows: list[PhaseWindow] = []
    for batch in sorted(spans):
        phase, start, end = spans[batch]
        if windows and windows[-1].phase == phase:
            window = windows[-1]
            window.batch_ids.add(batch)
            window.start, window.end = min(window.start, start), max(window.end, end)
        else:
            windows.append(PhaseWindow(phase, {batch}, start, end))
    return windows


def bubble_ratios(timeline: list[tuple]) -> dict[str, dict[int, float]]:
    """Idle share of each stage: ``{"all": {stage: ratio}, "prefill": ..., "decode": ...}``.

    Per phase, a stage's bubble is the part of that phase's windows in which it did not compute.
    "all" covers the whole run, phase switches included."""
    compute = [e for e in timeline if e[1] in BUSY]
    if not compute:
        return {}
    stages = sorted({e[0] for e in compute})
    ratios: dict[str, dict[int, float]] = {}
    span = max(e[5] for e in compute) - min(e[4] for e in compute)
    ratios["all"] = {s: 1 - sum(e[5] - e[4] for e in compute if e[0] == s) / span for s in stages}
    windows = phase_windows(compute)
    for phase in ("prefill", "decode"):
        mine = [w for w in windows if w.phase == phase]
        total = sum(w.end - w.start for w in mine)
        if total <= 0:
            continue
        batches = set().union(*(w.batch_ids for w in mine))
        ratios[phase] = {s: 1 - sum(e[5] - e[4] for e in compute if e[0] == s and e[2] in batches) / total
                         for s in stages}
    return ratios


BUBBLE_CAUSES = ("fill and drain", "phase switch", "stage 0 waits for the controller", "waits on an upstream stage",
                 "host work before a step")


def bubble_causes(timeline: list[tuple]) -> dict[str, float]:
    """Where the stages' idle time goes, as shares of all stage time (stages x run span); they add
    up to the mean of ``bubble_ratios(...)["all"]``. Each gap on a stage is charged to one cause:

    - fill and drain: before the stage's first micro-batch and after its last;
    - phase switch: the micro-batch after the gap is of another kind (prefill, decode, mixed) than
      the one before it;
    - stage 0 waits for the controller: stage 0 had nothing to run (every slot in flight, or no
      admissible work: the KV budget or the request stream ran dry);
    - waits on an upstream stage: a later stage waited for its input (micro-batches of unequal
      cost, or stages of unequal speed);
    - host work before a step: the part of a gap in which the stage's host was preparing the next
      micro-batch (``host`` events, as the simulator emits for engines that prepare serially)."""
    busy = sorted((e for e in timeline if e[1] in BUSY), key=lambda e: (e[0], e[4]))
    if not busy:
        return {}
    begin, end = min(e[4] for e in busy), max(e[5] for e in busy)
    stages = sorted({e[0] for e in busy})
    idle = dict.fromkeys(BUBBLE_CAUSES, 0.0)
    host = {(e[0], e[2]): e for e in timeline if e[1] == "host"}  # (stage, batch) -> its preparation
    for stage in stages:
        mine = [e for e in busy if e[0] == stage]
        idle["fill and drain"] += (mine[0][4] - begin) + (end - max(e[5] for e in mine))
        for before, after in zip(mine, mine[1:]):
            gap = after[4] - before[5]
            if gap <= 0:
                continue
            prep = host.get((stage, after[2]))
            preparing = max(0.0, min(prep[5], after[4]) - max(prep[4], before[5])) if prep else 0.0
            idle["host work before a step"] += preparing
            gap -= preparing
            if after[3] != before[3]:
                idle["phase switch"] += gap
            elif stage == stages[0]:
                idle["stage 0 waits for the controller"] += gap
            else:
                idle["waits on an upstream stage"] += gap
    total = (end - begin) * len(stages)
    return {cause: seconds / total for cause, seconds in idle.items()} if total > 0 else {}


def format_bubbles(ratios: dict[str, dict[int, float]]) -> str:
    parts = []
    for scope, per_stage in ratios.items():
        values = ", ".join(f"stage {s} {r:.1%}" for s, r in per_stage.items())
        parts.append(f"{scope}: {values}")
    return "bubble ratio " + "; ".join(parts)


def write_chrome_trace(timeline: list[tuple], path: str | Path) -> None:
    """A trace for chrome://tracing or ui.perfetto.dev: one row per stage, one slice per event."""
    origin = min(e[4] for e in timeline) if timeline else 0.0
    events = [{"name": f"{kind} {phase} #{batch}", "cat": kind, "ph": "X", "pid": 0, "tid": stage,
               "ts": (start - origin) * 1e6, "dur": (end - start) * 1e6,
               "args": {"batch": batch, "phase": phase}}
              for stage, kind, batch, phase, start, end in timeline]
    names = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
             for s in sorted({e[0] for e in timeline})]
    Path(path).write_text(json.dumps({"traceEvents": names + events, "displayTimeUnit": "ms"}))


def plot_timeline(timeline: list[tuple], path: str | Path, title: str = "tdpipe_hf pipeline") -> None:
    """A PNG with one lane per stage: prefill compute in orange, decode compute in blue, the hybrid
    baseline's mixed (prefill chunk + decodes) micro-batches in green, gaps are bubbles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = [e for e in timeline if e[1] == "compute"]
    origin = min(e[4] for e in compute)
    stages = sorted({e[0] for e in compute})
    colors = {"prefill": "tab:orange", "decode": "tab:blue", "mixed": "tab:green"}
    colors = {phase: color for phase, color in colors.items() if any(e[3] == phase for e in compute)}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(stages)))
    for phase, color in colors.items():
        for s in stages:
            bars = [(e[4] - origin, e[5] - e[4]) for e in compute if e[0] == s and e[3] == phase]
            ax.broken_barh(bars, (s - 0.4, 0.8), color=color, label=phase if s == stages[0] else None)
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_kv_utilisation(kv_used: list[tuple[float, int]], kv_blocks: int) -> float:
    """Time-weighted mean share of the KV blocks in use, from ``(time, blocks used)`` samples."""
    if len(kv_used) < 2 or kv_blocks < 1:
        return 0.0
    area = sum(used * (later - now) for (now, used), (later, _) in zip(kv_used, kv_used[1:]))
    span = kv_used[-1][0] - kv_used[0][0]
    return area / span / kv_blocks if span > 0 else 0.0


def decode_imbalance(decode_batches: list[tuple[int, int]], num_stages: int) -> dict[str, float]:
    """How unequal the decode micro-batches in flight together are: over every run of
    ``num_stages`` consecutive decode batches, (largest - smallest) / mean, averaged, for rows
    (tokens computed) and for context (KV read by attention). 0 is perfectly balanced."""
    spreads = {"rows": [], "context": []}
    for first in range(len(decode_batches) - num_stages + 1):
        window = decode_batches[first:first + num_stages]
        for key, values in (("rows", [w[0] for w in window]), ("context", [w[1] for w in window])):
            mean = sum(values) / len(values)
            if mean > 0:
                spreads[key].append((max(values) - min(values)) / mean)
    return {key: sum(v) / len(v) if v else 0.0 for key, v in spreads.items()}
