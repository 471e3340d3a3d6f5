"""Roofline stage times: each part of a forward pass takes the longer of its FLOPs at the GPU's
compute rate and its bytes at its memory rate, both scaled by measured efficiencies.

Per decoder layer and micro-batch of n new tokens:
- linear layers: 2 n P FLOPs against P weights read once (P = layer parameters);
- attention: 4 q (c - (q-1)/2) x heads x head_dim FLOPs per sequence of q new tokens ending at
  context c (causal), against the sequence's whole KV read (c tokens);
- a fixed overhead per layer (kernel launches, norms, rotary, small ops).
The LM head runs for sampled rows only (vLLM and this engine compute logits for the last token
of each sequence). Tensor parallelism splits FLOPs, weights and KV over G devices and adds two
ring all-reduces of the activations per layer; pipeline stages add one activation transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .specs import GPUSpec, ModelSpec


@dataclass(frozen=True)
class Efficiency:
    """Shares of the peak rates kernels reach, and per-layer / per-step fixed costs.

    ``link`` is an assumption (NCCL over PCIe without NVLink reaching about 70 % of the link's
    rate). The others are fitted per GPU (``EFFICIENCY``).
    """

    compute: float = 0.85
    memory: float = 0.9
    layer_overhead: float = 0.0  # seconds per decoder layer per forward pass
    step_overhead: float = 0.0  # seconds per forward pass (launch, sampling, scheduling)
    link: float = 0.7


@dataclass(frozen=True)
class SeqShape:
    """One sequence's share of a micro-batch: ``new`` tokens computed, ``context`` after them."""

    new: int
    context: int
    sampled: bool = True


class CostModel:
    def __init__(self, model: ModelSpec, gpu: GPUSpec, efficiency: Efficiency = Efficiency()):
        self.model, self.gpu, self.eff = model, gpu, efficiency
        self.flops_rate = gpu.peak_flops * efficiency.compute
        self.bytes_rate = gpu.memory_bandwidth * efficiency.memory

    def _roof(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_rate, nbytes / self.bytes_rate)

    def layers_time(self, seqs: list[SeqShape], num_layers: int, shards: int = 1) -> float:
        """``num_layers`` decoder layers on one device holding 1/``shards`` of each."""
        m = self.model
        tokens = sum(s.new for s in seqs)
        linear = self._roof(2 * tokens * m.layer_params / shards, m.layer_params * m.dtype_bytes / shards)
        pairs = sum(s.new * (s.context - (s.new - 1) / 2) for s in seqs)
        kv_read = sum(s.context for s in seqs) * m.kv_bytes_per_token_layer / shards
        attention = self._roof(4 * pairs * m.num_heads * m.head_dim / shards, kv_read)
        return num_layers * (linear + attention + self.eff.layer_overhead)

    def head_time(self, seqs: list[SeqShape], shards: int = 1) -> float:
        m = self.model
        rows = sum(1 for s in seqs if s.sampled)
        return self._roof(2 * rows * m.head_params / shards, m.head_params * m.dtype_bytes / shards)

    def stage_time(self, seqs: list[SeqShape], num_layers: int, last: bool) -> float:
        """One pipeline stage: its layers, plus the LM head on the last stage."""
        return self.layers_time(seqs, num_layers) + (self.head_time(seqs) if last else 0.0)

    def transfer_time(self, tokens: int) -> float:
        """Activations of ``tokens`` tokens from one stage to the next over the link."""
        nbytes = tokens * self.model.hidden * self.model.dtype_bytes
        return self.gpu.link_latency + nbytes / (self.gpu.link_bandwidth * self.eff.link)

    def allreduce_time(self, tokens: int, devices: int) -> float:
        """Ring all-reduce of the activations: 2 (G-1) steps, each moving 1/G of them."""
        if devices == 1:
            return 0.0
        nbytes = tokens * self.model.hidden * self.model.dtype_bytes
        steps = 2 * (devices - 1)
        return steps * (self.gpu.link_latency + nbytes / devices / (self.gpu.link_bandwidth * self.eff.link))

    def tp_time(self, seqs: list[SeqShape], devices: int) -> float:
        """A whole forward pass tensor-parallel over ``devices``: every device runs every layer on
        1/G of the heads and MLP columns, then two all-reduces per layer (attention and MLP)."""
        tokens = sum(s.new for s in seqs)
        compute = self.layers_time(seqs, self.model.num_layers, devices) + self.head_time(seqs, devices)
        return compute + 2 * self.model.num_layers * self.allreduce_time(tokens, devices) + self.eff.step_overhead

    def pipeline_times(self, seqs: list[SeqShape], layers: list[int]) -> list[float]:
        """Each stage's compute time for one micro-batch (``layers`` per stage)."""
        last = len(layers) - 1
        times = [self.stage_time(seqs, n, i == last) for i, n in enumerate(layers)]
        times[last] += self.eff.step_overhead
        return times

    # ---- memory -------------------------------------------------------------------------------
    def kv_blocks(self, layers: list[int], block_size: int, devices_per_stage: int = 1,
                  memory_utilisation: float = 0.9, reserve_bytes: float = 1 << 30) -> int:
        """KV blocks every stage can hold (the smallest), vLLM style: ``memory_utilisation`` of the
        device minus the stage's weights and an activation reserve, over the stage's KV per block."""
        m = self.model
        blocks = []
        for i, n in enumerate(layers):
            weights = n * m.layer_params + (m.head_params if i == 0 else 0) + (m.head_params if i == len(layers) - 1 else 0)
            weights *= m.dtype_bytes / devices_per_stage
            free = self.gpu.memory_bytes * memory_utilisation - weights - reserve_bytes
            per_block = block_size * n * m.kv_bytes_per_token_layer / devices_per_stage
            blocks.append(int(free // per_block))
        return min(blocks)


# L20: least-squares fit (log error, 40 log-spaced token counts from 1 to 2048) to the authors'
# profiled forward times of Llama-2-13B and Qwen2.5-32B (MLSysU/TD-Pipe, profiler-results/*.csv);
# `python benchmarks/calibrate_sim.py --l20 DIR` refits and prints the error. The fitted memory
# efficiency sits at its bound (1.0) and the per-layer cost absorbs the small-batch GEMM
# inefficiency the tables show (17-128 tokens take 25 % longer than 1 token).
# A100: no measured table; same efficiencies, the per-layer cost scaled by the bandwidth ratio
# (864 / 1935), an assumption.
EFFICIENCY = {
    "l20": Efficiency(compute=0.846, memory=1.0, layer_overhead=327e-6),
    "a100-pcie": Efficiency(compute=0.846, memory=1.0, layer_overhead=327e-6 * 864 / 1935),
}


def even_split(num_layers: int, num_stages: int) -> list[int]:
    """Layers per stage, as even as possible (the paper's code splits evenly)."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]
