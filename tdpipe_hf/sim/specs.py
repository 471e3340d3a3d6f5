"""Hardware and model figures the cost model needs, as data, each with its source.

Peak FLOP/s are dense (no sparsity) FP16/BF16 tensor-core figures; bandwidths are the vendor's
peak. What the kernels actually reach is the cost model's ``Efficiency``, calibrated separately.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 1 << 30

# PCIe 4.0 x16: 16 GT/s x 16 lanes x 128b/130b = 31.5 GB/s per direction (PCI-SIG PCIe 4.0 spec).
PCIE4_X16 = 31.5 * GB


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: float
    peak_flops: float  # dense half-precision tensor FLOP/s
    memory_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per direction between two devices (PCIe here)
    link_latency: float  # seconds per point-to-point message / ring step
    source: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: what the FLOP and byte counts need, read from the HF config.json."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    dtype_bytes: int = 2
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections, the gated MLP (gate, up, down) and two RMSNorms."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + 2 * self.head_params  # embeddings + LM head

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


# NCCL-style point-to-point and ring-step latency over PCIe without NVLink: an assumption of
# ours (order of ten microseconds), not a figure from the paper.
PCIE_LATENCY = 10e-6

GPUS: dict[str, GPUSpec] = {
    "l20": GPUSpec("NVIDIA L20 48GB", 48 * GIB, 119.5e12, 864 * GB, PCIE4_X16, PCIE_LATENCY,
                   source="NVIDIA L20 product brief: 48 GB GDDR6, 864 GB/s, FP16/BF16 tensor 119.5 TFLOPS "
                          "(239 with sparsity), PCIe 4.0 x16"),
    "a100-pcie": GPUSpec("NVIDIA A100 80GB PCIe", 80 * GIB, 312e12, 1935 * GB, PCIE4_X16, PCIE_LATENCY,
                         source="NVIDIA A100 datasheet: 80 GB HBM2e, 1 935 GB/s (PCIe card), BF16 tensor "
                                "312 TFLOPS dense, PCIe 4.0 x16 (64 GB/s both directions)"),
}

MODELS: dict[str, ModelSpec] = {
    "llama2-13b": ModelSpec("Llama-2-13b-chat", 40, 5120, 13824, 40, 40, 32000,
                            source="meta-llama/Llama-2-13b-chat-hf config.json"),
    "qwen2.5-32b": ModelSpec("Qwen2.5-32B-Instruct", 64, 5120, 27648, 40, 8, 152064,
                             source="Qwen/Qwen2.5-32B-Instruct config.json"),
    "llama2-70b": ModelSpec("Llama-2-70b-chat", 80, 8192, 28672, 64, 8, 32000,
                            source="meta-llama/Llama-2-70b-chat-hf config.json"),
    "smollm2-135m": ModelSpec("SmolLM2-135M-Instruct", 30, 576, 1536, 9, 3, 49152, dtype_bytes=4,
                              source="HuggingFaceTB/SmolLM2-135M-Instruct config.json; float32 as this "
                                     "project runs it on CPU"),
}

# The paper's setups (arXiv 2506.10470, section 5): 4 GPUs of one kind on PCIe only.
PAPER_SETUPS = [("l20", "llama2-13b"), ("l20", "qwen2.5-32b"), ("l20", "llama2-70b"),
                ("a100-pcie", "llama2-13b"), ("a100-pcie", "qwen2.5-32b"), ("a100-pcie", "llama2-70b")]
