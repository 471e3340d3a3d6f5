"""The attention backend ``paged-batched``: every row of a micro-batch in one SDPA call per layer.

``paged-sdpa`` attends prefill segments one call each and decode rows in groups of similar
length, which keeps padding small: right for a CPU, where the work is the arithmetic. On a GPU
the cost of a small micro-batch is the number of kernel launches per layer, so this backend pads
instead: the micro-batch's queries become ``[rows, longest new span]``, each row's context is
gathered from its block table to ``[rows, longest context]``, and one masked SDPA (causal within
the new span, nothing past a row's length) serves prefill, recompute and decode rows together.
Its per-micro-batch metadata crosses to the device as one tensor, so a step costs one host copy.
The price is transient memory: each layer gathers ``rows x longest context`` keys and values,
where ``paged-sdpa`` gathers about the sum of the contexts; a kernel that reads the block table
in place (flash-attn's varlen with paging) would need neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionContext, PackedTokens, _gather, paged_attention, store_new_kv


@dataclass
class BatchedContext(AttentionContext):
    """``AttentionContext`` (ids, positions, slots, sampled rows) plus the padded layout."""

    blocks: torch.Tensor = None              # [rows, max blocks] block tables, zero-padded
    mask: torch.Tensor = None                # [rows, 1, longest span, max blocks * block size]
    query_index: torch.Tensor | None = None  # [rows, longest span] packed token of each query slot
    out_index: torch.Tensor | None = None    # [tokens] padded slot of each packed token
    # (both None when every row has one new token: the packed order is already one query per row)

    @classmethod
    def build(cls, batch, block_size: int, device: torch.device | str = "cpu", **_) -> "BatchedContext":
        seqs = batch.seqs
        span = max(len(seq.token_ids) for seq in seqs)
        width = max(len(seq.block_table) for seq in seqs)
        packed = PackedTokens.of(batch, block_size)
        tables, starts, lengths, query_index, out_index = [], [], [], [], []
        begin = 0
        for row, seq in enumerate(seqs):
            n, table = len(seq.token_ids), seq.block_table
            tables.extend(table + [0] * (width - len(table)))
            starts.append(seq.start)
            lengths.append(seq.start + n)
            query_index.extend(list(range(begin, begin + n)) + [begin] * (span - n))
            out_index.extend(range(row * span, row * span + n))
            begin += n
        parts = [packed.ids, packed.positions, packed.slots, packed.logits_rows, tables, starts, lengths]
        if span > 1:
            parts += [query_index, out_index]
        # one host-to-device copy for the whole micro-batch, then views of it
        flat = torch.tensor([v for part in parts for v in part], dtype=torch.long).to(device, non_blocking=True)
        views = list(flat.split([len(part) for part in parts]))
        ids_t, positions_t, slots_t, logits_t, tables_t, starts_t, lengths_t = views[:7]
        rows = len(seqs)
        keys = torch.arange(width * block_size, device=flat.device)
        # query j of row r sits at position start_r + j; padded query slots see key 0 only (no NaN)
        query_pos = starts_t[:, None] + torch.arange(span, device=flat.device)[None, :]
        valid = query_pos < lengths_t[:, None]
        query_pos = torch.where(valid, query_pos, 0)
        mask = (keys[None, None, :] <= query_pos[:, :, None])[:, None]
        return cls(ids_t, positions_t, slots_t, logits_t, decode_groups=[], all_decode=False, segments=[],
                   blocks=tables_t.view(rows, width), mask=mask,
                   query_index=views[7].view(rows, span) if span > 1 else None,
                   out_index=views[8] if span > 1 else None)


def batched_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``AttentionInterface`` function of ``paged-batched`` (see the module doc); calls with
    another backend's metadata, or none, go to ``paged-sdpa``'s."""
    ctx = kwargs.get("tdpipe_ctx")
    if not isinstance(ctx, BatchedContext):
        return paged_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    q, _, _, k_cache, v_cache = store_new_kv(module, query, key, value, ctx, kwargs["tdpipe_kv"])
    keys = _gather(k_cache, ctx.blocks).transpose(1, 2)  # [rows, kv heads, context, dim]
    values = _gather(v_cache, ctx.blocks).transpose(1, 2)
    queries = q.unsqueeze(1) if ctx.query_index is None else q[ctx.query_index]  # [rows, span, heads, dim]
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=ctx.mask,
                                         scale=scaling, enable_gqa=True).transpose(1, 2)
    out = out[:, 0] if ctx.out_index is None else out.reshape(-1, *out.shape[2:])[ctx.out_index]
    return out.unsqueeze(0), None


class PagedBatched:
    """The attention backend ``paged-batched`` (registry group ``tdpipe_hf.attention_backends``)."""

    build = staticmethod(BatchedContext.build)
    forward = staticmethod(batched_attention)
