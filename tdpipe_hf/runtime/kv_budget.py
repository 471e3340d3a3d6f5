"""How many KV blocks a run gets: the one home for KV sizing.

A budget in bytes (given, or a default share of each device's free memory) becomes blocks through
the model's KV geometry; with stages on several devices the smallest device's count is the run's.
"""

from __future__ import annotations

import os

import torch

from .kv_cache import PagedKVCache

DEFAULT_CPU_KV_BYTES = 2 << 30


def kv_geometry(model) -> tuple[int, int]:
    """(kv heads, head dim) of the model, read through optimum's normalised config."""
    from optimum.utils import NormalizedConfigManager

    config = model.config
    try:
        normalized = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        heads, hidden = normalized.num_attention_heads, normalized.hidden_size
        kv_heads = getattr(normalized, "num_key_value_heads", None) or heads
    except (KeyError, AttributeError):
        heads, hidden = config.num_attention_heads, config.hidden_size
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return kv_heads, head_dim


def blocks_for_budget(model, budget_bytes: int, block_size: int, num_layers: int | None = None) -> int:
    """KV blocks that fit in ``budget_bytes`` when it holds ``num_layers`` layers' share of each
    block (default: all of them)."""
    kv_heads, head_dim = kv_geometry(model)
    layers = len(model.model.layers) if num_layers is None else num_layers
    per_block = PagedKVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, model.dtype)
    return max(0, budget_bytes // per_block)


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


def _per_device(stages: list, devices: dict[int, torch.device]) -> tuple[dict, dict]:
    """(decoder layers, bytes of weights still to be placed) per device, over the stages it will hold."""
    layers_on: dict[torch.device, int] = {}
    arriving: dict[torch.device, int] = {}
    for index, device in devices.items():
        layers_on[device] = layers_on.get(device, 0) + len(stages[index].layers)
        arriving[device] = arriving.get(device, 0) + stages[index].bytes_to_place(device)
    return layers_on, arriving


def kv_blocks_on_devices(model, stages: list, block_size: int, devices: dict[int, torch.device],
                         budget_bytes: int | None = None, available: dict[torch.device, int] | None = None) -> int:
    """The KV blocks the budget holds: ``budget_bytes`` for the whole model, or else each device's
    default share of its free memory (``devices``: stage index -> device, every stage that will
    run on this machine; ``available``: free bytes per device, where already measured) for the
    layers of the stages it will hold."""
    if budget_bytes is not None:
        budgets = {None: (budget_bytes, None)}
    else:
        layers_on, arriving = _per_device(stages, devices)
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


def check_kv_fits(model, stages: list, block_size: int, devices: dict[int, torch.device], num_blocks: int,
                  available: dict[torch.device, int] | None = None) -> None:
    """A ValueError naming ``kv_blocks`` if an explicit budget cannot fit in a device's free memory
    beside the weights about to be placed there (rather than an allocator's error mid start-up)."""
    kv_heads, head_dim = kv_geometry(model)
    layers_on, arriving = _per_device(stages, devices)
    for device, layers in layers_on.items():
        need = num_blocks * PagedKVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, model.dtype)
        free = max(0, ((available or {}).get(device) or available_memory(device)) - arriving[device])
        if need > free:
            raise ValueError(f"kv_blocks={num_blocks} needs {need / 2**30:.1f} GiB of KV cache on {device}, more than "
                             f"the {free / 2**30:.1f} GiB free there; lower kv_blocks, or leave it out to size the "
                             "cache from free memory")
