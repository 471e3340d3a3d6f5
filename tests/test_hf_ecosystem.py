"""A wrapped model is still a model the HF ecosystem recognises: transformers' text-generation
pipeline takes it without complaint and answers as the plain model does, and save_pretrained
records the real architecture."""

from __future__ import annotations

import json
import logging

import transformers
from conftest import tiny_model

import tdpipe_hf
from tdpipe_hf.models import byte_tokenizer


def test_text_generation_pipeline_accepts_the_wrapped_model_and_answers_the_same(caplog):
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", seed=81, vocab_size=len(tokenizer))
    prompts = ["hello there", "a", "pipelines are"]
    plain = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = plain(prompts, max_new_tokens=8, do_sample=False)
    tdpipe_hf.wrap(model, num_stages=2)
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            wrapped = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
            assert wrapped(prompts, max_new_tokens=8, do_sample=False) == expected
            assert wrapped(prompts, max_new_tokens=8, do_sample=False, batch_size=3) == expected
    finally:
        transformers.logging.disable_propagation()
        tdpipe_hf.unwrap(model)
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]


def test_save_pretrained_records_the_models_own_architecture(tmp_path):
    model = tiny_model("llama", seed=82)
    tdpipe_hf.wrap(model, num_stages=2)
    model.save_pretrained(tmp_path)
    tdpipe_hf.unwrap(model)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
