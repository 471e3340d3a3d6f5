"""More labelled prompts for the length predictor, written by the served model itself.

    python benchmarks/self_instruct.py OUT.jsonl [--count 400] [--seed 0]

SmolLM2 is asked, with sampling, to write one instruction a user might give an assistant on a
topic drawn from a fixed list of task kinds (below, written for this script: no AlpacaEval
instruction is shown to the model, so the held-back evaluation prompts cannot leak in). Duplicates
and near-empty answers are dropped. Answer the file with ``tdpipe run OUT.jsonl --max-new-tokens 512``
to get the served model's own output lengths, the labels ``tdpipe train-predictor`` learns from.
"""

from __future__ import annotations

import argparse
import json
import random
import re

import torch

import tdpipe_hf
from tdpipe_hf.models import load_model_and_tokenizer

TASK_KINDS = [
    "a question about history", "a request to write a short poem", "a coding question in Python",
    "a request for a recipe", "a question asking for travel advice", "a math word problem",
    "a request to summarise a topic", "a request to write a story", "a question about science",
    "a request for a list of ideas", "a question about health and fitness", "a request to explain a concept simply",
    "a request to write an email", "a question comparing two things", "a question about personal finance",
    "a request to translate a sentence", "a question about a famous person", "a request for a product description",
    "a riddle or a logic puzzle", "a question asking for a definition", "a request to rewrite a sentence",
    "a question about music or movies", "a request for step-by-step instructions", "a question about grammar",
    "a request to classify some items", "a question about geography", "a request for a joke",
    "a question about technology", "a request to write a dialogue", "a question with a yes or no answer",
    "a request to brainstorm names", "a question about relationships or advice", "a request for a short essay",
    "a question about programming in JavaScript", "a request to fix a bug in code", "a question about animals",
    "a request to write song lyrics", "a question about philosophy", "a request for a workout plan",
    "a question about cooking techniques",
]


def instruction_prompt(tokenizer, kind: str) -> list[int]:
    messages = [{"role": "user", "content": f"Write one instruction or question that a user might send to an AI "
                                            f"assistant: {kind}. Reply with the instruction only."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def clean(text: str) -> str | None:
    text = text.strip().strip('"').strip()
    text = re.sub(r"^(instruction|question|user)\s*:\s*", "", text, flags=re.IGNORECASE).strip().strip('"')
    if len(text) < 12 or len(text) > 600:
        return None
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer()
    tdpipe_hf.wrap(model)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    kinds = [rng.choice(TASK_KINDS) for _ in range(int(args.count * 1.3))]
    prompts = [instruction_prompt(tokenizer, kind) for kind in kinds]
    outputs = model.generate_batch(prompts, max_new_tokens=64, do_sample=True, temperature=0.9, top_p=0.95,
                                   progress_bar=True)
    seen, written = set(), 0
    with open(args.output, "w", encoding="utf-8") as out:
        for index, (kind, ids) in enumerate(zip(kinds, outputs)):
            text = clean(tokenizer.decode(ids, skip_special_tokens=True))
            if text is None or text.lower() in seen or written >= args.count:
                continue
            seen.add(text.lower())
            out.write(json.dumps({"id": f"self-{args.seed}-{index}", "source": "smollm2-self-instruct",
                                  "kind": kind, "prompt": text}) + "\n")
            written += 1
    print(f"wrote {written} instructions to {args.output}")


if __name__ == "__main__":
    main()
