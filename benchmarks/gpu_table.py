"""One table from several ``tdpipe bench --json`` files: the GPU check's summary.

    python benchmarks/gpu_table.py LABEL=FILE [LABEL=FILE ...]

Each file's rows are compared with that file's ``hf-generate`` row (same model, dtype, prompts);
a file that is missing (its step failed or ran out of time) is listed as such."""

import json
import sys
from pathlib import Path


def main(pairs: list[str]) -> None:
    print("| workload | system | backend | stages | tokens/s | vs HF generate | same tokens as HF | matching prefix |")
    print("|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        label, _, path = pair.partition("=")
        if not Path(path).exists():
            print(f"| {label} | (no result: see the log) | | | | | | |")
            continue
        rows = json.loads(Path(path).read_text())
        base = next((r["tokens_per_s"] for r in rows if r["system"] == "hf-generate"), None)
        for r in rows:
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            same = "-" if r.get("same_as_hf") is None else f"{r['same_as_hf']}/{r['requests']}"
            prefix = "-" if r.get("matching_prefix") is None else f"{r['matching_prefix']:.0%}"
            system = r["system"] if r.get("policy", "tdpipe") == "tdpipe" else f"{r['system']} ({r['policy']})"
            print(f"| {label} | {system} | {r.get('backend') or '-'} | {r['stages']} | {r['tokens_per_s']:.1f} | "
                  f"{ratio} | {same} | {prefix} |")


if __name__ == "__main__":
    main(sys.argv[1:])
