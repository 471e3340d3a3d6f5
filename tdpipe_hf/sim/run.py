"""One simulated run: a setup (model, GPU, count), a policy, a workload -> throughput and bubbles.

Every policy is the engine's own scheduler, built by ``build_scheduler`` from a ``TDPipeConfig``;
only the executor is simulated. Pipeline policies run one stage per GPU with an even layer split
and one micro-batch in flight per stage; tensor-parallel baselines run the whole model as one
"stage" whose time is the TP cost, one batch at a time.

Baselines as in the paper: TP and PP, each with separate batches (vLLM's default scheduler:
prefill whenever a waiting request fits, otherwise decode; here the phase machine with the
admit-while-it-fits rule and a switch that leaves decode as soon as a request finished) or hybrid
batches (chunked prefill mixed with decodes). Every micro-batch holds at most 256 sequences,
vLLM's default ``max_num_seqs`` per (virtual) engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..config import TDPipeConfig
from ..controller import Controller, Status
from ..metrics import bubble_causes, bubble_ratios, mean_kv_utilisation
from ..predictors import ConstantPredictor, OraclePredictor
from ..predictors.oracle import NoisyOraclePredictor
from ..scheduling import build_scheduler
from ..variants import VARIANTS, variant
from .cost import EFFICIENCY, CostModel, Efficiency, SeqShape, even_split
from .executor import SimExecutor
from .specs import GPUS, MODELS, GPUSpec, ModelSpec
from .workload import SimRequest, to_requests

MAX_SEQS_PER_BATCH = 256

# vLLM v0's host work per engine step, as vLLM's own RFC for multi-step scheduling measured it
# (vllm-project/vllm#6854, July 2024, vLLM 0.5): the GPU "is often idle, waiting for CPU
# operations (5-13ms of GPU bubble)" per decode step (sampled-token transfer, pythonising the
# outputs, preparing the next step's inputs, the scheduler); the trace it shows (Llama-3-8B, one
# H100) has about 4 ms of GPU idle per step. Named values for ``--vllm-step-cost``.
VLLM_STEP_COSTS = {"rfc6854": 0.004, "rfc6854-high": 0.013}


POLICIES = VARIANTS  # every named variant runs in the simulator


@dataclass
class SimSetup:
    model: ModelSpec
    gpu: GPUSpec
    num_gpus: int
    efficiency: Efficiency = Efficiency()
    block_size: int = 16
    dispatch_overhead: float = 0.0  # fixed seconds before each micro-batch enters stage 0
    measure_host: bool = False  # put the real scheduler's measured wall time on the critical path
    # seconds of host work per step on every stage, serial with its compute, for the baselines that
    # stand for vLLM v0 (``Variant.vllm_v0_host``); see VLLM_V0_STEP_COST for the source
    vllm_step_cost: float = 0.0
    kv_blocks: int | None = None  # override the budget derived from memory
    max_seqs_per_batch: int = MAX_SEQS_PER_BATCH

    @classmethod
    def named(cls, model: str, gpu: str, num_gpus: int, **kwargs) -> "SimSetup":
        try:
            kwargs.setdefault("efficiency", EFFICIENCY.get(gpu, Efficiency()))
            return cls(MODELS[model], GPUS[gpu], num_gpus, **kwargs)
        except KeyError as exc:
            raise ValueError(f"unknown model or GPU {exc}; models: {', '.join(MODELS)}; GPUs: {', '.join(GPUS)}") from None

    @property
    def cost(self) -> CostModel:
        return CostModel(self.model, self.gpu, self.efficiency)


def make_executor(setup: SimSetup, parallel: str, stage_host: float = 0.0) -> tuple[SimExecutor, int]:
    """The simulated executor for ``parallel`` and its KV budget in blocks; every stage spends
    ``stage_host`` seconds of host work before each micro-batch."""
    cost = setup.cost
    if parallel == "tp":
        blocks = cost.kv_blocks([setup.model.num_layers], setup.block_size, devices_per_stage=setup.num_gpus)
        executor = SimExecutor(1, lambda seqs: [cost.tp_time(seqs, setup.num_gpus)],
                               dispatch_overhead=setup.dispatch_overhead, measure_host=setup.measure_host,
                               stage_host=stage_host)
    else:
        layers = even_split(setup.model.num_layers, setup.num_gpus)
        blocks = cost.kv_blocks(layers, setup.block_size)

        def stage_times(seqs: list[SeqShape]) -> list[float]:
            per_layer = cost.layers_time(seqs, 1)
            times = [n * per_layer for n in layers]
            times[-1] += cost.head_time(seqs) + setup.efficiency.step_overhead
            return times

        executor = SimExecutor(len(layers), stage_times, cost.transfer_time, setup.dispatch_overhead,
                               setup.measure_host, stage_host=stage_host)
    return executor, setup.kv_blocks or blocks


def _predictor(kind: str | None, requests, workload: list[SimRequest], error: tuple[float, float] | None = None):
    prompts, lengths = [r.prompt_ids for r in requests], [w.output_len for w in workload]
    if kind == "realistic":
        return NoisyOraclePredictor(*(error or NoisyOraclePredictor.REALISTIC)).fit(prompts, lengths)
    if kind == "oracle":
        return OraclePredictor().fit(prompts, lengths)
    if kind == "constant":
        return ConstantPredictor(float(np.mean([w.output_len for w in workload])))
    return None


def simulate(setup: SimSetup, policy: str, workload: list[SimRequest], chunk_tokens: int | None = None,
             keep_timeline: bool = False, predictor=None, prediction_error: tuple[float, float] | None = None,
             stage_host: float | None = None) -> dict:
    """Run ``workload`` under ``policy``; a result row (virtual seconds, tokens/s, bubbles, ...).
    ``predictor`` replaces the policy's length predictor (e.g. a learned one, on real prompts);
    ``prediction_error`` = (bias, sigma) of the ``realistic`` one's log-normal error;
    ``stage_host`` the per-step host work on every stage (default: ``setup.vllm_step_cost`` for
    the baselines that stand for vLLM v0, none for the others)."""
    spec = variant(policy)
    if stage_host is None:
        stage_host = setup.vllm_step_cost if spec.vllm_v0_host else 0.0
    executor, num_blocks = make_executor(setup, spec.parallel, stage_host)
    if num_blocks < 1:
        raise ValueError(f"{setup.model.name} does not fit on {setup.num_gpus} x {setup.gpu.name} "
                         f"({spec.parallel}): no memory left for the KV cache")
    in_flight = executor.num_stages
    config = TDPipeConfig(num_stages=in_flight, block_size=setup.block_size, kv_blocks=num_blocks,
                          max_num_seqs=setup.max_seqs_per_batch * in_flight,
                          prefill_chunk_tokens=chunk_tokens or spec.sim_chunk_tokens, **spec.options)
    requests = to_requests(workload)
    for request, item in zip(requests, workload):
        executor.expect(request.request_id, item.prompt_len, item.output_len)
    if predictor is None or spec.sim_predictor is None:
        predictor = _predictor(spec.sim_predictor, requests, workload, prediction_error)
    scheduler = build_scheduler(config, num_blocks, in_flight, predictor)
    capacity = scheduler.max_request_tokens
    too_long = [r.request_id for r in requests if r.max_tokens > capacity]
    if too_long:
        raise ValueError(f"requests {too_long[:5]} need more KV than one request can hold under {policy} "
                         f"({capacity} tokens)")
    controller = Controller(executor, scheduler, max_in_flight=in_flight, clock=executor.clock)
    wall = time.perf_counter()
    stats = controller.run(requests)
    wall = time.perf_counter() - wall
    finished = sum(r.status is Status.FINISHED and len(r.output_ids) == w.output_len
                   for r, w in zip(requests, workload))
    bubbles = bubble_ratios(stats.timeline)
    mean = lambda scope: float(np.mean(list(bubbles[scope].values()))) if scope in bubbles else None  # noqa: E731
    row = {
        "policy": policy, "parallel": spec.parallel,
        "prediction_error": (list(prediction_error or NoisyOraclePredictor.REALISTIC)
                             if spec.sim_predictor == "realistic" else None), "model": setup.model.name, "gpu": setup.gpu.name,
        "gpus": setup.num_gpus, "requests": len(requests), "finished": finished,
        "generated_tokens": stats.generated_tokens, "seconds": executor.now,
        "tokens_per_s": stats.generated_tokens / executor.now if executor.now > 0 else 0.0,
        "bubble_ratio": mean("all"), "prefill_bubble": mean("prefill"), "decode_bubble": mean("decode"),
        "bubble_per_stage": bubbles.get("all", {}), "bubble_causes": bubble_causes(stats.timeline),
        "preemptions": stats.preemptions,
        "phase_switches": stats.phase_switches, "kv_blocks": num_blocks,
        "kv_utilisation": mean_kv_utilisation(stats.kv_used, num_blocks),
        "micro_batches": dict(stats.micro_batches), "sim_wall_s": wall,
        "stage_host_s": stage_host,
        "host_ms_per_micro_batch": (1e3 * executor.host_seconds / max(1, sum(stats.micro_batches.values()))
                                    if setup.measure_host else None),
    }
    if keep_timeline:
        row["timeline"] = stats.timeline
    return row
