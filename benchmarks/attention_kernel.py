"""The paged-cpu decode kernel alone against gather + SDPA (the paged-sdpa decode path), per
layer and step: 64 requests, 240 tokens of context, SmolLM2's 9 query / 3 KV heads of 64, blocks
of 16 scattered over a cache larger than the CPU's caches (``--resident``: a few blocks only).
``--cold`` reads 128 MB before every call and times each call alone (median), as a real step
finds the cache: a whole pass over the model's weights lies between two calls of one layer.

    python benchmarks/attention_kernel.py [--resident | --cold] [--dtype bfloat16] [--rows 55 --context 117]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tdpipe_hf.runtime.attention import _gather
from tdpipe_hf.runtime.cpu_attention import kernel


def best_ms(fn, repeats: int = 40, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def median_cold_ms(fn, calls: int = 60) -> float:
    """Median time of ``fn`` alone, each call after reading a buffer larger than the CPU's caches."""
    flush = torch.randn(32 << 20)
    times = []
    for _ in range(calls):
        flush.sum()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resident", action="store_true", help="draw every block from 16 (cache-resident)")
    parser.add_argument("--cold", action="store_true", help="time each call with the CPU's caches emptied first")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=240)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows, context, q_heads, kv_heads, dim, block = args.rows, args.context, 9, 3, 64, 16
    blocks = 2912
    k_cache = torch.randn(blocks, block, kv_heads, dim, dtype=dtype)
    v_cache = torch.randn(blocks, block, kv_heads, dim, dtype=dtype)
    width = -(-context // block)
    tables = torch.randperm(blocks)[:rows * width] % (16 if args.resident else blocks)
    tables = tables.view(rows, width)
    lengths = torch.full((rows,), context)
    query = torch.randn(q_heads, rows, dim, dtype=dtype).transpose(0, 1)
    out = torch.empty(rows, q_heads, dim, dtype=dtype)
    order = torch.arange(rows)
    mask = (torch.arange(width * block)[None] < lengths[:, None])[:, None, None, :]

    def gather_sdpa():
        keys = _gather(k_cache, tables).transpose(1, 2)
        values = _gather(v_cache, tables).transpose(1, 2)
        return F.scaled_dot_product_attention(query.unsqueeze(2), keys, values, attn_mask=mask, scale=dim ** -0.5,
                                              enable_gqa=True)

    paged = kernel().paged_decode
    timer = median_cold_ms if args.cold else best_ms
    where = "resident" if args.resident else "scattered, cold" if args.cold else "scattered"
    print(f"{args.dtype}, {torch.get_num_threads()} threads, {rows} requests of {context} tokens, {where} blocks:")
    print(f"  gather + SDPA  {timer(gather_sdpa):.3f} ms per layer-step")
    print(f"  paged-cpu      {timer(lambda: paged(query, k_cache, v_cache, tables, lengths, order, out, dim ** -0.5)):.3f} ms")


if __name__ == "__main__":
    main()
