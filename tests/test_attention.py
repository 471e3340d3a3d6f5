"""Paged attention details: decode rows grouped by context length still give HF's tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import hf_generate, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf.plan import MicroBatch, SequencePlan
from tdpipe_hf.runtime.attention import (
    GROUP_LENGTH_RATIO,
    MIN_GROUP_ROWS,
    AttentionContext,
    group_by_length,
)
from tdpipe_hf.runtime.kv_cache import PagedKVCache


def test_groups_cover_every_row_once_and_stay_close_in_length():
    lengths = [10, 500, 12, 11, 480, 13, 14, 15, 16, 17, 18, 19, 20, 700, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    groups = group_by_length(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)
    for group in groups:
        for index in group[MIN_GROUP_ROWS:]:
            assert lengths[index] <= GROUP_LENGTH_RATIO * lengths[group[0]]
    assert len(groups) >= 2


def test_context_splits_a_mixed_decode_batch():
    seqs = [SequencePlan(i, [5], start=n, block_table=list(range(i * 8, i * 8 + (n + 1 + 3) // 4)))
            for i, n in enumerate([3, 3, 3, 3, 3, 3, 3, 3, 3, 20, 21, 22, 23, 24, 25, 26, 27])]
    ctx = AttentionContext.build(MicroBatch(0, "decode", seqs), block_size=4)
    assert len(ctx.decode_groups) == 2 and not ctx.all_decode
    assert sorted(torch.cat([g.rows for g in ctx.decode_groups]).tolist()) == list(range(len(seqs)))


def test_mixed_context_lengths_match_hf():
    model = tiny_model("llama", seed=61)
    prompts = random_prompts(24, low=1, high=150, seed=62)
    expected = [hf_generate(model, torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    tdpipe_hf.wrap(model, num_stages=2, block_size=4)
    actual = model.generate_batch(prompts, max_new_tokens=8, do_sample=False)
    tdpipe_hf.unwrap(model)
    eos = model.generation_config.eos_token_id
    assert actual == [e[:e.index(eos) + 1] if eos in e else e for e in expected]


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not path.exists():
        return None
    return path.read_text().split("[")[1].split("]")[0]


def _mapping_of(address: int) -> dict[str, str]:
    """The ``/proc/self/smaps`` fields of the mapping that holds ``address``."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            if inside:
                break
            inside = low <= address < high
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs Linux with transparent huge pages on madvise")
def test_a_cpu_kv_cache_asks_for_huge_pages():
    """Where huge pages are given only on request, the cache's memory asks for them (before the
    zeros are written, so the pages come huge), and it still reads as zeros."""
    cache = PagedKVCache(0, 2, 512, 16, 3, 64, torch.float32)  # 12 MiB per tensor: whole huge pages inside
    for tensor in (cache.keys, cache.values):
        assert _mapping_of(tensor.data_ptr() + tensor.nbytes // 2).get("THPeligible") == "1"
        assert not tensor.any()
