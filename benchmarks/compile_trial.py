"""Does torch.compile pay on this machine? tdpipe_hf at 1 stage, eager against each decoder
layer's MLP and RMSNorms compiled (inductor, dynamic shapes; the paged attention stays eager).

Prints tokens/s of both over alternated rounds, the compile time (paid in the first, untimed
call) and how many answers are identical. Measured 2026-12-04 on 2 AMD EPYC cores, SmolLM2 fp32,
32 prompts x 48 tokens, three rounds: eager 206.2 / 197.8 / 221.0, compiled 188.5 / 187.6 / 188.4
tokens/s, 13.8 s to compile (cold cache), 32/32 answers identical: slower, so the engine has no
compile option yet.

    python benchmarks/compile_trial.py [--num-prompts 32] [--max-new-tokens 48] [--rounds 3]
"""

import argparse
import time

import torch

import tdpipe_hf
from tdpipe_hf.apps.bench import chat_token_ids, load_prompts
from tdpipe_hf.models import load_model_and_tokenizer


def timed_run(model, ids, max_new_tokens: int) -> tuple[list[list[int]], float, float]:
    """(answers, seconds, seconds of the untimed first call) at 1 stage."""
    tdpipe_hf.wrap(model, num_stages=1)
    try:
        start = time.perf_counter()
        model.generate_batch(ids[:2], max_new_tokens=2)  # warm-up: where compilation happens
        first = time.perf_counter() - start
        start = time.perf_counter()
        answers = model.generate_batch(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return answers, time.perf_counter() - start, first
    finally:
        tdpipe_hf.unwrap(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF directory or .gguf (default: the shipped SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="eager / compiled runs, alternated (this host is noisy)")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = chat_token_ids(tokenizer, load_prompts(limit=args.num_prompts))
    names = ("mlp", "input_layernorm", "post_attention_layernorm")
    eager_parts = [{name: getattr(layer, name) for name in names} for layer in model.model.layers]
    compiled_parts = [{name: torch.compile(part, dynamic=True) for name, part in parts.items()}
                      for parts in eager_parts]
    rates = {"eager": [], "compiled": []}
    answers = {}
    for _ in range(args.rounds):
        for kind, parts in (("eager", eager_parts), ("compiled", compiled_parts)):
            for layer, chosen in zip(model.model.layers, parts):
                for name, module in chosen.items():
                    setattr(layer, name, module)
            answers[kind], seconds, first = timed_run(model, ids, args.max_new_tokens)
            rates[kind].append(sum(len(a) for a in answers[kind]) / seconds)
            if kind == "compiled" and len(rates[kind]) == 1:
                print(f"first compiled call {first:.1f} s (compilation included)")
    for kind, values in rates.items():
        print(f"{kind}: " + ", ".join(f"{v:.1f}" for v in values) + " tokens/s")
    same = sum(a == b for a, b in zip(answers["eager"], answers["compiled"]))
    print(f"{same}/{len(ids)} answers identical")


if __name__ == "__main__":
    main()
