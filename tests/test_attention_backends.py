"""Every attention backend gives HF's greedy tokens; the paged-cpu kernel equals SDPA over the
same gathered context; ``auto`` picks per device and falls back when the kernel cannot build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_generate, left_padded, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf import plugins
from tdpipe_hf.predictors import ConstantPredictor
from tdpipe_hf.runtime import attention, cpu_attention

BACKENDS = sorted(plugins.BUILTINS[plugins.ATTENTION_BACKENDS])
needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler for the paged-cpu kernel")


def reference(q, k_cache, v_cache, tables, lengths, rows, scale):
    """SDPA over each row's context gathered from its block table, one row at a time."""
    block_size = k_cache.shape[1]
    out = torch.zeros_like(q)
    for table, length, row in zip(tables.tolist(), lengths.tolist(), rows.tolist()):
        keys = k_cache[table].flatten(0, 1)[:length].transpose(0, 1)[None].float()
        values = v_cache[table].flatten(0, 1)[:length].transpose(0, 1)[None].float()
        assert keys.shape[2] == length <= len(table) * block_size
        query = q[row].float()[None, :, None]
        out[row] = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)[0, :, 0].to(q.dtype)
    return out


@needs_kernel
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("q_heads, kv_heads, dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 24)])
def test_kernel_equals_sdpa_on_the_gathered_context(dtype, tolerance, q_heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(q_heads * 100 + dim)
    block_size, num_blocks, tokens = 4, 64, 12
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.tensor([1, 3, 4, 5, 8, 9, 17, 30])  # inside, at and across block boundaries
    width = -(-int(lengths.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=generator)[:len(lengths) * width].view(len(lengths), width)
    rows = torch.tensor([11, 0, 5, 2, 7, 3, 9, 1])  # decode rows anywhere in the packed batch
    # the query as HF's attention modules hand it over: [heads, tokens, dim] seen as [tokens, heads, dim]
    q = torch.randn(q_heads, tokens, dim, generator=generator).to(dtype).transpose(0, 1)
    out = torch.full((tokens, q_heads, dim), 7.0, dtype=dtype)
    scale = dim ** -0.5
    cpu_attention.kernel().paged_decode(q, k_cache, v_cache, tables, lengths, rows, out, scale)
    expected = reference(q, k_cache, v_cache, tables, lengths, rows, scale)
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), atol=tolerance, rtol=tolerance)
    untouched = [i for i in range(tokens) if i not in rows.tolist()]
    assert (out[untouched] == 7.0).all(), "the kernel wrote rows it was not given"


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("q_heads, kv_heads, rows", [(9, 3, [0]), (8, 4, [1, 0]), (6, 1, [0]), (4, 4, [2, 0, 1])])
def test_kernel_splits_few_requests_over_the_threads(threads, q_heads, kv_heads, rows):
    """Fewer requests than threads: each request's KV heads are shared out among the threads
    (every query head still attended once), over contexts longer than the kernel's prefetch
    distance."""
    generator = torch.Generator().manual_seed(threads * 10 + kv_heads)
    block_size, num_blocks, dim = 4, 160, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    lengths = torch.tensor([150, 97, 64][:len(rows)])
    width = -(-int(lengths.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=generator)[:len(rows) * width].view(len(rows), width)
    rows = torch.tensor(rows)
    q = torch.randn(len(rows), q_heads, dim, generator=generator)
    out = torch.full_like(q, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_attention.kernel().paged_decode(q, k_cache, v_cache, tables, lengths, rows, out, 0.25)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, tables, lengths, rows, 0.25), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_refuses_what_it_cannot_read():
    q = torch.randn(2, 4, 8)
    cache = torch.randn(4, 4, 2, 8)
    tables, lengths, rows = torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1]), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="int64"):
        cpu_attention.kernel().paged_decode(q, cache, cache, tables.int(), lengths, rows, torch.empty_like(q), 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        cpu_attention.kernel().paged_decode(torch.randn(2, 3, 8), cache, cache, tables, lengths, rows,
                                            torch.empty(2, 3, 8), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("num_stages, kv_blocks", [(1, None), (2, 24)], ids=["1-stage", "2-stage-tight-kv"])
def test_every_backend_matches_hf(backend, model_type, num_stages, kv_blocks):
    """Mixed prompt lengths, a padded batch and (tight KV) preemption with recompute."""
    if backend == "paged-cpu" and not cpu_attention.available():
        pytest.skip("no C++ compiler for the paged-cpu kernel")
    model = tiny_model(model_type, seed=71)
    ids, mask = left_padded(random_prompts(12, low=1, high=60, seed=72))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    # a predictor that expects one-token answers over-admits, so the tight budget must preempt
    tdpipe_hf.wrap(model, num_stages=num_stages, block_size=4, kv_blocks=kv_blocks, attention_backend=backend,
                   predictor=ConstantPredictor(1.0))
    try:
        assert model.config._attn_implementation == f"tdpipe-{backend}"
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        stats = model.tdpipe_engine.last_stats
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)
    if kv_blocks is not None:
        assert stats.preemptions > 0, "the tight budget should force recompute through the backend"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_serves_mixed_micro_batches_of_chunks_and_decodes(backend):
    """The hybrid schedule with small chunks: prompts are prefilled in pieces on top of their
    cached context, in the same micro-batches as other requests' decode rows."""
    if backend == "paged-cpu" and not cpu_attention.available():
        pytest.skip("no C++ compiler for the paged-cpu kernel")
    model = tiny_model("llama", seed=73)
    ids, mask = left_padded(random_prompts(10, low=5, high=50, seed=74))
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, attention_backend=backend, policy="hybrid",
                   prefill_chunk_tokens=24)
    try:
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        batches = model.tdpipe_engine.last_stats.micro_batches
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)
    assert batches.get("mixed", 0) > 0, f"no micro-batch mixed chunks with decodes: {dict(batches)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_every_backend_prefills_on_top_of_blocks_from_the_prefix_cache(backend, model_type):
    """Prompts that share a start of 26 tokens, and repeats: those prefilled after the first
    take its cached blocks, attend to KV another request computed, and still give HF's tokens."""
    if backend == "paged-cpu" and not cpu_attention.available():
        pytest.skip("no C++ compiler for the paged-cpu kernel")
    model = tiny_model(model_type, seed=75)
    start = random_prompts(1, low=26, high=26, seed=76)[0]
    ends = random_prompts(8, low=1, high=9, seed=77)
    ids, mask = left_padded([start + end for end in ends] + [start + ends[0], start])
    expected = hf_generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, attention_backend=backend, prefill_chunk_tokens=36)
    try:
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        stats = model.tdpipe_engine.last_stats
    finally:
        tdpipe_hf.unwrap(model)
    assert torch.equal(actual, expected)
    assert stats.cached_tokens >= 6 * 24, "most prompts should have taken the shared start from the cache"


def test_auto_picks_the_kernel_on_cpus_and_one_call_per_layer_with_a_gpu(monkeypatch):
    kernel_here = cpu_attention.available()
    assert attention.resolve("auto", ("cpu", "cpu")) == ("paged-cpu" if kernel_here else "paged-sdpa")
    assert attention.resolve("auto", ("cpu", "cuda:0")) == "paged-batched"
    assert attention.resolve("auto", ("cuda:0",)) == "paged-batched"
    assert attention.resolve("paged-sdpa", ("cpu",)) == "paged-sdpa"
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    assert attention.resolve("auto", None) == "paged-sdpa"


def test_wrap_resolves_auto_and_names_the_choices():
    model = tiny_model("llama", seed=73)
    tdpipe_hf.wrap(model)
    try:
        chosen = model.tdpipe_engine.config.attention_backend
        assert chosen in BACKENDS and model.config._attn_implementation == f"tdpipe-{chosen}"
    finally:
        tdpipe_hf.unwrap(model)
    with pytest.raises(ValueError, match=r"attention_backend must be one of \('auto', .*paged-cpu"):
        tdpipe_hf.wrap(model, attention_backend="flash")


@needs_kernel
def test_loading_the_kernel_keeps_denormals():
    """The kernel is compiled with -ffast-math; linking it must not switch the process to
    flush-to-zero (HF's own computations in the same process would change)."""
    cpu_attention.kernel()
    tiny = torch.tensor([1e-39])
    assert (tiny * torch.ones(64))[0].item() > 0


@needs_kernel
def test_a_built_kernel_loads_past_a_lock_left_by_a_killed_build():
    """A process killed while building (or checking) the kernel leaves torch's build lock behind;
    ``cpp_extension.load`` then waits on it forever. A kernel already built must load anyway."""
    import subprocess
    import sys

    lock = Path(cpu_attention.kernel().__file__).with_name("lock")
    assert not lock.exists()
    lock.touch()
    try:
        loaded = subprocess.run([sys.executable, "-c", "from tdpipe_hf.runtime import cpu_attention as c; "
                                 "print(c.kernel().__name__)"], capture_output=True, text=True,
                                timeout=120)  # a hang guard: the old way never returned
    finally:
        lock.unlink()
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == Path(cpu_attention.kernel().__file__).name.split(".")[0]
