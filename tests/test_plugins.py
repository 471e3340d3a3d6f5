"""Switch policies are found by name: built-ins, entry points, and code registrations."""

from __future__ import annotations


import tdpipe_hf
from conftest import random_prompts, tiny_model
from tdpipe_hf import plugins


class DrainFirst:
    """Leave decode only when nothing is decoding any more (the README's example)."""

    calls = 0

    def should_prefill(self, state):
        DrainFirst.calls += 1
        return state.can_admit and state.num_decoding == 0


def test_registered_policy_is_used_and_tokens_unchanged():
    model = tiny_model("llama", seed=31)
    prompts = random_prompts(10, seed=32)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=30)
    expected = model.generate_batch(prompts, max_new_tokens=12)
    tdpipe_hf.register_switch_policy("drain-first", DrainFirst)
    assert "drain-first" in plugins.available(plugins.SWITCH_POLICIES)
    tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=30, switch_policy="drain-first")
    assert model.generate_batch(prompts, max_new_tokens=12) == expected
    assert DrainFirst.calls > 0


def test_builtins_are_declared_as_entry_points():
    """pyproject declares the built-ins in the same groups third parties use."""
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group=plugins.SWITCH_POLICIES)}
    assert names.get("threshold") == "tdpipe_hf.policies.switch:ThresholdSwitch"
    assert plugins.load(plugins.SWITCH_POLICIES, "threshold").__name__ == "ThresholdSwitch"
    predictors = {ep.name for ep in entry_points(group=plugins.PREDICTORS)}
    assert "constant" in predictors
