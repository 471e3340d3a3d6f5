"""Load test of `tdpipe serve` on 127.0.0.1: many concurrent streaming clients, some hanging up.

Starts the server in this process (uvicorn on a free port) over the default model, computes every
prompt's greedy answer with `model.generate` first, then lets ``--clients`` concurrent clients send
``--requests`` streaming chat requests in all (greedy, ``--max-tokens``), a share of them
(``--disconnect``) hanging up after a few chunks. Checks that every completed answer equals its
prompt's greedy answer (nothing lost, cut or mixed up) and that the KV is empty at the end, and
prints requests/s, tokens/s and latency percentiles. A benchmark: it measures and reports, and
exits 1 only if an answer is wrong.

    python benchmarks/http_load.py --clients 64 --requests 320 --max-tokens 32 --stages 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx
import numpy as np
import torch

import tdpipe_hf
from tdpipe_hf.apps.bench import load_prompts
from tdpipe_hf.apps.openai_server import build_app, running_in_thread


def reference_answers(model, tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy answer from plain `generate`, one prompt at a time."""
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, hang_up_after: int | None) -> dict:
    payload = {"model": "load", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    text, usage, chunks, done = "", None, 0, False
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {await response.aread()}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                content = choice["delta"].get("content")
                if content:
                    first = first or time.perf_counter()
                    text += content
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return {"hung_up": True}
    end = time.perf_counter()
    return {"text": text, "done": done, "tokens": usage["completion_tokens"] if usage else 0,
            "latency": end - start, "ttft": (first or end) - start}


async def run_load(base: str, prompts: list[str], args) -> tuple[list, list[int], float]:
    rng = random.Random(args.seed)
    order = [rng.randrange(len(prompts)) for _ in range(args.requests)]
    hang_ups = {i for i in range(args.requests) if rng.random() < args.disconnect}
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    results: list = [None] * args.requests
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def worker(client):
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one_request(client, prompts[order[i]], args.max_tokens,
                                           3 if i in hang_ups else None)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.clients)))
    return results, order, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16, help="distinct sample prompts used")
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of clients hanging up mid-stream")
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--executor", default="local")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    model, tokenizer = tdpipe_hf.from_pretrained(None, num_stages=args.stages, executor=args.executor)
    prompts = load_prompts(limit=args.prompts)
    tdpipe_hf.unwrap(model)
    t0 = time.perf_counter()
    expected = reference_answers(model, tokenizer, prompts, args.max_tokens)
    print(f"reference answers from HF generate: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    tdpipe_hf.wrap(model, num_stages=args.stages, executor=args.executor)
    with running_in_thread(build_app(model, tokenizer, "load")) as base:
        results, order, seconds = asyncio.run(run_load(base, prompts, args))
        time.sleep(1.0)  # cancelled requests in the pipeline retire when their micro-batch returns
        metrics = httpx.get(f"{base}/metrics").text
    tdpipe_hf.unwrap(model)

    completed = [r for r in results if r and "text" in r]
    wrong = [i for i, r in enumerate(results) if r and "text" in r and (r["text"] != expected[order[i]] or not r["done"])]
    errors = [r["error"] for r in results if r and "error" in r]
    hung_up = sum(1 for r in results if r and r.get("hung_up"))
    kv_used = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tdpipe_kv_blocks_used"))
    tokens = sum(r["tokens"] for r in completed)
    latency = np.array([r["latency"] for r in completed])
    ttft = np.array([r["ttft"] for r in completed])
    summary = {
        "clients": args.clients, "requests": args.requests, "completed": len(completed), "hung_up": hung_up,
        "errors": len(errors), "wrong_answers": len(wrong), "kv_blocks_used_at_end": kv_used,
        "seconds": round(seconds, 2), "requests_per_s": round(len(completed) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "stages": args.stages, "max_tokens": args.max_tokens,
        "latency_s": {p: round(float(np.percentile(latency, p)), 2) for p in (50, 90, 99)},
        "ttft_s": {p: round(float(np.percentile(ttft, p)), 2) for p in (50, 90, 99)},
    }
    print(json.dumps(summary, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(summary, handle, indent=2)
    if errors:
        print("errors:", errors[:3], file=sys.stderr)
    return 1 if wrong or errors or kv_used else 0


if __name__ == "__main__":
    sys.exit(main())
