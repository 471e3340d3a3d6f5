"""The KV tensors of one stage: its own layers only, in fixed-size blocks addressed by slot."""

from __future__ import annotations

import torch

from .malloc import advise_huge_pages


class PagedKVCache:
    """Keys and values for a contiguous range of decoder layers.

    Layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]``, so a request's block
    table gathers whole blocks with one index operation. Zero-initialised: masked slots are read
    by the batched decode attention, and they must hold finite numbers.
    """

    def __init__(self, first_layer: int, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = _zeros(shape, dtype, device)
        self.values = _zeros(shape, dtype, device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer_idx - self.first_layer
        return self.keys[i], self.values[i]

    def write(self, layer_idx: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key``/``value`` (``[tokens, kv_heads, head_dim]``) at flat slot indices."""
        k_cache, v_cache = self.layer(layer_idx)
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def _zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed cache tensor; on a CPU, in huge pages where Linux grants them (``advise_huge_pages``:
    advised before the zeros are written, so the pages are faulted in huge)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(tensor)
    return tensor.zero_()
