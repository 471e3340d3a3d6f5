"""Near-identical copies of the labelled prompts, to measure how far a prompt decides its answer's
length (issue 21): if a trailing space or a full stop changes whether SmolLM2's greedy answer
loops to the cap, no predictor that reads the prompt's meaning can do much better than that.

Writes one JSONL for ``tdpipe run`` with, for each prompt of INPUT, the lines
``{"id": "KIND:ID", "prompt": ...}`` for each KIND asked for:
- ``same``: the prompt unchanged (answered again in other batches: the engine's own noise),
- ``space``: a trailing space added,
- ``stop``: the final full stop, question or exclamation mark removed, or a full stop added,
- ``case``: the first letter's case toggled,
- ``newline``: a trailing newline added
  (all but ``same`` are ``tdpipe train-predictor --augment``'s copies, ``training.PROMPT_COPIES``).

    python benchmarks/perturbed_prompts.py ../shared/data/prompts.jsonl OUT.jsonl --kinds space,stop
    tdpipe run OUT.jsonl -o OUT.answers.jsonl --max-new-tokens 512
    python benchmarks/label_stability.py ../shared/data/prompts.jsonl \
        benchmarks/data/prompts.SmolLM2-135M-Instruct.lengths.jsonl OUT.answers.jsonl
"""

import argparse
import json

from tdpipe_hf.apps.training import PROMPT_COPIES

KINDS = {"same": lambda text: text, **PROMPT_COPIES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="JSONL with 'id' and 'prompt'")
    parser.add_argument("output")
    parser.add_argument("--kinds", default="space,stop", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    with open(args.input, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][: args.limit]
    with open(args.output, "w", encoding="utf-8") as out:
        for kind in kinds:
            for record in records:
                out.write(json.dumps({"id": f"{kind}:{record['id']}", "prompt": KINDS[kind](record["prompt"])}) + "\n")
    print(f"wrote {len(records) * len(kinds)} prompts ({', '.join(kinds)}) to {args.output}")


if __name__ == "__main__":
    main()
