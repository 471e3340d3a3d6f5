"""The ``paged-cpu`` attention backend: decode rows attend straight from the paged cache.

On a CPU most of the gather + SDPA backend's decode time is the copy of every request's blocks
into a padded tensor, per layer and step (``index_select``; profile in benchmarks/HISTORY.md). Here a small
C++ kernel (``paged_decode.cpp``, compiled on first use with the compiler the machine has and
cached by torch) reads each block where it lies. Prefill segments keep SDPA, as in ``paged-sdpa``.
The kernel sums in another order than SDPA does, so results agree to rounding, not bit for bit;
greedy tokens are tested against HF ``generate`` like every backend's.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import sys
from pathlib import Path

import torch

from .attention import AttentionContext, attend_segments, paged_attention, store_new_kv

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("paged_decode.cpp")
# -ffast-math lets the softmax's exp and the dot products vectorise (about 1.5x on the kernel, measured
# here); it is a compile flag only: linking without it keeps the process's denormal handling as is
# (a test checks), and the kernel sees no NaN or infinity from a finite model.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


@functools.cache
def kernel():
    """The compiled ``paged_decode`` op (built once per machine and source, then loaded from
    torch's extension cache). Raises if no compiler can build it."""
    from torch.utils import cpp_extension

    # -march=native: the build is for this CPU; its cache name carries the CPU's flags, the
    # compiler flags and the source, so a shared home directory on another CPU builds its own
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").exists() else ""
    digest = hashlib.sha1("\n".join([flags, *_CFLAGS, _SOURCE.read_text()]).encode()).hexdigest()[:12]
    name = f"tdpipe_paged_decode_{digest}"
    built = Path(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so")
    if built.exists():
        # The name pins the source and flags, so a built library is current: load it as is.
        # ``cpp_extension.load`` would first take its build lock, and a lock left by a process
        # killed while building makes every later start wait on it forever, without a word.
        try:
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except (ImportError, OSError):  # a library cut short by a killed build: build it again below
            pass
    # the user would otherwise see an unexplained pause
    print("tdpipe_hf: building the paged-cpu attention kernel (once for this machine, about 30 s)",
          file=sys.stderr, flush=True)
    lock = built.with_name("lock")
    if lock.exists():
        print(f"tdpipe_hf: waiting for {lock}: another process is building the kernel; if none is "
              f"(one was killed while building), delete that file", file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                              verbose=False)


@functools.cache
def available() -> bool:
    """Whether the kernel builds and loads here (tried once per process: a failed build is not
    retried, nor warned about again, at every wrap)."""
    try:
        kernel()
        return True
    except Exception as exc:  # no compiler, no headers: the gather + SDPA backend still works
        logger.warning("tdpipe_hf: the paged-cpu attention kernel is not available (%s: %s); "
                       "using paged-sdpa", type(exc).__name__, exc)
        return False


def build(batch, block_size: int, device: torch.device | str = "cpu") -> AttentionContext:
    """Metadata as for ``paged-sdpa``, with every decode row in one group (the kernel does not
    pad, so grouping by length would only split its parallel work)."""
    return AttentionContext.build(batch, block_size, device, group_ratio=float("inf"))


def paged_cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``AttentionInterface`` function of ``paged-cpu`` (see ``attention.paged_attention``,
    which serves plain ``forward`` calls and stages on other devices: the kernel reads host memory)."""
    ctx: AttentionContext | None = kwargs.get("tdpipe_ctx")
    if ctx is None or query.device.type != "cpu":
        return paged_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    q, k, v, k_cache, v_cache = store_new_kv(module, query, key, value, ctx, kwargs["tdpipe_kv"])
    out = q.new_empty(q.shape)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    for group in ctx.decode_groups:
        kernel().paged_decode(q, k_cache, v_cache, group.blocks, group.lengths, group.rows, out, scale)
    attend_segments(q, k, v, k_cache, v_cache, ctx, out, scaling)
    return out.unsqueeze(0), None


class PagedCPU:
    """The attention backend ``paged-cpu`` (registry group ``tdpipe_hf.attention_backends``)."""

    build = staticmethod(build)
    forward = staticmethod(paged_cpu_attention)
