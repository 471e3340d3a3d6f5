"""Where a tdpipe_hf run's time goes: torch.profiler over one generate_batch, top ops printed.

Profiles the in-process engine (1 stage) on the model's device after an untimed warm-up, and
prints the ops with the most self time on the device (CUDA kernels on a GPU, ATen ops on a CPU),
with their shapes, plus the wall time and the device-busy share: on a GPU, a busy share far
below 100 % says the host (Python, launches, the controller) is the bottleneck.

    python benchmarks/profile_step.py --model /tmp/smollm2-shape --device cuda:0 --dtype bfloat16
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import tdpipe_hf
from tdpipe_hf.apps.bench import chat_token_ids, load_prompts
from tdpipe_hf.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF directory or .gguf (default: the shipped SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--by-op", action="store_true", help="group by op name alone (default: by op and shapes)")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    model.to(args.device)
    ids = chat_token_ids(tokenizer, load_prompts(limit=args.num_prompts))
    tdpipe_hf.wrap(model, num_stages=1, devices=args.device, attention_backend=args.attention_backend)
    model.generate_batch(ids[:2], max_new_tokens=2)  # warm-up, outside the profile
    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        outputs = model.generate_batch(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages(group_by_input_shape=not args.by_op)
    print(events.table(sort_by=key, row_limit=args.top, max_name_column_width=60, max_shapes_column_width=50))
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events) if cuda else None
    busy = f", device busy {device_us / 1e6 / wall:.0%} of the wall time" if device_us else ""
    print(f"{tokens} tokens in {wall:.2f}s under the profiler ({tokens / wall:.0f} tokens/s, slower than "
          f"unprofiled){busy}; backend {model.config._attn_implementation}")
    tdpipe_hf.unwrap(model)


if __name__ == "__main__":
    main()
