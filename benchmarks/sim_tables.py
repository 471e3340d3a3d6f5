"""The simulator tables of the README and docs/simulator.md from the rows in benchmarks/sim/ (written by benchmarks/sim_paper_setups.sh, which also prints these).

    python benchmarks/sim_tables.py [DIR]

Prints two markdown tables: tokens/s per policy with the ratios the paper reports, and each
policy's bubble split by cause (``tdpipe_hf.metrics.bubble_causes``).
"""

import json
import sys
from pathlib import Path

from tdpipe_hf.metrics import BUBBLE_CAUSES

POLICIES = ["tdpipe", "tdpipe-ahead", "tdpipe-fill", "tdpipe-oracle", "tdpipe-no-overbook", "tdpipe-fits", "tdpipe-paper", "vllm-v0-pp",
            "vllm-v1-pp", "vllm-v1-pp-capped", "hybrid", "hybrid-throttled", "tp"]
SETUPS = ["a100-pcie-llama2-13b", "a100-pcie-llama2-70b", "a100-pcie-qwen2.5-32b", "l20-llama2-13b",
          "l20-llama2-70b", "l20-qwen2.5-32b"]
CAUSE_POLICIES = ["tdpipe", "tdpipe-ahead", "tdpipe-fill", "vllm-v0-pp", "hybrid-throttled", "tp"]


def load(directory: Path) -> dict[str, dict[str, dict]]:
    return {setup: {row["policy"]: row for row in json.loads((directory / f"{setup}.json").read_text())}
            for setup in SETUPS if (directory / f"{setup}.json").exists()}


def label(rows: dict[str, dict]) -> str:
    row = next(iter(rows.values()))
    gpu = "A100 PCIe" if "A100" in row["gpu"] else "L20"
    return f"{gpu}, {row['model'].replace('-chat', '').replace('-Instruct', '')}"


def throughput_table(setups: dict[str, dict[str, dict]]) -> str:
    head = POLICIES + ["tdpipe / vllm-v0-pp", "tdpipe / best of hybrid-throttled, hybrid, tp",
                       "tdpipe-ahead / best of hybrid-throttled, hybrid, tp",
                       "tdpipe-fill / best of hybrid-throttled, hybrid, tp", "host ms / micro-batch (tdpipe)"]
    lines = ["| setup (4 GPUs) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for rows in setups.values():
        speed = {p: rows[p]["tokens_per_s"] for p in POLICIES if p in rows}
        best_other = max(speed.get(p, 0.0) for p in ("hybrid-throttled", "hybrid", "tp"))
        host = rows["tdpipe"].get("host_ms_per_micro_batch")
        cells = [f"{speed[p]:.0f}" if p in speed else "-" for p in POLICIES]
        cells += [f"{speed['tdpipe'] / speed['vllm-v0-pp']:.2f}x", f"{speed['tdpipe'] / best_other:.2f}x",
                  f"{speed['tdpipe-ahead'] / best_other:.2f}x" if "tdpipe-ahead" in speed else "-",
                  f"{speed['tdpipe-fill'] / best_other:.2f}x" if "tdpipe-fill" in speed else "-",
                  "-" if host is None else f"{host:.2f}"]
        lines.append(f"| {label(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def causes_table(setups: dict[str, dict[str, dict]]) -> str:
    lines = ["| setup | policy | bubble | " + " | ".join(BUBBLE_CAUSES) + " |", "|---" * (len(BUBBLE_CAUSES) + 3) + "|"]
    for rows in setups.values():
        for policy in CAUSE_POLICIES:
            causes = rows.get(policy, {}).get("bubble_causes")
            if causes:
                lines.append(f"| {label(rows)} | {policy} | {sum(causes.values()):.1%} | "
                             + " | ".join(f"{causes.get(c, 0.0):.1%}" for c in BUBBLE_CAUSES) + " |")
    return "\n".join(lines)


def main() -> int:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "sim"
    setups = load(directory)
    print(throughput_table(setups))
    print()
    print(causes_table(setups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
