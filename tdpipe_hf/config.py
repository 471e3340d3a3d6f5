"""TDPipeConfig: every knob of the engine in one validated place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from . import plugins
from .controller.scheduler import PREFILL_PACKINGS
from .runtime.attention import AUTO
from .runtime.placement import parse_devices

LENGTH_PLANNING = ("distribution", "point")
OVERBOOKING = ("off", "cost")


@dataclass
class TDPipeConfig:
    """Engine settings. Invalid values raise ``ValueError`` naming the field, at construction.

    ``policy``: ``"tdpipe"`` (prefill and decode phases; ``stealing`` balances decode micro-batches,
    ``switch_policy`` decides when decode hands back to prefill), or a baseline in the same engine:
    ``"hybrid"`` (vLLM-style: prefill chunks and decodes mixed in every micro-batch) or ``"naive"``
    (static batches). ``paper_rules`` runs TD-Pipe with the paper's exact rules (stealing balanced
    by rows, the plain intensity switch, prefill batches in arrival order) instead of ours (stealing
    balanced by estimated time, the switch's last call, first-fit prefill packing, cost-weighed
    overbooking). Prefill admission (tdpipe): ``"greedy"`` (TD-Pipe: predicted output lengths, simulated future KV usage
    kept <= ``kv_threshold`` x the budget, predictions scaled by ``length_scale``; a threshold
    above 1 overbooks on purpose (the plan expects some preemptions; it never admits more than
    fits in the free blocks now, so a large threshold approaches ``fits``); with
    ``length_planning="distribution"`` every outcome the predictor gives a probability counts with
    that probability, ``"point"`` plans with one length per request; ``overbooking="cost"``, ours and
    the default unless ``paper_rules``, admits past the threshold, up to what fits now, when the
    stage times fitted to the run expect the bigger set's decode batches to gain more than its
    recomputations cost; ``"off"`` never does) or ``"fits"``
    (admit while the prompts fit now). ``decode_batcher`` names the decode batcher outright
    (``steal-time``, ``steal-rows``, ``static`` or a plugin) and ``prefill_packing`` the prefill
    packing (``first-fit`` or ``fcfs``); left None they follow ``stealing`` and ``paper_rules``.
    ``decode_fill_tokens`` (ours; 0, the default, is off): a TD-Pipe decode micro-batch of fewer
    rows than this also carries chunks of admitted prompts, up to that many tokens in all (the
    other policies, which set their own batches, ignore it, as they ignore the switch).
    ``plan_ahead`` (ours; off by default until measured to pay): in a TD-Pipe decode phase the
    controller plans a decode micro-batch's next step before its tokens come back and the last
    stage hands the tokens straight to stage 0, so the controller's turn-around (a result's trip
    to it, the scheduling, the plan's trip to stage 0) is off the path between decode steps; a
    request that stops on a token computes one step in vain. The other policies ignore it.
    ``prefix_caching`` (default True, as in vLLM v1): full KV blocks stay indexed by their tokens
    and everything before them, and a request whose sequence starts the same way (a shared system
    prompt, a repeated question, a preempted request coming back) takes them instead of computing
    them again; ``vllm-v0-pp`` never caches (vLLM v0 did not by default).
    ``policy``, ``admission``, ``decode_batcher``, ``switch_policy``, ``predictor`` and
    ``executor``, ``attention_backend`` are names in the plugin registry (``tdpipe_hf.plugins``): ``tdpipe policies``
    lists them; ``attention_backend="auto"`` picks ``paged-cpu`` when every stage runs on a CPU and
    its kernel builds (``paged-sdpa`` where it does not), ``paged-batched`` with a GPU. ``predictor``: None for the one shipped for the model, an
    entry-point name, a ``.npz`` path, or a predictor object. ``online_learning`` feeds finished
    requests' lengths back to the predictor. ``length_probe`` (greedy admission): once a request
    is prefilled, a probe on the model's hidden state of its last prompt token replaces the
    prompt-only prediction (``predictors.probe``); None: the one that comes with the predictor (shipped
    beside the shipped one, or ``P.probe.npz`` beside a predictor file ``P.npz``), False: none, or a
    ``.npz`` path / ``HiddenStateProbe``.

    The KV budget is given either in blocks (``kv_blocks``) or in bytes (``kv_cache_bytes``);
    with neither, it is sized from free memory when the engine starts, on every stage's device.

    ``devices``: where the stages run, one per stage or one for all (``"cuda:0,cuda:1"`` or a
    list). Default: the model's device, and a model on a GPU spread over the visible GPUs.
    """

    num_stages: int = 1
    block_size: int = 16
    kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 256
    prefill_chunk_tokens: int = 512
    policy: str = "tdpipe"
    stealing: bool = True
    paper_rules: bool = False
    decode_batcher: str | None = None
    prefill_packing: str | None = None
    admission: str = "greedy"
    predictor: Any = None
    length_probe: Any = None
    kv_threshold: float = 0.9
    length_scale: float = 1.0
    length_planning: str = "distribution"
    overbooking: str | None = None
    online_learning: bool = False
    switch_policy: str = "intensity"
    decode_fill_tokens: int = 0
    plan_ahead: bool = False
    prefix_caching: bool = True
    switch_fraction: float = 0.5
    executor: str = "local"
    threads_per_stage: int | None = None
    micro_batches: int | None = None
    pack_weights: bool | str = "auto"
    attention_backend: str = AUTO
    devices: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TDPipeConfig.{name} must be a positive integer, got {value!r}")

        for name in ("num_stages", "block_size", "max_num_seqs", "prefill_chunk_tokens"):
            positive_int(name)
        positive_int("kv_blocks", allow_none=True)
        positive_int("kv_cache_bytes", allow_none=True)
        positive_int("threads_per_stage", allow_none=True)
        positive_int("micro_batches", allow_none=True)
        fill = self.decode_fill_tokens
        if isinstance(fill, bool) or not isinstance(fill, int) or fill < 0:
            raise ValueError(f"TDPipeConfig.decode_fill_tokens must be a non-negative integer, got {fill!r}")
        for name in ("plan_ahead", "prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TDPipeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ValueError("TDPipeConfig: give kv_blocks or kv_cache_bytes, not both")
        if isinstance(self.switch_fraction, bool) or not isinstance(self.switch_fraction, (int, float)) \
                or not 0.0 <= self.switch_fraction <= 1.0:
            raise ValueError(f"TDPipeConfig.switch_fraction must be in [0, 1], got {self.switch_fraction!r}")
        if self.overbooking is not None and self.overbooking not in OVERBOOKING:
            raise ValueError(f"TDPipeConfig.overbooking must be one of {OVERBOOKING} or None, "
                             f"got {self.overbooking!r}")
        if self.length_planning not in LENGTH_PLANNING:
            raise ValueError(f"TDPipeConfig.length_planning must be one of {LENGTH_PLANNING}, "
                             f"got {self.length_planning!r}")
        for name, group in (("policy", plugins.SCHEDULERS), ("admission", plugins.ADMISSION),
                            ("executor", plugins.EXECUTORS), ("decode_batcher", plugins.DECODE_BATCHERS),
                            ("attention_backend", plugins.ATTENTION_BACKENDS),
                            ("switch_policy", plugins.SWITCH_POLICIES)):
            value = getattr(self, name)
            if (value is None and name == "decode_batcher") or (value == AUTO and name == "attention_backend"):
                continue
            known = plugins.available(group)
            if value not in known:
                choices = (AUTO, *known) if name == "attention_backend" else tuple(known)
                raise ValueError(f"TDPipeConfig.{name} must be one of {choices}, got {value!r}")
        if self.prefill_packing is not None and self.prefill_packing not in PREFILL_PACKINGS:
            raise ValueError(f"TDPipeConfig.prefill_packing must be one of {PREFILL_PACKINGS} or None, "
                             f"got {self.prefill_packing!r}")
        for name, low in (("kv_threshold", 0.0), ("length_scale", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
                raise ValueError(f"TDPipeConfig.{name} must be a finite number > {low}, got {value!r}")
        if not isinstance(self.online_learning, bool):
            raise ValueError(f"TDPipeConfig.online_learning must be True or False, got {self.online_learning!r}")
        if self.predictor is not None and not isinstance(self.predictor, str) \
                and not callable(getattr(self.predictor, "predict", None)):
            raise ValueError(f"TDPipeConfig.predictor must be a name, a .npz path or an object with "
                             f"predict(prompts), got {self.predictor!r}")
        probe = self.length_probe
        if not (probe is None or probe is False or isinstance(probe, str)
                or (isinstance(getattr(probe, "layer", None), int) and callable(getattr(probe, "predict", None)))):
            raise ValueError(f"TDPipeConfig.length_probe must be None (the shipped one), False (none), a .npz path "
                             f"or a probe object with .layer and predict(states), got {probe!r}")
        if not isinstance(self.paper_rules, bool):
            raise ValueError(f"TDPipeConfig.paper_rules must be True or False, got {self.paper_rules!r}")
        if not isinstance(self.pack_weights, (bool, str)) or self.pack_weights not in (True, False, "auto"):
            raise ValueError(f"TDPipeConfig.pack_weights must be True, False or 'auto', got {self.pack_weights!r}")
        self.devices = parse_devices(self.devices)
        if self.devices is not None and len(self.devices) not in (1, self.num_stages):
            raise ValueError(f"TDPipeConfig.devices lists {len(self.devices)} devices for {self.num_stages} "
                             "stages: give one per stage, or one for all")
        if not isinstance(self.stealing, bool):
            raise ValueError(f"TDPipeConfig.stealing must be True or False, got {self.stealing!r}")

    @property
    def decode_batcher_name(self) -> str:
        """The decode batcher to build: ``decode_batcher``, or the one ``stealing``/``paper_rules`` imply."""
        if self.decode_batcher is not None:
            return self.decode_batcher
        if not self.stealing:
            return "static"
        return "steal-rows" if self.paper_rules else "steal-time"

    @property
    def prefill_packing_name(self) -> str:
        return self.prefill_packing or ("fcfs" if self.paper_rules else "first-fit")

    @property
    def overbooking_name(self) -> str:
        return self.overbooking or ("off" if self.paper_rules else "cost")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "TDPipeConfig":
        """Build from keyword arguments, rejecting unknown names instead of ignoring them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown TD-Pipe option(s) {unknown}; known options: {sorted(known)}")
        return cls(**kwargs)
