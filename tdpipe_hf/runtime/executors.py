"""The built-in executor factories, registered in pyproject's ``tdpipe_hf.executors`` group.

An executor factory is called as ``factory(engine, model, stages)`` once the engine has sized the
KV budget (``engine.num_blocks``) and chosen the stages' devices (``engine.devices``); it returns
an object with the ``tdpipe_hf.plan.Executor`` protocol. One file per executor: ``local.py``,
``spawn.py`` (one process per stage), ``torchrun.py`` (launched ranks), ``sim/executor.py``.
"""

from __future__ import annotations

from .kv_budget import kv_geometry
from .local import LocalExecutor
from .spawn import DistributedExecutor
from .stage import StageSetup, build_stages
from .torchrun import join_torchrun_pipeline, launched_by_torchrun


def stage_setup(engine, model) -> StageSetup:
    config = engine.config
    return StageSetup(engine.num_blocks, config.block_size, *kv_geometry(model), pack_weights=config.pack_weights,
                      attention=config.attention_backend, plan_ahead=config.plan_ahead)


def local_executor(engine, model, stages) -> LocalExecutor:
    """Every stage in this process, one after the other."""
    return LocalExecutor(stages, stage_setup(engine, model), list(engine.devices.values()))


def distributed_executor(engine, model, stages):
    """One process per stage: joins the launched ranks under torchrun, else spawns the workers.

    Spawned workers time their stages at the first start and the pipeline is re-split once when
    that pays; torchrun ranks all split the same way without measuring."""
    config = engine.config
    if launched_by_torchrun():
        return join_torchrun_pipeline(stages, stage_setup(engine, model), engine.threads, engine.places)
    return DistributedExecutor(stages, stage_setup(engine, model), config.threads_per_stage,
                               resplit=lambda costs: build_stages(model, config.num_stages, costs),
                               devices=list(engine.devices.values()))
