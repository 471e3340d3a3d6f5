"""Build a run's scheduler from a ``TDPipeConfig``: the configured policy's parts, with no model.

The engine and the simulator both call this, so a simulated run schedules with exactly the code
a real run does.
"""

from __future__ import annotations

from . import plugins
from .config import TDPipeConfig
from .controller import BlockManager, Scheduler
from .policies import AdmitWhileFits, GreedyPrefill, ReadyPoolBatcher, StaticBatcher
from .policies.baselines import AdmitWholeGroup, DrainSwitch, HybridScheduler
from .policies.switch import CheckedSwitch


def build_switch(config: TDPipeConfig, switch_cls: type | None = None) -> CheckedSwitch:
    """The configured switch policy (an entry-point plugin), guarded so its failures name it."""
    cls = switch_cls or plugins.load(plugins.SWITCH_POLICIES, config.switch_policy)
    try:
        policy = cls()
    except Exception as exc:
        raise TypeError(f"switch policy {config.switch_policy!r} could not be built with no arguments: "
                        f"{exc}") from exc
    if callable(getattr(policy, "configure", None)):
        policy.configure(config)
    return CheckedSwitch(policy, config.switch_policy)


def build_admission(config: TDPipeConfig, predictor=None):
    """Greedy prefill over ``predictor``, or the admit-while-it-fits rule."""
    if config.admission == "fits":
        return AdmitWhileFits()
    return GreedyPrefill(predictor, config.kv_threshold, config.length_scale, online=config.online_learning,
                         name=config.predictor if isinstance(config.predictor, str) else "",
                         planning=config.length_planning)


def build_scheduler(config: TDPipeConfig, num_blocks: int, in_flight: int, predictor=None,
                    switch_cls: type | None = None) -> Scheduler:
    """A fresh scheduler for one run over ``num_blocks`` KV blocks and ``in_flight`` micro-batches."""
    blocks = BlockManager(num_blocks, config.block_size)
    common = dict(prefill_chunk_tokens=config.prefill_chunk_tokens, max_num_seqs=config.max_num_seqs)
    if config.policy == "hybrid":
        return HybridScheduler(blocks, in_flight, AdmitWhileFits(), None, None, **common)
    if config.policy == "naive":
        return Scheduler(blocks, in_flight, AdmitWholeGroup(), StaticBatcher(), DrainSwitch(), **common)
    if config.stealing:
        batcher = ReadyPoolBatcher(balance="rows" if config.paper_rules else "time")
    else:
        batcher = StaticBatcher()
    return Scheduler(blocks, in_flight, build_admission(config, predictor), batcher,
                     build_switch(config, switch_cls), prefill_packing="fcfs" if config.paper_rules else "first-fit",
                     **common)
