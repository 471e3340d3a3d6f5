"""How close the simulator's roofline cost model gets to measured stage times and throughput.

--l20 DIR   DIR holds the authors' profiled L20 tables (MLSysU/TD-Pipe, profiler-results/
            L20-Llama-13B.csv and L20-Qwen2.5-32B.csv: tokens of one forward pass -> ms, whole
            model). Prints the error of the pure roofline (peak rates, no overheads), of the
            shipped L20 efficiencies, and refits them.
--cpu FILE  FILE holds `tdpipe bench --json` rows (system, policy, stages, tokens_per_s) of the
            real two-stage CPU pipeline. Measures this CPU's float32 GEMM rate and memory
            bandwidth with torch, runs the simulator with them on the same workload (the first
            64 prompts of shared/data/prompts.jsonl, SmolLM2's own output lengths capped at 128)
            and prints simulated against measured tokens/s per policy.

    python benchmarks/calibrate_sim.py --l20 path/to/profiler-results
    python benchmarks/calibrate_sim.py --cpu /tmp/bench-policies.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from tdpipe_hf.sim import SimSetup, simulate
from tdpipe_hf.sim.cost import EFFICIENCY, CostModel, Efficiency, SeqShape
from tdpipe_hf.sim.specs import GPUS, MODELS, GPUSpec
from tdpipe_hf.sim.workload import SimRequest

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"llama2-13b": "L20-Llama-13B.csv", "qwen2.5-32b": "L20-Qwen2.5-32B.csv"}
LOG_SPACED = sorted({int(round(x)) for x in np.geomspace(1, 2048, 45)})


# ---- L20: the authors' profiled forward times ------------------------------------------------
def read_table(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["Total Length"]): float(r["Execute Time"]) / 1e3 for r in csv.DictReader(f)}


def forward_time(model: str, eff: Efficiency, tokens: int) -> float:
    """One sequence of ``tokens`` through the whole model (all stages' compute, summed)."""
    cost = CostModel(MODELS[model], GPUS["l20"], eff)
    seqs = [SeqShape(tokens, tokens)]
    return cost.layers_time(seqs, MODELS[model].num_layers) + cost.head_time(seqs) + eff.step_overhead


def errors(tables: dict[str, dict[int, float]], eff: Efficiency, points=None) -> dict[str, np.ndarray]:
    return {m: np.array([forward_time(m, eff, n) / t[n] - 1 for n in (points or sorted(t))]) for m, t in tables.items()}


def fit_l20(tables: dict[str, dict[int, float]]) -> Efficiency:
    from scipy.optimize import least_squares

    def residuals(x):
        eff = Efficiency(compute=x[0], memory=x[1], layer_overhead=x[2] * 1e-6, step_overhead=x[3] * 1e-3)
        return np.log1p(np.concatenate(list(errors(tables, eff, LOG_SPACED).values())))

    x = least_squares(residuals, [0.8, 0.85, 10, 1], bounds=([0.05, 0.05, 0, 0], [1, 1, 1000, 50])).x
    return Efficiency(compute=x[0], memory=x[1], layer_overhead=x[2] * 1e-6, step_overhead=x[3] * 1e-3)


def report_l20(directory: Path) -> None:
    tables = {m: read_table(directory / name) for m, name in TABLES.items()}
    fitted = fit_l20(tables)
    print(f"refit: compute {fitted.compute:.3f}, memory {fitted.memory:.3f}, "
          f"per layer {fitted.layer_overhead * 1e6:.0f} us, per step {fitted.step_overhead * 1e3:.2f} ms")
    print("| model | cost model | mean abs error (all 1-2048) | mean abs error (log-spaced) | max abs error | "
          "at 1 / 64 / 256 / 2048 tokens |\n|---|---|---|---|---|---|")
    pure = Efficiency(compute=1.0, memory=1.0, layer_overhead=0.0, step_overhead=0.0)
    for label, eff in (("pure roofline (peak rates)", pure), ("shipped L20 efficiencies", EFFICIENCY["l20"]),
                       ("refit", fitted)):
        every, spaced = errors(tables, eff), errors(tables, eff, LOG_SPACED)
        for m, t in tables.items():
            at = " / ".join(f"{forward_time(m, eff, n) / t[n] - 1:+.0%}" for n in (1, 64, 256, 2048))
            print(f"| {m} | {label} | {np.abs(every[m]).mean():.1%} | {np.abs(spaced[m]).mean():.1%} | "
                  f"{np.abs(every[m]).max():.1%} | {at} |")


# ---- CPU: the real two-stage pipeline ---------------------------------------------------------
def measure_cpu(threads: int, hidden: int = 576, intermediate: int = 1536) -> tuple[float, float]:
    """(float32 FLOP/s of the model's own GEMM shapes, bytes/s of a large copy) on ``threads``."""
    import torch

    torch.set_num_threads(threads)
    rates = []
    for tokens in (32, 128, 512):
        a, b = torch.randn(tokens, hidden), torch.randn(hidden, intermediate)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.3:
            a @ b
            reps += 1
        rates.append(2 * tokens * hidden * intermediate * reps / (time.perf_counter() - start))
    src = torch.randn(64 << 20 >> 2)  # 64 MiB, beyond the caches
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return float(np.median(rates)), 2 * src.numel() * 4 / best


def cpu_workload(num_prompts: int, cap: int) -> list[SimRequest]:
    from tdpipe_hf.apps.bench import chat_token_ids, load_prompts
    from tdpipe_hf.models import load_model_and_tokenizer

    prompts_path = ROOT.parent / "shared" / "data" / "prompts.jsonl"
    records = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()][:num_prompts]
    lengths = {}
    for line in (ROOT / "benchmarks" / "data" / "prompts.SmolLM2-135M-Instruct.lengths.jsonl").read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            lengths[item["id"]] = item["completion_tokens"]
    _, tokenizer = load_model_and_tokenizer()
    ids = chat_token_ids(tokenizer, load_prompts(prompts_path, limit=num_prompts))
    return [SimRequest(len(p), min(lengths[r["id"]], cap), tuple(p)) for r, p in zip(records, ids)]


def report_cpu(bench_json: Path, threads: int, dispatch_overhead: float, num_prompts: int, cap: int,
               kv_blocks: int | None, gflops: float | None = None, gbs: float | None = None) -> None:
    from tdpipe_hf.predictors import load_predictor

    rows = [r for r in json.loads(bench_json.read_text()) if r.get("system") == "tdpipe-distributed"]
    if not rows:
        raise SystemExit(f"{bench_json} has no tdpipe-distributed rows")
    flops, bandwidth = measure_cpu(threads)
    flops, bandwidth = gflops * 1e9 if gflops else flops, gbs * 1e9 if gbs else bandwidth
    print(f"this CPU, {threads} thread(s) per stage: float32 GEMM {flops / 1e9:.1f} GFLOP/s, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    cpu = GPUSpec("this CPU", 2 << 30, flops, bandwidth, link_bandwidth=bandwidth, link_latency=50e-6)
    workload = cpu_workload(num_prompts, cap)
    model = MODELS["smollm2-135m"]
    if kv_blocks is None:  # the engine's CPU default: a 2 GiB budget
        kv_blocks = (2 << 30) // (16 * model.num_layers * model.kv_bytes_per_token_layer)
    sim_policy = {"tdpipe": "tdpipe", "tdpipe-nosteal": "tdpipe-nosteal", "tdpipe-threshold": "tdpipe-threshold",
                  "tdpipe-fits": "tdpipe-fits", "hybrid": "hybrid", "naive": "naive"}
    print("| policy | stages | measured tokens/s | simulated tokens/s | simulated / measured |\n|---|---|---|---|---|")
    for row in rows:
        policy = sim_policy.get(row.get("policy") or "tdpipe")
        if policy is None:
            continue
        setup = SimSetup(model, cpu, row["stages"],
                         Efficiency(compute=1.0, memory=1.0, layer_overhead=0.0, link=1.0),
                         dispatch_overhead=dispatch_overhead, kv_blocks=kv_blocks)
        # the real run used the predictor shipped for SmolLM2 on these very prompts
        predictor = load_predictor(None, "SmolLM2-135M-Instruct") if policy.startswith("tdpipe") else None
        sim = simulate(setup, policy, workload, predictor=predictor)
        print(f"| {row.get('policy')} | {row['stages']} | {row['tokens_per_s']:.1f} | {sim['tokens_per_s']:.1f} | "
              f"{sim['tokens_per_s'] / row['tokens_per_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l20", type=Path, help="directory with the authors' L20 profiler CSVs")
    parser.add_argument("--cpu", type=Path, help="`tdpipe bench --json` rows of the real CPU pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage process (default 1)")
    parser.add_argument("--dispatch-overhead", type=float, default=1e-3,
                        help="controller round trip per micro-batch, seconds (default 1 ms, measured in README)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="the KV budget of the measured run (default: 2 GiB, the CPU default cap)")
    parser.add_argument("--gemm-gflops", type=float, help="use this GEMM rate instead of measuring (e.g. "
                                                           "one taken on a quiet machine)")
    parser.add_argument("--bandwidth-gbs", type=float, help="use this memory bandwidth instead of measuring")
    args = parser.parse_args()
    if not args.l20 and not args.cpu:
        parser.error("give --l20 DIR and/or --cpu FILE")
    if args.l20:
        report_l20(args.l20)
    if args.cpu:
        report_cpu(args.cpu, args.threads, args.dispatch_overhead, args.num_prompts, args.max_new_tokens,
                   args.kv_blocks, args.gemm_gflops, args.bandwidth_gbs)


if __name__ == "__main__":
    main()
