"""Bad input fails early with an error that names the problem, and leaves the model usable."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, random_prompts, tiny_model

import tdpipe_hf
from tdpipe_hf.runtime.local import StageError


@pytest.fixture
def model():
    return tdpipe_hf.wrap(tiny_model("llama", seed=21), num_stages=2, block_size=4, kv_blocks=32)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate_batch([[5, 6], [], [7]], max_new_tokens=4)
    with pytest.raises(ValueError, match="length 0"):
        model.generate(torch.zeros((2, 0), dtype=torch.long), max_new_tokens=4)
    ids = torch.tensor([[0, 0], [5, 6]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate(ids, attention_mask=torch.tensor([[0, 0], [1, 1]]), max_new_tokens=4)


def test_prompt_longer_than_context(model):
    too_long = [5] * (model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match=r"prompt 0 has 257 tokens, more than the model's context of 256"):
        model.generate_batch([too_long], max_new_tokens=1)


def test_kv_budget_smaller_than_one_request(model):
    with pytest.raises(ValueError, match=r"request 1 needs up to 140 KV tokens .* KV budget holds 128"):
        model.generate_batch([[5] * 10, [5] * 40], max_new_tokens=100)
    with pytest.raises(ValueError, match="smaller than one block"):
        tdpipe_hf.wrap(model, kv_cache_bytes=100)


@pytest.mark.parametrize("num_stages", [0, -1, 5])
def test_num_stages_out_of_range(num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        tdpipe_hf.wrap(tiny_model("llama"), num_stages=num_stages)


@pytest.mark.parametrize("options, message", [
    ({"num_beams": 2}, "greedy decoding and sampling, not beam_search"),
    ({"output_scores": True, "return_dict_in_generate": True}, "output_scores"),
    ({"stop_strings": ["x"]}, "stop_strings"),
    ({"prefix_allowed_tokens_fn": lambda *a: [1]}, "prefix_allowed_tokens_fn"),
    ({"token_type_ids": torch.zeros((1, 3), dtype=torch.long)}, "token_type_ids"),
])
def test_unsupported_generation_option(model, options, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, **options)


def test_right_padding_is_rejected(model):
    with pytest.raises(ValueError, match="not left-padded"):
        model.generate(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)


@pytest.mark.parametrize("options, message", [
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"kv_blocks": 8, "kv_cache_bytes": 1 << 20}, "not both"),
    ({"switch_fraction": 2.0}, "switch_fraction"),
    ({"switch_fraction": True}, "switch_fraction"),
    ({"length_scale": float("inf")}, "length_scale must be a finite number > 0"),
    ({"kv_blocks": 10**12}, r"kv_blocks=1000000000000 needs .* GiB of KV cache on cpu, more than the .* GiB free"),
    ({"decode_fill_tokens": -1}, "decode_fill_tokens must be a non-negative integer"),
    ({"plan_ahead": "yes"}, "plan_ahead must be True or False"),
    ({"blocks": 8}, r"unknown TD-Pipe option\(s\) \['blocks'\]"),
    ({"executor": "ray"}, "executor"),
])
def test_nonsense_config(options, message):
    with pytest.raises(ValueError, match=message):
        tdpipe_hf.wrap(tiny_model("llama"), **options)


def test_unknown_switch_policy_lists_available():
    with pytest.raises(ValueError, match=r"switch_policy must be one of .*threshold.*got 'nope'"):
        tdpipe_hf.TDPipeConfig(switch_policy="nope")


def test_a_config_object_sets_the_stage_count():
    """``wrap(model, config=TDPipeConfig(num_stages=2))`` takes the config's stages; a different
    ``num_stages`` beside it is a contradiction, and a config of the wrong type is named."""
    model = tdpipe_hf.wrap(tiny_model("llama"), config=tdpipe_hf.TDPipeConfig(num_stages=2, kv_blocks=16))
    assert model._tdpipe_engine.config.num_stages == len(model._tdpipe_engine.executor.stages) == 2
    with pytest.raises(ValueError, match="num_stages=3 against the config's 2"):
        tdpipe_hf.wrap(tiny_model("llama"), num_stages=3, config=tdpipe_hf.TDPipeConfig(num_stages=2))
    with pytest.raises(TypeError, match="config must be a TDPipeConfig, got dict"):
        tdpipe_hf.wrap(tiny_model("llama"), config={"num_stages": 2})


def test_not_a_causal_lm():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(TypeError, match="not a decoder-only causal LM"):
        tdpipe_hf.wrap(bert)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        tdpipe_hf.wrap(torch.nn.Linear(2, 2))


def test_failed_wrap_leaves_model_working(model):
    expected = model.generate_batch([[5, 6, 7]], max_new_tokens=5)
    with pytest.raises(ValueError):
        tdpipe_hf.wrap(model, num_stages=99)
    assert model.generate_batch([[5, 6, 7]], max_new_tokens=5) == expected


def test_dead_stage_is_named_and_engine_recovers(model, monkeypatch):
    prompts = random_prompts(6, seed=22)
    expected = model.generate_batch(prompts, max_new_tokens=6)
    stage = model.tdpipe_engine.executor.stages[1]
    with monkeypatch.context() as patch:
        patch.setattr(stage, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("device lost")))
        with pytest.raises(StageError, match=r"stage 1 \(layers 2-3\) failed on prefill micro-batch \d+: device lost"):
            model.generate_batch(prompts, max_new_tokens=6)
    assert model.generate_batch(prompts, max_new_tokens=6) == expected


def test_generate_batch_input_types(model):
    with pytest.raises(TypeError, match="list of token-id lists"):
        model.generate_batch(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="prompt 0 must be a list of token ids"):
        model.generate_batch([["a", "b"]])
    assert model.generate_batch([]) == []
    with pytest.raises(TypeError, match="max_new_tokens must be an integer, got '4'"):
        model.generate_batch([[5, 6]], max_new_tokens="4")
    ids, mask = left_padded([[5, 6], [7]])
    with pytest.raises(TypeError, match="top_k must be an integer, got 2.5"):
        model.generate(ids, attention_mask=mask, do_sample=True, top_k=2.5)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=2).shape == (2, 4)


def test_token_ids_outside_the_vocabulary_are_named_before_any_stage_runs(model):
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"prompt 1 has token ids outside the vocabulary \[0, {vocab}\): \[{vocab}\]"):
        model.generate_batch([[5, 6], [7, vocab]], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary .*\[-3\]"):
        model.generate(torch.tensor([[5, -3]]), max_new_tokens=4)
    assert len(model.generate_batch([[5, 6]], max_new_tokens=3)[0]) == 3  # nothing broke


def test_predictors_that_know_nothing_fail_at_wrap():
    plain = tiny_model("llama", seed=23)
    with pytest.raises(ValueError, match=r"predictor 'oracle' is not trained for .*fit\(prompts, lengths\)"):
        tdpipe_hf.wrap(plain, num_stages=1, kv_blocks=16, predictor="oracle")
    with pytest.raises(ValueError, match=r"predictor 'sklearn' is not trained"):
        tdpipe_hf.wrap(plain, num_stages=1, kv_blocks=16, predictor="sklearn")
    from tdpipe_hf.predictors import OraclePredictor

    fitted = OraclePredictor().fit([[5, 6]], [3])
    tdpipe_hf.wrap(plain, num_stages=1, kv_blocks=16, predictor=fitted)  # a fitted one is fine
    tdpipe_hf.unwrap(plain)


def test_an_unsupported_causal_lm_is_called_that():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match=r"model type 'gpt2' \(GPT2LMHeadModel\) is not supported yet; supported: llama"):
        tdpipe_hf.wrap(gpt2, num_stages=1)


def test_an_empty_batch_and_a_mask_of_another_type_are_named(model):
    with pytest.raises(ValueError, match="input_ids has no rows"):
        model.generate(torch.zeros(0, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor, got list"):
        model.generate(torch.tensor([[5, 6, 7]]), attention_mask=[[1, 1, 1]], max_new_tokens=2)

