"""A long-prompt workload from the AlpacaEval instructions we may use: prompts of 500-1 500 tokens.

Each prompt lists consecutive instructions from ``shared/data/prompts.jsonl`` until it reaches a
length drawn uniformly from [--low, --high] tokens of the model's chat template, then asks for an
answer to the last one. Prefill then weighs as much as decode or more, the case where how a
schedule mixes (or separates) the two phases matters most.

    python benchmarks/long_prompts.py ../shared/data/prompts.jsonl out/long.jsonl --count 64
"""

import argparse
import json
import random
from pathlib import Path

from tdpipe_hf.apps.bench import chat_token_ids, load_prompts
from tdpipe_hf.models import load_model_and_tokenizer

HEADER = "Here are some requests people sent us. Read them all, then answer only the last one.\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="JSONL with a 'prompt' field per line")
    parser.add_argument("output")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--low", type=int, default=500)
    parser.add_argument("--high", type=int, default=1500)
    parser.add_argument("--model", help="whose tokenizer counts the tokens (default: the shipped SmolLM2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tokenizer = load_model_and_tokenizer(args.model)
    pool = load_prompts(args.source)
    rng = random.Random(args.seed)

    def compose(items: list[str]) -> tuple[str, int]:  # the prompt and its chat-templated length
        text = HEADER + "\n\n".join(f"{i + 1}. {item}" for i, item in enumerate(items))
        return text, len(chat_token_ids(tokenizer, [text])[0])

    cursor, lines, lengths = 0, [], []
    for _ in range(args.count):
        target, items = rng.randint(args.low, args.high), []
        while True:
            items.append(pool[cursor % len(pool)])
            cursor += 1
            text, length = compose(items)
            if length >= target or length > args.high:
                break
        if length > args.high and len(items) > 1:  # the last request overshot: stop before it
            items.pop()
            cursor -= 1
            text, length = compose(items)
        lines.append(json.dumps({"prompt": text}))
        lengths.append(length)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    lengths.sort()
    print(f"wrote {args.output}: {len(lines)} prompts of {lengths[0]}-{lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]}), from {cursor} instructions")


if __name__ == "__main__":
    main()
