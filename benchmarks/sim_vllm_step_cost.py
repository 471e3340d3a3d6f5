"""How much of the paper's gap over vLLM could vLLM v0's per-step host work explain?

    python benchmarks/sim_vllm_step_cost.py [--requests 2000] [--json benchmarks/sim/vllm-step-cost.json]

The simulator's vLLM baselines pay no host work by default. vLLM's own RFC for multi-step
scheduling (vllm-project/vllm#6854, vLLM 0.5) measured 5-13 ms of GPU idle per decode step, about
4 ms in its Llama-3-8B / H100 trace: the time the host spends turning the last step's tokens into
Python objects and preparing the next step (``tdpipe simulate --vllm-step-cost``). This script puts
that cost on every stage of ``vllm-v0-pp`` and on ``tp`` (both stand for vLLM v0, as the paper
measured them) and prints two tables:

1. the six paper setups at the RFC's 4 ms: tdpipe / vllm-v0-pp and tdpipe / tp, with TD-Pipe
   paying nothing (its controller sends work ahead, as the paper claims) and paying the same 4 ms
   (if its workers prepared serially too);
2. a sweep of the cost on 4 x A100 PCIe with Llama-2-13B (the issue's reference setup).

Every policy's own scheduler is on the critical path as in ``benchmarks/sim_paper_setups.sh``
(``--host-cost measured``), so the figures move by a few % with the host.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tdpipe_hf.sim import SimSetup, sharegpt_like, simulate
from tdpipe_hf.sim.run import VLLM_STEP_COSTS

SETUPS = [("a100-pcie", "llama2-13b"), ("a100-pcie", "llama2-70b"), ("a100-pcie", "qwen2.5-32b"),
          ("l20", "llama2-13b"), ("l20", "llama2-70b"), ("l20", "qwen2.5-32b")]
SWEEP = [0.0, 0.001, 0.002, 0.004, 0.008, 0.013, 0.02]
PAPER = 2.73  # TD-Pipe over vLLM's PP, best case (arXiv 2506.10470)


def run(gpu: str, model: str, cost: float, policy: str, workload, tdpipe_pays: bool = False) -> dict:
    setup = SimSetup.named(model, gpu, 4, vllm_step_cost=cost, measure_host=True)
    row = simulate(setup, policy, workload, stage_host=cost if tdpipe_pays else None)
    row = {k: v for k, v in row.items() if k != "timeline"}
    row.update(setup=f"{gpu}-{model}", vllm_step_cost=cost, tdpipe_pays=tdpipe_pays)
    print(f"  {gpu} {model} {policy}{' (pays)' if tdpipe_pays else ''} at {cost * 1e3:g} ms: "
          f"{row['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    return row


def label(gpu: str, model: str) -> str:
    return f"{'A100 PCIe' if gpu == 'a100-pcie' else 'L20'}, {model.replace('llama2', 'Llama-2').replace('qwen', 'Qwen')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", default="benchmarks/sim/vllm-step-cost.json")
    args = parser.parse_args()
    workload = sharegpt_like(args.requests, seed=0)
    rfc = VLLM_STEP_COSTS["rfc6854"]
    rows = []
    for gpu, model in SETUPS:
        rows.append(run(gpu, model, 0.0, "tdpipe", workload))
        rows.append(run(gpu, model, rfc, "tdpipe", workload, tdpipe_pays=True))
        for policy in ("vllm-v0-pp", "tp"):
            for cost in (SWEEP if (gpu, model) == SETUPS[0] else [0.0, rfc]):
                rows.append(run(gpu, model, cost, policy, workload))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(tables(rows))
    return 0


def tables(rows: list[dict]) -> str:
    def speed(setup, policy, cost, pays=False):
        return next(r["tokens_per_s"] for r in rows if r["setup"] == setup and r["policy"] == policy
                    and r["vllm_step_cost"] == cost and r["tdpipe_pays"] == pays)

    rfc = VLLM_STEP_COSTS["rfc6854"]
    out = [f"| setup (4 GPUs) | tdpipe | vllm-v0-pp, no host cost | vllm-v0-pp, {rfc * 1e3:g} ms | tp, {rfc * 1e3:g} ms "
           f"| tdpipe / vllm-v0-pp | tdpipe / tp | tdpipe paying {rfc * 1e3:g} ms too: / vllm-v0-pp | / tp |",
           "|---" * 9 + "|"]
    for gpu, model in SETUPS:
        s = f"{gpu}-{model}"
        td, paying = speed(s, "tdpipe", 0.0), speed(s, "tdpipe", rfc, True)
        v0, v0_rfc, tp_rfc = speed(s, "vllm-v0-pp", 0.0), speed(s, "vllm-v0-pp", rfc), speed(s, "tp", rfc)
        out.append(f"| {label(gpu, model)} | {td:.0f} | {v0:.0f} | {v0_rfc:.0f} | {tp_rfc:.0f} | {td / v0_rfc:.2f}x "
                   f"| {td / tp_rfc:.2f}x | {paying / v0_rfc:.2f}x | {paying / tp_rfc:.2f}x |")
    s = f"{SETUPS[0][0]}-{SETUPS[0][1]}"
    td = speed(s, "tdpipe", 0.0)
    out += ["", "| host work per step and stage (vLLM v0 baselines) | vllm-v0-pp tokens/s | tp tokens/s "
                "| tdpipe / vllm-v0-pp | tdpipe / tp |", "|---" * 5 + "|"]
    for cost in SWEEP:
        v0, tp = speed(s, "vllm-v0-pp", cost), speed(s, "tp", cost)
        out.append(f"| {cost * 1e3:g} ms | {v0:.0f} | {tp:.0f} | {td / v0:.2f}x | {td / tp:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
