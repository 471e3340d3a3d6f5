"""Run tdpipe_hf with one process per stage under torchrun or accelerate launch.

    torchrun --nproc-per-node 2 benchmarks/torchrun_generate.py --num-prompts 16 --max-new-tokens 32
    torchrun --nproc-per-node 2 benchmarks/torchrun_generate.py --devices cuda --dtype bfloat16  # a GPU per rank
    accelerate launch --multi_gpu --num_processes 2 benchmarks/torchrun_generate.py
    # two machines (R = 0 on HOST, 1 on the other; tested with HOST = 127.0.0.1):
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr HOST --master-port 29500 benchmarks/torchrun_generate.py

Every rank loads the model and keeps only its own stage; rank 0 runs the controller and prints
the results. Ranks other than 0 never return from ``wrap``: they serve their stage and exit when
rank 0 closes the engine. ``--tiny SEED`` uses a small random Llama instead of SmolLM2 (tests).
"""

import argparse
import json
import os
import sys
import time

import tdpipe_hf


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--kv-blocks", type=int, default=None)
    parser.add_argument("--tiny", type=int, default=None, help="seed of a tiny random Llama (no weights needed)")
    parser.add_argument("--output", help="write the generated ids here as JSON")
    parser.add_argument("--devices", help="stage devices; 'cuda': each rank its node's GPU LOCAL_RANK (default: CPU)")
    parser.add_argument("--dtype", help="weights' dtype, e.g. bfloat16 (default: as stored)")
    parser.add_argument("--plan-ahead", action="store_true", help="plan decode steps ahead of their tokens")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    options = {"kv_blocks": args.kv_blocks} if args.kv_blocks else {}
    if args.devices:
        options["devices"] = args.devices
    if args.plan_ahead:
        options["plan_ahead"] = True
    if args.tiny is not None:
        import torch

        from tdpipe_hf.models import tiny_random_model

        model = tiny_random_model("llama", seed=args.tiny)
        if args.dtype:
            model.to(getattr(torch, args.dtype))
        gen = torch.Generator().manual_seed(args.tiny)
        prompts = [torch.randint(3, 97, (int(n),), generator=gen).tolist()
                   for n in torch.randint(1, 30, (args.num_prompts,), generator=gen)]
    else:
        from tdpipe_hf.apps.bench import chat_token_ids, load_prompts
        from tdpipe_hf.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(dtype=args.dtype)
        prompts = chat_token_ids(tokenizer, load_prompts(limit=args.num_prompts))
    model = tdpipe_hf.wrap(model, num_stages=world, executor="distributed", **options)
    # from here on, only rank 0 runs
    print(f"generating {len(prompts)} requests over {world} stage processes", flush=True)
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    model.tdpipe_engine.close()
    generated = sum(map(len, outputs))
    print(f"{len(prompts)} requests, {generated} tokens in {seconds:.1f}s: {generated / seconds:.1f} tokens/s "
          f"over {world} stage processes")
    if args.output:
        with open(args.output, "w") as out:
            json.dump(outputs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
