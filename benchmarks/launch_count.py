"""ATen calls per decode step, HF ``generate`` against tdpipe_hf, counted on the CPU.

On a GPU, small decode steps are bound by kernel launches, so the number of ATen calls a step
makes predicts its cost there without a GPU. The model is 30 layers deep (SmolLM2's depth) and
64 wide, so the count, not the arithmetic, is what differs. Steps are isolated as the difference
between runs of 2N and N new tokens (prefill cancels out).

    python benchmarks/launch_count.py [--backend paged-batched] [--top 25]
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import tdpipe_hf
from tdpipe_hf.apps.bench import run_hf_generate
from tdpipe_hf.models import tiny_random_model


def aten_calls(fn) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def per_step(run, steps: int) -> collections.Counter:
    return aten_calls(lambda: run(2 * steps)) - aten_calls(lambda: run(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="paged-sdpa", help="tdpipe_hf attention backend")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="ops to list")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_random_model("llama", seed=0, num_hidden_layers=30, hidden_size=64, intermediate_size=128,
                              vocab_size=256, max_position_embeddings=1024, eos_token_id=None)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 200, (64,), generator=generator).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in lengths]
    hf = per_step(lambda n: run_hf_generate(model, prompts, n, 64, 0, set()), args.steps)
    tdpipe_hf.wrap(model, num_stages=1, attention_backend=args.backend)
    model.generate_batch(prompts[:1], max_new_tokens=1)
    ours = per_step(lambda n: model.generate_batch(prompts, max_new_tokens=n), args.steps)
    print(f"ATen calls per decode step: HF generate {sum(hf.values()) / args.steps:.0f}, "
          f"tdpipe_hf ({args.backend}) {sum(ours.values()) / args.steps:.0f}")
    for name in sorted(set(hf) | set(ours), key=lambda k: -ours[k])[:args.top]:
        print(f"  {name:48s} HF {hf[name] / args.steps:7.1f}   tdpipe_hf {ours[name] / args.steps:7.1f}")


if __name__ == "__main__":
    main()
