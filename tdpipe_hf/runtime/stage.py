"""One pipeline stage: a contiguous slice of HF decoder layers, run with HF's own modules."""

from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..plan import MicroBatch
from .attention import ATTENTION_NAME, AttentionContext
from .kv_cache import PagedKVCache
from .packed_linear import PackedLinears, packing_pays
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
        self._shared = (self.embed, self.lm_head, self.rotary)  # the model's own; place() may copy them
        self._homes = [_device_of(module) for module in self._owned()]  # where the model keeps its layers

    @property
    def layers_label(self) -> str:
        """``layers 2-3``: how error messages name the stage's share of the model."""
        return f"layers {self.index_range.start}-{self.index_range.stop - 1}"

    @property
    def device(self) -> torch.device:
        return _device_of(self.layers[0])

    def _owned(self) -> list:
        """The modules that belong to this stage alone (they move with it)."""
        return [*self.layers, *([self.norm] if self.norm is not None else [])]

    def bytes_to_place(self, device: torch.device) -> int:
        """The weight bytes :meth:`place` would put on ``device`` (modules not there yet)."""
        modules = [m for m in (*self._owned(), *self._shared) if m is not None and _device_of(m) != device]
        tensors = {id(t): t for m in modules for t in itertools.chain(m.parameters(), m.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def place(self, device: torch.device | str) -> None:
        """Run the stage on ``device``. Its decoder layers and final norm belong to it alone and
        move; the embedding, LM head (often tied to the embedding) and rotary tables may be shared
        with other stages of the same model, so the stage takes copies of those not on ``device``."""
        device = torch.device(device)
        owned = self._owned()
        strays = [m for m in owned if _device_of(m) != device]
        strays += [m for m in self._shared if m is not None and _device_of(m) != device]
        if not strays:
            return
        if self.kv is not None or self.packed is not None:
            raise RuntimeError("place() a stage before its KV cache is allocated and its weights packed")
        for module in owned:
            module.to(device)
        self.embed, self.lm_head, self.rotary = _copies_on(self._shared, device)

    def allocate_kv(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> None:
        """Give the stage its own KV tensors (in the process that runs it)."""
        config = getattr(self.layers[0].self_attn, "config", None)
        if config is not None and not str(config._attn_implementation).startswith(ATTENTION_NAME):
            raise RuntimeError(f"stage layers use {config._attn_implementation!r} attention, not tdpipe's paged "
                               "attention: build stages through tdpipe_hf.wrap")
        weight = next(self.layers[0].parameters())
        self.kv = PagedKVCache(self.index_range.start, len(self.layers), num_blocks, block_size, kv_heads,
                               head_dim, weight.dtype, weight.device)

    def pack_weights(self, only_if_faster: bool = False) -> None:
        """Pack the stage's linear weights for oneDNN (CPU float32 only; see ``packed_linear``),
        in the process that runs the stage; with ``only_if_faster``, only where that is measured
        to pay on one of the stage's weights (``pack_weights="auto"``)."""
        if self.packed is not None:
            return
        if only_if_faster:
            linears = [m for layer in self.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            if not linears or not packing_pays(max(linears, key=lambda m: m.weight.numel()).weight):
                return
        self.packed = PackedLinears([*self.layers, *([self.lm_head] if self.lm_head is not None else [])])

    def release(self) -> None:
        """Undo :meth:`pack_weights`, the KV cache and :meth:`place`: the model's modules compute
        with their own weights again, on the devices they came from."""
        if self.packed is not None:
            self.packed.restore()
            self.packed = None
        self.kv = None
        for module, home in zip(self._owned(), self._homes):
            module.to(home)
        self.embed, self.lm_head, self.rotary = self._shared

    def drop(self) -> None:
        """Forget every module and the cache, leaving the model as it is, so that a worker
        process that swaps stages frees the old one's memory even while something still holds
        this object."""
        self.packed = self.kv = self.embed = self.norm = self.lm_head = self.rotary = None
        self.layers, self._shared, self._homes = [], (None, None, None), []

    def __getstate__(self):
        if self.packed is not None:
            raise RuntimeError("a stage with packed weights stays in its process; pack in the worker")
        return self.__dict__

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor | None, ctx: AttentionContext, probe: Probe | None = None) -> torch.Tensor:
        """``hidden`` is ``[1, tokens, hidden]`` (None on the first stage); returns the next stage's
        input, or ``[sampled rows, vocab]`` logits on the last stage. ``probe`` keeps the hidden
        states the micro-batch asked for, if its layer is one of this stage's."""
        with self.weights():
            return self._forward(hidden, ctx, probe)

    def weights(self):
        """Context in which the stage's linear layers compute with its packed weights, if any."""
        return self.packed.active() if self.packed is not None else nullcontext()

    def _forward(self, hidden: torch.Tensor | None, ctx: AttentionContext, probe: Probe | None = None) -> torch.Tensor:
        if self.embed is not None:
            hidden = self.embed(ctx.input_ids[None])
        hidden = self.run_layers(hidden, ctx, probe)
        if self.lm_head is None:
            return hidden
        return self.lm_head(self.norm(hidden[0, ctx.logits_rows]))

    def run_layers(self, hidden: torch.Tensor, ctx: AttentionContext, probe: Probe | None = None) -> torch.Tensor:
        """The stage's decoder layers alone, on ``[1, tokens, hidden]`` (no embedding, no head)."""
        positions = ctx.positions[None]
        rope = self.rotary(hidden, positions)
        for index, layer in zip(self.index_range, self.layers):
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope,
                        tdpipe_ctx=ctx, tdpipe_kv=self.kv)
            hidden = out[0] if isinstance(out, tuple) else out
            if probe is not None and index == probe.layer - 1:
                probe.capture(hidden)
        return hidden


@dataclass
class Probe:
    """The hidden states a micro-batch asks for (``MicroBatch.probe_layer``, ``SequencePlan.probe``):
    built once per micro-batch, filled by the stage that runs that layer, and carried to the
    controller in the ``StepResult``."""

    layer: int
    request_ids: list[int]
    rows: list[int]
    states: dict = field(default_factory=dict)  # request id -> float32 vector

    @classmethod
    def of(cls, batch: MicroBatch, states: dict | None = None) -> "Probe | None":
        """The batch's probe (with ``states`` already captured upstream), or None if it asks for none."""
        if batch.probe_layer is None:
            return None
        ids, rows = batch.probe_rows()
        return cls(batch.probe_layer, ids, rows, dict(states or {})) if ids else None

    def capture(self, hidden: torch.Tensor) -> None:
        rows = hidden[0, self.rows].float().cpu().numpy()
        self.states.update(zip(self.request_ids, rows))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _copies_on(modules, device: torch.device) -> list:
    """``modules`` (None entries kept) with copies of those not on ``device`` made there directly,
    not cloned on their own device first; a tensor two of them share (a tied embedding and LM
    head) stays shared between the copies."""
    memo: dict[int, torch.Tensor] = {}
    for module in modules:
        if module is None or _device_of(module) == device:
            continue
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) not in memo:
                moved = tensor.detach().to(device)
                memo[id(tensor)] = torch.nn.Parameter(moved, tensor.requires_grad) \
                    if isinstance(tensor, torch.nn.Parameter) else moved
    return [m if m is None or _device_of(m) == device else copy.deepcopy(m, memo).to(device) for m in modules]


@dataclass(frozen=True)
class StageSetup:
    """What the process that runs a stage does to make it ready: place it on its device, allocate
    its KV cache and, on CPU, pack its weights (``pack_weights``: True, False, or "auto": where it
    is measured to pay in that process). Picklable, so a worker process gets it with its stage."""

    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    pack_weights: bool | str = False
    attention: str = "paged-sdpa"  # the attention backend's registry name
    plan_ahead: bool = False  # the last stage hands decode tokens to stage 0 (TDPipeConfig.plan_ahead)

    def apply(self, stage: Stage, device: torch.device | None = None) -> None:
        if device is not None:
            stage.place(device)
        stage.allocate_kv(self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        if self.pack_weights:
            stage.pack_weights(only_if_faster=self.pack_weights == "auto")


def build_stages(model, num_stages: int, costs: StageCosts | None = None) -> list[Stage]:
    """The model's stages, balanced by ``costs`` (default: weight sizes); the executor that runs
    them places them and gives them their KV (:class:`StageSetup`)."""
    ranges = split_layers(costs or size_costs(model), num_stages)
    return [Stage(model, layers, i == 0, i == len(ranges) - 1, None) for i, layers in enumerate(ranges)]
