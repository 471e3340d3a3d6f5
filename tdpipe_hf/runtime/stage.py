"""One pipeline stage: a contiguous slice of HF decoder layers, run with HF's own modules."""

from __future__ import annotations

import torch
from accelerate.utils import compute_module_sizes

from .attention import ATTENTION_NAME, AttentionContext
from .kv_cache import PagedKVCache


# The LM head's time per step relative to its weight: it runs once per sequence (not per prompt
# token), with no attention, norms or activations around it, but its large GEMM runs near peak.
# Measured from the stage timelines of `tdpipe bench` on SmolLM2 (2 stage processes, 2 CPU cores,
# glibc malloc tuned): the head took as long as about 7 decoder layers, against the 8 its weight
# suggests.
LM_HEAD_COST_SHARE = 0.85


def split_layers(model, num_stages: int) -> list[range]:
    """Contiguous layer ranges that minimise the slowest stage's time.

    Layers are weighted by their size from accelerate's ``compute_module_sizes``; the input
    embedding is free (a lookup); the LM head adds ``LM_HEAD_COST_SHARE`` of its size to the last
    stage, even when its weight is tied to the embedding.
    """
    num_layers = len(model.model.layers)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be between 1 and the model's {num_layers} decoder layers, got {num_stages}")
    sizes = compute_module_sizes(model)
    costs = [sizes[f"model.layers.{i}"] for i in range(num_layers)]
    costs[-1] += LM_HEAD_COST_SHARE * model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[s][j]: smallest possible slowest-stage cost when the first j layers form s stages
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, num_layers + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], prefix[j] - prefix[i])
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds = [num_layers]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class Stage:
    """Executes a micro-batch through its layers; the first embeds, the last returns logits."""

    def __init__(self, model, layers: range, is_first: bool, is_last: bool, kv: PagedKVCache | None):
        inner = model.model
        self.index_range = layers
        self.layers = [inner.layers[i] for i in layers]
        self.embed = inner.embed_tokens if is_first else None
        self.norm = inner.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        self.rotary = inner.rotary_emb
        self.kv = kv

    def allocate_kv(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> None:
        """Give the stage its own KV tensors (in the process that runs it)."""
        config = getattr(self.layers[0].self_attn, "config", None)
        if config is not None and config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError(f"stage layers use {config._attn_implementation!r} attention, not tdpipe's paged "
                               "attention: build stages through tdpipe_hf.wrap")
        weight = next(self.layers[0].parameters())
        self.kv = PagedKVCache(self.index_range.start, len(self.layers), num_blocks, block_size, kv_heads,
                               head_dim, weight.dtype, weight.device)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor | None, ctx: AttentionContext) -> torch.Tensor:
        """``hidden`` is ``[1, tokens, hidden]`` (None on the first stage); returns the next stage's
        input, or ``[sampled rows, vocab]`` logits on the last stage."""
        if self.embed is not None:
            hidden = self.embed(ctx.input_ids[None])
        positions = ctx.positions[None]
        rope = self.rotary(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope,
                        tdpipe_ctx=ctx, tdpipe_kv=self.kv)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.lm_head is None:
            return hidden
        return self.lm_head(self.norm(hidden[0, ctx.logits_rows]))


def kv_geometry(model) -> tuple[int, int]:
    """(kv heads, head dim) of the model, read through optimum's normalised config."""
    from optimum.utils import NormalizedConfigManager

    config = model.config
    try:
        normalized = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        heads, hidden = normalized.num_attention_heads, normalized.hidden_size
        kv_heads = getattr(normalized, "num_key_value_heads", None) or heads
    except (KeyError, AttributeError):
        heads, hidden = config.num_attention_heads, config.hidden_size
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return kv_heads, head_dim



def build_stages(model, num_stages: int, num_blocks: int, block_size: int, allocate_kv: bool = True) -> list[Stage]:
    """The model's stages. Without ``allocate_kv`` they carry no KV yet (a worker process allocates it)."""
    kv_heads, head_dim = kv_geometry(model)
    ranges = split_layers(model, num_stages)
    stages = []
    for i, layers in enumerate(ranges):
        stage = Stage(model, layers, i == 0, i == len(ranges) - 1, None)
        if allocate_kv:
            stage.allocate_kv(num_blocks, block_size, kv_heads, head_dim)
        stages.append(stage)
    return stages


def blocks_for_budget(model, budget_bytes: int, block_size: int) -> int:
    kv_heads, head_dim = kv_geometry(model)
    per_block = PagedKVCache.bytes_per_block(len(model.model.layers), block_size, kv_heads, head_dim, model.dtype)
    return max(0, budget_bytes // per_block)

