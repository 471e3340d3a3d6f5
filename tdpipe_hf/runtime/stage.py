"""One pipeline stage: a contiguous slice of HF decoder layers, run with HF's own modules."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .attention import ATTENTION_NAME, AttentionContext
from .kv_cache import PagedKVCache
from .packed_linear import PackedLinears
from .split import StageCosts, size_costs, split_layers


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
        self.packed: PackedLinears | None = None
        self.home = self.device  # where the model keeps these modules; see place()
        self._shared = (self.embed, self.lm_head, self.rotary)

    @property
    def device(self) -> torch.device:
        return next(self.layers[0].parameters()).device

    def place(self, device: torch.device | str) -> None:
        """Run the stage on ``device``. Its decoder layers and final norm belong to it alone and
        move; the embedding, LM head (often tied to the embedding) and rotary tables may be shared
        with other stages of the same model, so the stage takes copies of them instead."""
        device = torch.device(device)
        if device == self.device:
            return
        if self.kv is not None or self.packed is not None:
            raise RuntimeError("place() a stage before its KV cache is allocated and its weights packed")
        for module in (*self.layers, self.norm):
            if module is not None:
                module.to(device)
        self.embed, self.lm_head, self.rotary = (None if module is None else copy.deepcopy(module).to(device)
                                                 for module in self._shared)

    def allocate_kv(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> None:
        """Give the stage its own KV tensors (in the process that runs it)."""
        config = getattr(self.layers[0].self_attn, "config", None)
        if config is not None and config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError(f"stage layers use {config._attn_implementation!r} attention, not tdpipe's paged "
                               "attention: build stages through tdpipe_hf.wrap")
        weight = next(self.layers[0].parameters())
        self.kv = PagedKVCache(self.index_range.start, len(self.layers), num_blocks, block_size, kv_heads,
                               head_dim, weight.dtype, weight.device)

    def pack_weights(self) -> None:
        """Pack the stage's linear weights for oneDNN (CPU float32 only; see ``packed_linear``),
        in the process that runs the stage."""
        if self.packed is None:
            self.packed = PackedLinears([*self.layers, *([self.lm_head] if self.lm_head is not None else [])])

    def release(self) -> None:
        """Undo :meth:`pack_weights` and :meth:`place`: the model's modules compute with their own
        weights again, on the device they came from."""
        if self.packed is not None:
            self.packed.restore()
            self.packed = None
        if self.device != self.home:
            self.kv = None
            for module in (*self.layers, self.norm):
                if module is not None:
                    module.to(self.home)
            self.embed, self.lm_head, self.rotary = self._shared

    def __getstate__(self):
        if self.packed is not None:
            raise RuntimeError("a stage with packed weights stays in its process; pack in the worker")
        return self.__dict__

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor | None, ctx: AttentionContext) -> torch.Tensor:
        """``hidden`` is ``[1, tokens, hidden]`` (None on the first stage); returns the next stage's
        input, or ``[sampled rows, vocab]`` logits on the last stage."""
        with self.weights():
            return self._forward(hidden, ctx)

    def weights(self):
        """Context in which the stage's linear layers compute with its packed weights, if any."""
        return self.packed.active() if self.packed is not None else nullcontext()

    def _forward(self, hidden: torch.Tensor | None, ctx: AttentionContext) -> torch.Tensor:
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



@dataclass(frozen=True)
class StageSetup:
    """What the process that runs a stage does to make it ready: allocate its KV cache and, on
    CPU, pack its weights. Picklable, so a worker process gets it with its stage."""

    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    pack_weights: bool = False

    def apply(self, stage: Stage) -> None:
        stage.allocate_kv(self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        if self.pack_weights:
            stage.pack_weights()


def build_stages(model, num_stages: int, setup: StageSetup | None, costs: StageCosts | None = None,
                 devices: list[torch.device] | None = None) -> list[Stage]:
    """The model's stages, balanced by ``costs`` (default: weight sizes), placed on ``devices``
    and made ready here with ``setup``; with None they are neither placed nor given KV yet (a
    worker process does both)."""
    ranges = split_layers(costs or size_costs(model), num_stages)
    stages = []
    for i, layers in enumerate(ranges):
        stage = Stage(model, layers, i == 0, i == len(ranges) - 1, None)
        if setup is not None:
            if devices is not None:
                stage.place(devices[i])
            setup.apply(stage)
        stages.append(stage)
    return stages


def blocks_for_budget(model, budget_bytes: int, block_size: int, num_layers: int | None = None) -> int:
    """KV blocks that fit in ``budget_bytes`` when it holds ``num_layers`` layers' share of each
    block (default: all of them)."""
    kv_heads, head_dim = kv_geometry(model)
    layers = len(model.model.layers) if num_layers is None else num_layers
    per_block = PagedKVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, model.dtype)
    return max(0, budget_bytes // per_block)

