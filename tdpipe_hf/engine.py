"""Assembles one engine: stages + executor (runtime side), scheduler + policies (controller side)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import plugins
from .config import TDPipeConfig
from .controller import Controller, Request, Scheduler
from .controller.controller import RunStats
from .models import model_name
from .predictors import ConstantPredictor, check_predictor, load_predictor
from .runtime.distributed import (DistributedExecutor, join_torchrun_pipeline, launched_by_torchrun, start_torchrun,
                                  torchrun_places)
from .runtime.local import LocalExecutor
from .runtime.placement import stage_devices, torchrun_device
from .runtime.stage import Stage, StageSetup, blocks_for_budget, build_stages, kv_geometry
from .scheduling import build_scheduler, build_switch

DEFAULT_CPU_KV_BYTES = 2 << 30
logger = logging.getLogger("tdpipe_hf")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_bytes(device: torch.device, arriving: int = 0, available: int | None = None) -> int:
    """Half the free GPU memory, or a fifth of free host memory capped at 2 GiB on CPU, counting
    as taken the ``arriving`` bytes of weights about to be placed there (``available``: the free
    memory if already measured)."""
    free = max(0, (available_memory(device) if available is None else available) - arriving)
    return free // 2 if device.type == "cuda" else min(free // 5, DEFAULT_CPU_KV_BYTES)


def kv_blocks_on_devices(model, stages: list[Stage], block_size: int, devices: dict[int, torch.device],
                         budget_bytes: int | None = None, available: dict[torch.device, int] | None = None) -> int:
    """The KV blocks the budget holds: ``budget_bytes`` for the whole model, or else each device's
    default share of its free memory (``devices``: stage index -> device, every stage that will
    run on this machine; ``available``: free bytes per device, where already measured) for the
    layers of the stages it will hold."""
    if budget_bytes is not None:
        budgets = {None: (budget_bytes, None)}
    else:
        layers_on: dict[torch.device, int] = {}
        arriving: dict[torch.device, int] = {}
        for index, device in devices.items():
            layers_on[device] = layers_on.get(device, 0) + len(stages[index].layers)
            arriving[device] = arriving.get(device, 0) + stages[index].bytes_to_place(device)
        budgets = {device: (default_kv_bytes(device, arriving[device], (available or {}).get(device)), layers)
                   for device, layers in layers_on.items()}
    blocks = {device: blocks_for_budget(model, budget, block_size, layers)
              for device, (budget, layers) in budgets.items()}
    device, fewest = min(blocks.items(), key=lambda item: item[1])
    if fewest < 1:
        where = "" if device is None else f" on {device}"
        raise ValueError(f"KV budget of {budgets[device][0]} bytes{where} is smaller than one block of "
                         f"{block_size} tokens")
    return fewest


class TDPipeEngine:
    def __init__(self, model, config: TDPipeConfig):
        self.config = config
        self.torchrun = config.executor == "distributed" and launched_by_torchrun()
        model_device = next(model.parameters()).device
        stages = build_stages(model, config.num_stages)
        available = None
        if self.torchrun:  # this node's stages size the budget; the ranks agree on the smallest when they join
            self.threads = start_torchrun(config.num_stages, config.threads_per_stage)
            device = torchrun_device(model_device, dist.get_rank(), config.devices)
            self.places = torchrun_places(device, available_memory(device))
            host = self.places[dist.get_rank()][0]
            self.devices = {rank: device for rank, (where, device, _) in enumerate(self.places) if where == host}
            available = {device: free for where, device, free in self.places if where == host}
        else:
            self.devices = dict(enumerate(stage_devices(model_device, config.num_stages, config.devices)))
        self.num_blocks = config.kv_blocks or kv_blocks_on_devices(model, stages, config.block_size, self.devices,
                                                                   config.kv_cache_bytes, available)
        self.switch_cls = plugins.load(plugins.SWITCH_POLICIES, config.switch_policy)
        build_switch(config, self.switch_cls)  # a broken plugin fails here, naming itself, not mid-run
        self.model_name = model_name(model)
        self.predictor = self._make_predictor(config) if config.admission == "greedy" else None
        self.executor = self._make_executor(model, stages, config)
        self.last_stats: RunStats | None = None

    def _make_predictor(self, config: TDPipeConfig):
        """The configured predictor; with none configured, the one shipped for this model, or the
        mean-length baseline (with a warning) for models nobody trained one for."""
        if config.predictor is not None and not isinstance(config.predictor, str):
            return check_predictor(config.predictor, type(config.predictor).__name__)
        try:
            return load_predictor(config.predictor, self.model_name)
        except ValueError:
            if config.predictor is not None:
                raise
            logger.warning("no output-length predictor is shipped for %s: greedy prefill uses a constant "
                           "guess (train one with `tdpipe train-predictor`)", self.model_name)
            return ConstantPredictor()

    def _scheduler(self, in_flight: int) -> Scheduler:
        """A fresh scheduler for one run: the configured policy's parts."""
        return build_scheduler(self.config, self.num_blocks, in_flight, self.predictor, self.switch_cls)

    def _make_executor(self, model, stages: list[Stage], config: TDPipeConfig):
        setup = StageSetup(self.num_blocks, config.block_size, *kv_geometry(model), pack_weights=config.pack_weights)
        if config.executor == "local":
            return LocalExecutor(stages, setup, list(self.devices.values()))
        if self.torchrun:  # every rank splits the same way without measuring
            executor = join_torchrun_pipeline(stages, setup, self.threads, self.places)
            self.num_blocks = executor.num_blocks  # the smallest budget of all ranks
            return executor
        # workers place their stage, apply the setup and time it; a measured split rebuilds the stages
        return DistributedExecutor(stages, setup, config.threads_per_stage,
                                   resplit=lambda costs: build_stages(model, config.num_stages, costs),
                                   devices=list(self.devices.values()))

    @property
    def stage_layers(self) -> list[range]:
        """The decoder layers of each stage (a distributed executor may re-split on first start)."""
        return [stage.index_range for stage in self.executor.stages]

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.config.block_size

    def check_fits(self, requests: list[Request]) -> None:
        """Every request must fit in the whole KV budget on its own, or it could never finish."""
        for index, request in enumerate(requests):
            if request.max_tokens > self.kv_capacity_tokens:
                raise ValueError(
                    f"request {index} needs up to {request.max_tokens} KV tokens (prompt {len(request.prompt_ids)} "
                    f"+ max_new_tokens {request.max_new_tokens}) but the KV budget holds {self.kv_capacity_tokens} "
                    f"({self.num_blocks} blocks of {self.config.block_size}); raise kv_blocks/kv_cache_bytes "
                    f"or lower max_new_tokens")

    def run(self, requests: list[Request], on_token: Callable[[Request, int], None] | None = None,
            progress: bool = False, description: str = "tdpipe") -> RunStats:
        self.check_fits(requests)
        return self.run_stream(requests, on_token=on_token, progress=progress, total=len(requests),
                               description=description)

    def run_stream(self, requests: Iterable[Request], on_token: Callable[[Request, int], None] | None = None,
                   on_finish: Callable[[Request], None] | None = None, progress: bool = False,
                   total: int | None = None, description: str = "tdpipe", lookahead: int | None = None) -> RunStats:
        """Run a possibly endless stream of requests (already checked to fit), ``on_finish``
        called as each one finishes; at most ``lookahead`` wait in memory at once."""
        bar = tqdm(total=total, desc=description, unit="req", disable=not progress)
        start = time.perf_counter()

        def finished(request: Request) -> None:
            if on_finish is not None:
                on_finish(request)
            bar.update(1)
            if progress:
                elapsed = time.perf_counter() - start
                bar.set_postfix(tok_s=f"{controller.stats.generated_tokens / max(elapsed, 1e-9):.1f}")

        controller = self.controller(on_token=on_token, on_finish=finished)
        try:
            self.last_stats = controller.run(requests, lookahead)
        finally:
            bar.close()
        return self.last_stats

    def controller(self, on_token: Callable[[Request, int], None] | None = None,
                   on_finish: Callable[[Request], None] | None = None) -> Controller:
        """A controller with a fresh scheduler of the configured policy over this engine's executor."""
        in_flight = self.config.micro_batches or self.config.num_stages
        return Controller(self.executor, self._scheduler(in_flight), on_token=on_token, on_finish=on_finish,
                          max_in_flight=in_flight)

    def close(self) -> None:
        self.executor.close()
        if any(device.type == "cuda" for device in self.devices.values()):
            torch.cuda.empty_cache()  # what the stages held counts as free for the next engine's budget
