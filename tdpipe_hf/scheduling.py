"""Build a run's scheduler from a ``TDPipeConfig``: every part through the registry, no model.

The engine and the simulator both call ``build_scheduler``, so a simulated run schedules with
exactly the code a real run does. The three built-in scheduler factories below are registered in
pyproject's ``tdpipe_hf.schedulers`` group, the way a third party registers its own.
"""

from __future__ import annotations

from . import plugins
from .config import TDPipeConfig
from .controller import BlockManager
from .controller.hybrid import HybridScheduler
from .controller.scheduler import Scheduler
from .policies.switch import CheckedSwitch
from .protocols import Configurable


def build_switch(config: TDPipeConfig, name: str | None = None) -> CheckedSwitch:
    """The switch policy ``name`` (default: the configured one), configured and guarded so that
    its failures and bad answers name it."""
    name = name or config.switch_policy
    policy = plugins.build(plugins.SWITCH_POLICIES, name)
    if isinstance(policy, Configurable):
        policy.configure(config)
    return CheckedSwitch(policy, name)


def build_admission(config: TDPipeConfig, predictor=None, name: str | None = None):
    return plugins.build(plugins.ADMISSION, name or config.admission, config, predictor)


def build_batcher(config: TDPipeConfig, name: str | None = None):
    return plugins.build(plugins.DECODE_BATCHERS, name or config.decode_batcher_name, config)


def tdpipe_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int, predictor=None) -> Scheduler:
    """TD-Pipe's phase machine with the configured admission, decode batcher and switch policy."""
    return Scheduler(blocks, num_stages, build_admission(config, predictor), build_batcher(config),
                     build_switch(config), prefill_chunk_tokens=config.prefill_chunk_tokens,
                     max_num_seqs=config.max_num_seqs, prefill_packing=config.prefill_packing_name)


def naive_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int, predictor=None) -> Scheduler:
    """Static batching in the same phase machine: whole groups, fixed lanes, drain before refilling."""
    return Scheduler(blocks, num_stages, build_admission(config, name="whole-group"),
                     build_batcher(config, "static"), build_switch(config, "drain"),
                     prefill_chunk_tokens=config.prefill_chunk_tokens, max_num_seqs=config.max_num_seqs,
                     prefill_packing=config.prefill_packing_name)


def hybrid_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int, predictor=None) -> HybridScheduler:
    """vLLM-style hybrid pipeline batches, admitting while the prompts fit."""
    return HybridScheduler(blocks, num_stages, build_admission(config, name="fits"),
                           prefill_chunk_tokens=config.prefill_chunk_tokens, max_num_seqs=config.max_num_seqs)


def build_scheduler(config: TDPipeConfig, num_blocks: int, in_flight: int, predictor=None):
    """A fresh scheduler of ``config.policy`` for one run over ``num_blocks`` KV blocks and
    ``in_flight`` micro-batches."""
    blocks = BlockManager(num_blocks, config.block_size)
    return plugins.build(plugins.SCHEDULERS, config.policy, config, blocks, in_flight, predictor)
