"""Print and plot simulated runs: a markdown table, a throughput bar chart, per-policy timelines."""

from __future__ import annotations

import json
from pathlib import Path

from ..metrics import BUBBLE_CAUSES, plot_timeline


def format_table(rows: list[dict]) -> str:
    lines = ["| policy | parallel | tokens/s | virtual s | bubble (all) | prefill bubble | decode bubble | "
             "preemptions | phase switches | KV use | host ms / micro-batch | finished |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['policy']} | {r['parallel']} | {r['tokens_per_s']:.0f} | {r['seconds']:.1f} | "
                     f"{pct(r['bubble_ratio'])} | {pct(r['prefill_bubble'])} | {pct(r['decode_bubble'])} | "
                     f"{r['preemptions']} | {r['phase_switches']} | {r['kv_utilisation']:.0%} | "
                     f"{ms(r.get('host_ms_per_micro_batch'))} | {r['finished']}/{r['requests']} |")
    return "\n".join(lines)


def format_causes(rows: list[dict]) -> str:
    """The bubble of each row split by cause (``metrics.bubble_causes``), as shares of stage time."""
    lines = ["| policy | bubble | " + " | ".join(BUBBLE_CAUSES) + " |", "|---" * (len(BUBBLE_CAUSES) + 2) + "|"]
    for r in rows:
        causes = r.get("bubble_causes", {})
        lines.append(f"| {r['policy']} | {sum(causes.values()):.1%} | "
                     + " | ".join(f"{causes.get(c, 0.0):.1%}" for c in BUBBLE_CAUSES) + " |")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | Path) -> None:
    keep = [{k: v for k, v in r.items() if k != "timeline"} for r in rows]
    for r in keep:
        r["bubble_per_stage"] = {str(s): v for s, v in r.get("bubble_per_stage", {}).items()}
    Path(path).write_text(json.dumps(keep, indent=1))


def plot_bubble_causes(rows: list[dict], path: Path, title: str) -> None:
    """One stacked bar per policy: its idle stage time split by cause (``metrics.bubble_causes``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(rows), 3.8))
    bottom = [0.0] * len(rows)
    for cause in BUBBLE_CAUSES:
        shares = [100 * r.get("bubble_causes", {}).get(cause, 0.0) for r in rows]
        ax.bar([r["policy"] for r in rows], shares, bottom=bottom, label=cause)
        bottom = [b + v for b, v in zip(bottom, shares)]
    ax.set_ylabel("idle stage time (% of all)")
    ax.set_title(f"{title}\nidle stage time by cause", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(rows: list[dict], out_dir: str | Path, title: str, window_s: float = 20.0) -> list[Path]:
    """A throughput bar chart and, per pipeline policy, the first ``window_s`` virtual seconds of
    its timeline (the whole run is too dense to read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(rows), 3.5))
    ax.bar([r["policy"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax.set_ylabel("generated tokens/s (simulated)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    paths.append(out / "bubble-causes.png")
    plot_bubble_causes(rows, paths[-1], title)
    for r in rows:
        timeline = r.get("timeline")
        if not timeline or r["parallel"] != "pp":
            continue
        origin = min(e[4] for e in timeline)
        window = [e for e in timeline if e[4] - origin <= window_s]
        paths.append(out / f"timeline-{r['policy']}.png")
        plot_timeline(window, paths[-1], title=f"{title}: {r['policy']} (first {window_s:.0f} s)")
    return paths
