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
from .controller.kv import SplitBlocks
from .controller.scheduler import Scheduler
from .controller.vllm_v0 import VllmV0Scheduler
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
                     max_num_seqs=config.max_num_seqs, prefill_packing=config.prefill_packing_name,
                     decode_fill_tokens=config.decode_fill_tokens, plan_ahead=config.plan_ahead)


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


def vllm_v0_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int, predictor=None) -> VllmV0Scheduler:
    """vLLM v0's pipeline: ``num_stages`` virtual engines, each with ``1 / num_stages`` of the KV
    blocks and of ``max_num_seqs``, requests pinned to the least loaded, separate batches."""
    split = SplitBlocks(blocks.num_blocks, blocks.block_size, num_stages)
    return VllmV0Scheduler(split, num_stages, build_admission(config, name="fits"),
                           prefill_chunk_tokens=config.prefill_chunk_tokens,
                           max_num_seqs=max(1, config.max_num_seqs // num_stages))


def vllm_v1_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int, predictor=None) -> HybridScheduler:
    """vLLM v1's pipeline: one scheduler and KV pool, chunked prefill, any request not in flight
    may join the next micro-batch (which may then hold all ``max_num_seqs``)."""
    return HybridScheduler(blocks, num_stages, build_admission(config, name="fits"), pinned_lanes=False,
                           prefill_chunk_tokens=config.prefill_chunk_tokens, max_num_seqs=config.max_num_seqs)


def vllm_v1_capped_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int,
                             predictor=None) -> HybridScheduler:
    """``vllm-v1-pp`` with vLLM's fix (PR #28286): at most ``max_num_seqs / pp`` sequences per micro-batch."""
    return HybridScheduler(blocks, num_stages, build_admission(config, name="fits"), pinned_lanes=False,
                           max_batch_seqs=max(1, config.max_num_seqs // num_stages),
                           prefill_chunk_tokens=config.prefill_chunk_tokens, max_num_seqs=config.max_num_seqs)


def throttled_hybrid_scheduler(config: TDPipeConfig, blocks: BlockManager, num_stages: int,
                               predictor=None) -> HybridScheduler:
    """One KV pool, any request not in flight may join, and each micro-batch throttled to 1 / pp
    of the decodes and of the pending prompt tokens (see ``controller/hybrid.py``)."""
    return HybridScheduler(blocks, num_stages, build_admission(config, name="fits"), pinned_lanes=False,
                           throttle=True, prefill_chunk_tokens=config.prefill_chunk_tokens,
                           max_num_seqs=config.max_num_seqs)


def build_scheduler(config: TDPipeConfig, num_blocks: int, in_flight: int, predictor=None):
    """A fresh scheduler of ``config.policy`` for one run over ``num_blocks`` KV blocks and
    ``in_flight`` micro-batches."""
    blocks = BlockManager(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
    return plugins.build(plugins.SCHEDULERS, config.policy, config, blocks, in_flight, predictor)
