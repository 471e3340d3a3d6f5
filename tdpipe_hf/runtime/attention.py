"""Paged attention plugged into transformers through ``AttentionInterface``.

HF's own attention modules project Q/K/V and apply RoPE; then they call the function registered
under ``config._attn_implementation``. Ours stores the new keys/values in the stage's paged cache
and attends over each request's cached context. A micro-batch is packed into one sequence (no
padding): rows with one new token (decode) are attended in batched calls, grouped by context
length so that each group pads little; rows with several (prefill or recompute) one by one.
Without a TD-Pipe context (a plain ``model(...)`` call) the function defers to HF's SDPA
attention, so the wrapped model still works as a normal model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..plan import MicroBatch

ATTENTION_NAME = "tdpipe"


@dataclass
class Segment:
    """A row with several new tokens: packed tokens ``[begin, end)`` at positions ``start...``."""

    begin: int
    end: int
    start: int
    block_table: torch.Tensor


@dataclass
class DecodeGroup:
    """Single-token rows of similar context length, attended in one batched call."""

    rows: torch.Tensor    # packed index of each row
    blocks: torch.Tensor  # [rows, max_blocks] block tables, zero-padded
    mask: torch.Tensor    # [rows, 1, 1, max_blocks * block_size] valid context
    lengths: torch.Tensor  # [rows] context length of each row


# A decode group is padded to its longest context; a new group starts when a row's context is
# this much longer than the group's shortest, so short rows do not pay for long ones.
GROUP_LENGTH_RATIO = 1.5
MIN_GROUP_ROWS = 8


def group_by_length(lengths: list[int], ratio: float = GROUP_LENGTH_RATIO) -> list[list[int]]:
    """Indices of ``lengths`` in runs of similar length (sorted), each a decode group; a group
    grows while a row's length is at most ``ratio`` times the group's shortest."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) < MIN_GROUP_ROWS
                       or lengths[index] <= ratio * lengths[groups[-1][0]]):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@dataclass
class PackedTokens:
    """The host lists every backend's metadata starts from: the micro-batch's new tokens packed
    end to end, with their positions, flat cache slots, and the packed index of each sampled row."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    logits_rows: list[int]

    @classmethod
    def of(cls, batch: MicroBatch, block_size: int) -> "PackedTokens":
        packed = cls([], [], [], [])
        for seq in batch.seqs:
            begin, table = len(packed.ids), seq.block_table
            packed.ids.extend(seq.token_ids)
            for pos in range(seq.start, seq.start + len(seq.token_ids)):
                packed.positions.append(pos)
                packed.slots.append(table[pos // block_size] * block_size + pos % block_size)
            if seq.sample:
                packed.logits_rows.append(begin + len(seq.token_ids) - 1)
        return packed


@dataclass
class AttentionContext:
    """Per-micro-batch index tensors, built once and shared by every layer of every stage."""

    input_ids: torch.Tensor       # [tokens]
    positions: torch.Tensor       # [tokens]
    slots: torch.Tensor           # [tokens] flat cache slot of each new token
    logits_rows: torch.Tensor     # packed index of the last token of each sampled row
    decode_groups: list[DecodeGroup]
    all_decode: bool  # every row is a decode row, in one group, in packed order
    segments: list[Segment]

    @classmethod
    def build(cls, batch: MicroBatch, block_size: int, device: torch.device | str = "cpu",
              group_ratio: float = GROUP_LENGTH_RATIO) -> "AttentionContext":
        packed = PackedTokens.of(batch, block_size)
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        segments: list[Segment] = []
        begin = 0
        for seq in batch.seqs:
            n, table = len(seq.token_ids), seq.block_table
            if n == 1:
                decode_rows.append(begin)
                decode_tables.append(table)
                decode_lens.append(seq.context_len)
            else:
                segments.append(Segment(begin, begin + n, seq.start,
                                        torch.tensor(table, dtype=torch.long, device=device)))
            begin += n

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        groups = []
        memberships = group_by_length(decode_lens, group_ratio)
        for members in memberships:
            tables = [decode_tables[i] for i in members]
            width = max(len(t) for t in tables)
            span = torch.arange(width * block_size, device=device)
            lens = tensor([decode_lens[i] for i in members])
            groups.append(DecodeGroup(tensor([decode_rows[i] for i in members]),
                                      tensor([t + [0] * (width - len(t)) for t in tables]),
                                      (span[None, :] < lens[:, None])[:, None, None, :], lens))
        # checked on the host lists: reading the tensor back would wait for the device
        in_order = len(groups) == 1 and [decode_rows[i] for i in memberships[0]] == list(range(len(packed.ids)))
        return cls(tensor(packed.ids), tensor(packed.positions), tensor(packed.slots), tensor(packed.logits_rows),
                   groups, not segments and in_order, segments)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``AttentionInterface`` function. ``query``: ``[1, heads, tokens, dim]``, RoPE applied."""
    ctx: AttentionContext | None = kwargs.get("tdpipe_ctx")
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    q, k, v, k_cache, v_cache = store_new_kv(module, query, key, value, ctx, kwargs["tdpipe_kv"])
    out = q.new_empty(q.shape)
    for group in ctx.decode_groups:
        qd = q if ctx.all_decode else q[group.rows]
        kd = _gather(k_cache, group.blocks).transpose(1, 2)  # [rows, kv_heads, ctx, dim]
        vd = _gather(v_cache, group.blocks).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd.unsqueeze(2), kd, vd, attn_mask=group.mask,
                                            scale=scaling, enable_gqa=True)[:, :, 0]
        if ctx.all_decode:
            out = od
        else:
            out[group.rows] = od
    attend_segments(q, k, v, k_cache, v_cache, ctx, out, scaling)
    return out.unsqueeze(0), None


def store_new_kv(module, query, key, value, ctx: AttentionContext, cache):
    """The micro-batch's new keys/values written to the stage's paged cache; returns q, k, v as
    ``[tokens, heads, dim]`` views and this layer's ``(k_cache, v_cache)`` (every backend's first step)."""
    q = query[0].transpose(0, 1)  # [tokens, heads, dim]
    k = key[0].transpose(0, 1)    # [tokens, kv_heads, dim]
    v = value[0].transpose(0, 1)
    cache.write(module.layer_idx, ctx.slots, k, v)
    return (q, k, v, *cache.layer(module.layer_idx))


def attend_segments(q, k, v, k_cache, v_cache, ctx: AttentionContext, out: torch.Tensor, scaling) -> None:
    """Rows with several new tokens (prefill, recompute), one SDPA call each, into ``out``:
    causal over their own keys when they start at position 0, else over their cached context."""
    for seg in ctx.segments:
        qs = q[seg.begin:seg.end].transpose(0, 1).unsqueeze(0)
        n = seg.end - seg.begin
        if seg.start == 0:
            ks, vs = k[seg.begin:seg.end], v[seg.begin:seg.end]
            mask, causal = None, True
        else:  # recompute or chunked prefill on top of cached context
            total = seg.start + n
            ks = _gather(k_cache, seg.block_table)[:total]
            vs = _gather(v_cache, seg.block_table)[:total]
            rows = torch.arange(seg.start, total, device=q.device)[:, None]
            mask, causal = torch.arange(total, device=q.device)[None, :] <= rows, False
        os_ = F.scaled_dot_product_attention(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
                                             attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True)
        out[seg.begin:seg.end] = os_[0].transpose(0, 1)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks ``[..., n]`` of ``cache`` (``[num_blocks, block_size, heads, dim]``) laid end to end:
    ``[..., n * block_size, heads, dim]``. ``index_select`` is several times faster on CPU than
    advanced indexing for this copy."""
    rows = cache.index_select(0, blocks.flatten())
    return rows.view(*blocks.shape[:-1], blocks.shape[-1] * cache.shape[1], *cache.shape[2:])


class PagedSDPA:
    """The built-in attention backend ``paged-sdpa``: gathered blocks + SDPA (see the module doc).

    An attention backend (entry-point group ``tdpipe_hf.attention_backends``, built with no
    arguments) provides ``build(batch, block_size, device)``, the per-micro-batch metadata every
    layer of a stage reads, and ``forward(module, query, key, value, attention_mask, scaling,
    dropout, **kwargs)``, the function transformers' attention modules call, with the metadata as
    ``kwargs["tdpipe_ctx"]`` and the stage's ``PagedKVCache`` as ``kwargs["tdpipe_kv"]``."""

    build = staticmethod(AttentionContext.build)
    forward = staticmethod(paged_attention)


DEFAULT_BACKEND = "paged-sdpa"
BATCHED_BACKEND = "paged-batched"  # auto's choice with a GPU
AUTO = "auto"  # the fastest built-in for the stages' devices (see resolve)
_BACKENDS: dict[str, object] = {}


def backend(name: str = DEFAULT_BACKEND):
    """The attention backend registered as ``name`` (built once per process)."""
    if name not in _BACKENDS:
        from .. import plugins

        _BACKENDS[name] = plugins.build(plugins.ATTENTION_BACKENDS, name)
    return _BACKENDS[name]


def resolve(name: str, devices) -> str:
    """The backend ``auto`` means for stages on ``devices`` (device names; None: the CPU):
    on CPUs alone ``paged-cpu`` when its kernel builds here, else ``paged-sdpa``; with a GPU
    ``paged-batched``, whose one call per layer beat paged-sdpa's several by 1.8-2.8x on an H200
    (README, GPU check). Any other name is returned as it is."""
    if name != AUTO:
        return name
    if all(torch.device(d).type == "cpu" for d in (devices or ("cpu",))):
        from .cpu_attention import available

        return "paged-cpu" if available() else DEFAULT_BACKEND
    return BATCHED_BACKEND


def register(name: str = DEFAULT_BACKEND) -> str:
    """Register backend ``name``'s forward with transformers (idempotent); the attention
    implementation name a wrapped model's config then carries."""
    implementation = f"{ATTENTION_NAME}-{name}"
    AttentionInterface.register(implementation, backend(name).forward)
    return implementation
