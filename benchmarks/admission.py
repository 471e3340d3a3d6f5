"""Prefill admission policies side by side on the real prompt workload (one run, same engine).

    python benchmarks/admission.py [--requests 129] [--max-new-tokens 512] [--stages 2] [--kv-blocks N]

By default the workload is the held-out part of the split ``tdpipe train-predictor`` trained the
shipped predictor and probe on (test fraction 0.2, seed 0: 129 of shared/data/prompts.jsonl), so
every figure is out of sample; ``--in-sample`` takes the first N prompts of the file instead.
Policies: the engine's default, greedy prefill with the shipped predictor and, after each
prefill, the shipped length probe, overbooking where the run's stage times say it pays
(``overbook``, ``overbooking="cost"``); the same planning under the threshold alone
(``greedy``, TD-Pipe's rule), without the probe (``greedy-prompt-only``), with one length per
request (``greedy-point``, as the paper); the baseline "admit while the KV fits now"
(``fits``), and greedy prefill with an oracle that knows every answer's length (``oracle``; from
benchmarks/data/*.lengths.jsonl, the model's own greedy answers), also with overbooking
(``oracle-overbook``: the upper bound of the default), vLLM v0's pipeline schedule as TD-Pipe
measured it (``vllm-v0-pp``: the KV split between per-stage engines, requests pinned to one,
no predictor), and the default with the shipped predictor's "stops earlier" outcome planned as
a point (``overbook-nospread``, as before 2026-12-07). A greedy policy's name may end in ``@T``
to plan under ``kv_threshold=T`` (``greedy@0.9``, ``oracle@1.0``). A policy named twice runs
twice (to see the host's drift). Prints tokens/s, preemptions and mean KV utilisation per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import tdpipe_hf
from tdpipe_hf.apps.offline import answer_lengths, run_batch
from tdpipe_hf.apps.training import read_labels, split
from tdpipe_hf.models import load_model_and_tokenizer
from tdpipe_hf.predictors import HiddenStateProbe, OraclePredictor, load_predictor

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE.parent.parent / "shared" / "data" / "prompts.jsonl"
LENGTHS = HERE / "data" / "prompts.SmolLM2-135M-Instruct.lengths.jsonl"
SHIPPED_PROBE = HERE.parent / "tdpipe_hf" / "data" / "predictors" / "SmolLM2-135M-Instruct.probe.npz"


def without_spread():
    """The shipped predictor and probe planning their "stops earlier" outcome as a point, as
    greedy prefill did before it used their ``length_spread``."""
    predictor, probe = load_predictor(), HiddenStateProbe.load(SHIPPED_PROBE)
    predictor.length_spread = probe.length_spread = None
    return predictor, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(WORKLOAD))
    parser.add_argument("--requests", type=int, default=None, help="default: the whole held-out split")
    parser.add_argument("--in-sample", action="store_true", help="the first N prompts, not the held-out split")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--kv-blocks", type=int, default=None)
    parser.add_argument("--policies", default="overbook,greedy,fits,oracle")
    parser.add_argument("--write-workload", metavar="FILE",
                        help="only write the chosen prompts to FILE (JSONL, for `tdpipe bench --prompts`) and exit")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tdpipe-admission-"))
    source = Path(args.write_workload) if args.write_workload else work / "prompts.jsonl"
    with open(args.prompts) as handle:
        lines = [line for line in handle if line.strip()]
    chosen = range(len(lines)) if args.in_sample else split(len(lines), 0.2, 0)[1]
    source.write_text("".join(lines[i] for i in list(chosen)[:args.requests]))
    if args.write_workload:
        print(f"wrote {len(list(chosen)[:args.requests])} prompts to {source}")
        return
    model, tokenizer = load_model_and_tokenizer()
    prompts, lengths = read_labels(args.prompts, LENGTHS, tokenizer)
    oracle = OraclePredictor().fit(prompts, lengths)
    settings = {"greedy": {"admission": "greedy", "overbooking": "off"}, "fits": {"admission": "fits"},
                "greedy-prompt-only": {"admission": "greedy", "overbooking": "off", "length_probe": False},
                "greedy-point": {"admission": "greedy", "overbooking": "off", "length_planning": "point",
                                 "length_probe": False},
                "overbook": {"admission": "greedy", "overbooking": "cost"},
                "oracle": {"admission": "greedy", "overbooking": "off", "predictor": oracle},
                "oracle-overbook": {"admission": "greedy", "overbooking": "cost", "predictor": oracle},
                "vllm-v0-pp": {"policy": "vllm-v0-pp"}}
    point_predictor, point_probe = without_spread()
    settings["overbook-nospread"] = {"admission": "greedy", "overbooking": "cost", "predictor": point_predictor,
                                     "length_probe": point_probe}
    rows, outputs = [], []
    for run, name in enumerate(args.policies.split(",")):
        base, _, threshold = name.partition("@")
        options = dict(settings[base], num_stages=args.stages,
                       executor="distributed" if args.stages > 1 else "local")
        if args.kv_blocks:
            options["kv_blocks"] = args.kv_blocks
        if threshold:
            options["kv_threshold"] = float(threshold)
        tdpipe_hf.wrap(model, **options)
        try:
            outputs.append(work / f"{run}.{name}.jsonl")  # a policy named twice runs twice, not resumes
            summary = run_batch(model, tokenizer, source, outputs[-1], max_new_tokens=args.max_new_tokens)
            blocks = model.tdpipe_engine.num_blocks
        finally:
            tdpipe_hf.unwrap(model)
        row = {"policy": name, "requests": summary.requests, "tokens": summary.generated_tokens,
               "tokens_per_s": round(summary.tokens_per_s, 1), "preemptions": summary.preemptions,
               "kv_utilisation": round(summary.kv_utilisation, 3), "kv_blocks": blocks}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'policy':<19} {'tok/s':>7} {'preempt':>8} {'KV use':>7}")
    for row in rows:
        print(f"{row['policy']:<19} {row['tokens_per_s']:>7} {row['preemptions']:>8} {100 * row['kv_utilisation']:>6.1f}%")
    same = [answer_lengths(output) for output in outputs]
    print("identical output lengths across policies:", all(lengths == same[0] for lengths in same))


if __name__ == "__main__":
    main()
