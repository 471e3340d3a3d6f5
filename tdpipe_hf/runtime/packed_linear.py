"""Linear layers whose weights are packed once for oneDNN, for stages that run on CPU in float32.

Behind a plain ``F.linear`` on CPU, MKL's sgemm repacks the weight matrix on every call. At the
row counts of decode micro-batches that repacking is a fixed cost per call, and in a pipeline
every micro-batch pays it on every stage. Measured on 2 Xeon cores with SmolLM2 (one thread, a
full pass over the 30 layers and the LM head): 304 -> 278 ms for 64 rows, 203 -> 182 ms for 32,
103 -> 83 ms for 4; the LM head alone 27 -> 19 ms for 32 rows. oneDNN accumulates in another
order than MKL, so logits differ in the last bits (about 1e-5 relative) and a greedy token can
flip where HF's top two logits nearly tie: measured, 1 of 64 chat answers of 128 tokens changed
at step 100, where HF's top-2 gap was 1.7e-5. On AMD CPUs the speed gap is far wider: MKL's sgemm
runs 94-190 GFLOP/s on SmolLM2's shapes there against 300-490 for the packed oneDNN product (2 Zen 5
cores, AVX-512, 2026-12-04), which takes the whole engine from 331 to 558 tokens/s. So the default,
``pack_weights="auto"``, times both products once per process on one of the stage's own weights
and packs only where that pays (:func:`packing_pays`).

The packed weights are a copy taken when the stage is set up: they serve only the stage's own
forward (plain ``model(...)`` calls keep using the module's weights), and re-wrapping the model
takes a fresh copy after its weights change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

ROWS_HINT = 32  # oneDNN picks its blocked weight layout for about this many rows
PAYS_OFF = 1.25  # "auto" packs when the packed product is at least this much faster
logger = logging.getLogger("tdpipe_hf")
_state = threading.local()
_verdicts: dict[tuple, bool] = {}  # (weight shape, dtype, threads) -> packing pays


def available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed: float32 on CPU with oneDNN present."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ([out, in]) reordered once into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def packed_product(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(rows, weight, bias)`` for 2-D ``rows``, computed by oneDNN on ``pack(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def packing_pays(weight: torch.Tensor, rows: int = 2 * ROWS_HINT, repeats: int = 5) -> bool:
    """Whether, on this machine and at this process's thread count, the packed oneDNN product of
    ``weight`` runs at least ``PAYS_OFF`` times faster than ``F.linear`` (best of ``repeats``
    each, after a warm-up; a few milliseconds, once per shape and process)."""
    if not available(weight):
        return False
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _verdicts:
        with torch.inference_mode():
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            packed = pack(weight)
            plain = best_seconds(lambda: F.linear(x, weight), repeats)
            fast = best_seconds(lambda: packed_product(x, packed), repeats)
        _verdicts[key] = plain >= PAYS_OFF * fast
        logger.info("pack_weights='auto': a %dx%d weight on %d rows takes %.2f ms with F.linear, %.2f ms packed "
                    "for oneDNN -> %s", *weight.shape, rows, plain * 1e3, fast * 1e3,
                    "packing" if _verdicts[key] else "not packing")
    return _verdicts[key]


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class PackedLinears:
    """Packs every ``nn.Linear`` below ``modules``; while :meth:`active` is entered on this
    thread, their forward runs on the packed copy."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self.forwards: dict[torch.nn.Linear, object] = {}
        for module in modules:
            for linear in module.modules():
                if isinstance(linear, torch.nn.Linear) and available(linear.weight) and linear not in self.forwards:
                    linear.forward = self.forwards[linear] = _packed_forward(linear, pack(linear.weight))

    def active(self) -> "_Active":
        return _Active()

    def restore(self) -> None:
        """Give the modules their own forward back (and free the packed copies), unless a newer
        packing has taken them over."""
        for linear, forward in self.forwards.items():
            if linear.__dict__.get("forward") is forward:
                del linear.forward
        self.forwards = {}


class _Active:
    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc):
        _state.depth -= 1


def _packed_forward(linear: torch.nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not getattr(_state, "depth", 0) or x.dtype != torch.float32:
            return F.linear(x, linear.weight, linear.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = packed_product(rows, packed, linear.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward
