"""Offline-throughput workloads for the simulator: requests with prompt and output lengths.

The paper (arXiv 2506.10470, section 5) samples 5 000 ShareGPT V3 conversations with prompts
<= 1024 tokens, regenerates the answers with the served model, and submits all at once. We do
not have that set here, so ``sharegpt_like`` draws log-normal lengths whose means are ShareGPT's
published ones: 161.31 input and 337.99 output tokens on average (Kwon et al., "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023, section 6.1 /
figure 11). The spreads (sigma 1.0 for inputs, 0.9 for outputs) are our assumption; lengths
outside the paper's limits (prompt <= 1024, prompt + output <= 2048) are drawn again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..controller import Request
from .executor import EOS

SHAREGPT_MEAN_INPUT = 161.31
SHAREGPT_MEAN_OUTPUT = 337.99


@dataclass(frozen=True)
class SimRequest:
    """A request's lengths; ``prompt_ids`` only when real prompts are replayed (a learned
    predictor needs them)."""

    prompt_len: int
    output_len: int
    prompt_ids: tuple[int, ...] | None = None


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    return rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, size)


def sharegpt_like(num_requests: int = 5000, seed: int = 0, max_prompt: int = 1024, max_total: int = 2048,
                  sigma_input: float = 1.0, sigma_output: float = 0.9) -> list[SimRequest]:
    """``num_requests`` requests with ShareGPT's mean lengths, within the paper's limits."""
    rng = np.random.default_rng(seed)
    out: list[SimRequest] = []
    while len(out) < num_requests:
        need = num_requests - len(out)
        prompts = np.maximum(4, np.rint(_lognormal(rng, SHAREGPT_MEAN_INPUT, sigma_input, need))).astype(int)
        outputs = np.maximum(1, np.rint(_lognormal(rng, SHAREGPT_MEAN_OUTPUT, sigma_output, need))).astype(int)
        keep = (prompts <= max_prompt) & (prompts + outputs <= max_total)
        out.extend(SimRequest(int(p), int(o)) for p, o in zip(prompts[keep], outputs[keep]))
    return out


def to_requests(workload: list[SimRequest]) -> list[Request]:
    """Controller requests with distinct dummy prompts (the first id names the request, so a
    length oracle can key on the prompt). ``max_new_tokens`` is the output length, as the
    authors' benchmark sets ``max_tokens`` to it (with ``ignore_eos``)."""
    requests = []
    for i, item in enumerate(workload):
        prompt = list(item.prompt_ids) if item.prompt_ids else [1000 + i] + [5] * (item.prompt_len - 1)
        requests.append(Request(i, prompt, item.output_len, frozenset({EOS})))
    return requests
