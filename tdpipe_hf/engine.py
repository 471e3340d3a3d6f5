"""Assembles one engine: stages + executor (runtime side), scheduler + policies (controller side)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import plugins
from .config import TDPipeConfig
from .controller import Controller, Request
from .controller.controller import RunStats
from .models import model_name
from .predictors import ConstantPredictor, check_predictor, load_predictor, load_probe, shipped_name_for
from .predictors.base import Trainable
from .protocols import RefinesAfterPrefill, SchedulerPolicy
from .runtime.kv_budget import available_memory, check_kv_fits, kv_blocks_on_devices
from .runtime.placement import stage_devices, torchrun_device
from .runtime.stage import build_stages
from .runtime.torchrun import launched_by_torchrun, start_torchrun, torchrun_places
from .scheduling import build_scheduler

logger = logging.getLogger("tdpipe_hf")


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
        if config.kv_blocks:
            check_kv_fits(model, stages, config.block_size, self.devices, config.kv_blocks, available)
        self.model_name = model_name(model)
        self.predictor_name = shipped_name_for(model)  # the shipped predictor's name, found by weights too
        self.predictor = self._make_predictor(config) if config.admission == "greedy" else None
        self.probe = load_probe(config.length_probe, self.predictor_name, model.config.num_hidden_layers,
                                config.predictor) if config.admission == "greedy" else None
        # a broken plugin fails here, naming itself, not mid-run
        self.request_capacity_tokens = self._scheduler().max_request_tokens
        self.executor = plugins.build(plugins.EXECUTORS, config.executor, self, model, stages)
        if self.torchrun:
            self.num_blocks = self.executor.num_blocks  # the smallest budget of all ranks
        self.last_stats: RunStats | None = None
        # held by whoever drives the pipeline (a run, or a Server with work in it): two controllers
        # interleaving micro-batches on one executor would read each other's results and KV blocks
        self.pipeline_lock = threading.Lock()

    def _make_predictor(self, config: TDPipeConfig):
        """The configured predictor; with none configured, the one shipped for this model, or the
        mean-length baseline (with a warning) for models nobody trained one for."""
        if config.predictor is not None and not isinstance(config.predictor, str):
            predictor = check_predictor(config.predictor, type(config.predictor).__name__)
        else:
            try:
                predictor = load_predictor(config.predictor, self.predictor_name)
            except ValueError:
                if config.predictor is not None:
                    raise
                logger.warning("no output-length predictor is shipped for %s: greedy prefill uses a constant "
                               "guess (train one with `tdpipe train-predictor`)", self.model_name)
                return ConstantPredictor()
        if isinstance(predictor, Trainable) and not predictor.is_trained:
            name = config.predictor if isinstance(config.predictor, str) else type(predictor).__name__
            raise ValueError(f"predictor {name!r} is not trained for {self.model_name}: pass a trained one (an "
                             f"object after fit(prompts, lengths), or a .npz file from `tdpipe train-predictor`), "
                             f"or another predictor ({', '.join(plugins.available(plugins.PREDICTORS))})")
        return predictor

    @property
    def in_flight(self) -> int:
        """Micro-batches kept in the pipeline (TD-Pipe keeps one per stage)."""
        return self.config.micro_batches or self.config.num_stages

    def _scheduler(self) -> SchedulerPolicy:
        """A fresh scheduler for one run: the configured policy's parts."""
        scheduler = build_scheduler(self.config, self.num_blocks, self.in_flight, self.predictor)
        if self.probe is not None and isinstance(scheduler.admission, RefinesAfterPrefill):
            scheduler.admission.use_probe(self.probe)
        return scheduler

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
            if request.max_tokens > self.request_capacity_tokens:
                pooled = "" if self.request_capacity_tokens == self.kv_capacity_tokens else \
                    f", {self.request_capacity_tokens} of them for one request under policy {self.config.policy!r}"
                raise ValueError(
                    f"request {index} needs up to {request.max_tokens} KV tokens (prompt {len(request.prompt_ids)} "
                    f"+ max_new_tokens {request.max_new_tokens}) but the KV budget holds {self.kv_capacity_tokens} "
                    f"({self.num_blocks} blocks of {self.config.block_size}{pooled}); raise kv_blocks/kv_cache_bytes "
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
            if not self.pipeline_lock.acquire(blocking=False):
                logger.info("tdpipe_hf: a server is running requests on this model; this run waits for it to be idle")
                self.pipeline_lock.acquire()
            try:
                self.last_stats = controller.run(requests, lookahead)
            finally:
                self.pipeline_lock.release()
        finally:
            bar.close()
        return self.last_stats

    def controller(self, on_token: Callable[[Request, int], None] | None = None,
                   on_finish: Callable[[Request], None] | None = None) -> Controller:
        """A controller with a fresh scheduler of the configured policy over this engine's executor."""
        return Controller(self.executor, self._scheduler(), on_token=on_token, on_finish=on_finish,
                          max_in_flight=self.in_flight)

    def close(self) -> None:
        self.executor.close()
        if any(device.type == "cuda" for device in self.devices.values()):
            torch.cuda.empty_cache()  # what the stages held counts as free for the next engine's budget
