"""Switch policies are found by name: built-ins, entry points, and code registrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_prompts, tiny_model

import tdpipe_hf
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


EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "plugins" / "tdpipe-example-plugin"

USE_EXAMPLE_PLUGIN = """
import torch, tdpipe_hf
from tdpipe_hf import plugins
from tdpipe_hf.models import tiny_random_model
assert "prompt-ratio" in plugins.available(plugins.PREDICTORS)
assert "queue-pressure" in plugins.available(plugins.SWITCH_POLICIES)
assert "headroom" in plugins.available(plugins.ADMISSION)
model = tiny_random_model("llama", seed=61)
prompts = [[1, 5, 9, 13][: 1 + i % 4] + [20 + i] * (i % 7) for i in range(12)]
expected = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist() for p in prompts]
tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40, predictor="prompt-ratio",
               switch_policy="queue-pressure")
engine = model.tdpipe_engine
assert type(engine.predictor).__name__ == "PromptRatioPredictor"
actual = model.generate_batch(prompts, max_new_tokens=12, do_sample=False)
eos = model.generation_config.eos_token_id
assert actual == [e[: e.index(eos) + 1] if eos in e else e for e in expected]
print("plugins used:", type(engine.predictor).__name__, engine.config.switch_policy)
import tdpipe_example_plugin as example
calls = []
admit = example.HeadroomAdmission.admit
example.HeadroomAdmission.admit = lambda self, *args: calls.append(self.headroom) or admit(self, *args)
tdpipe_hf.wrap(model, num_stages=2, block_size=4, kv_blocks=40, admission="headroom")
assert model.generate_batch(prompts, max_new_tokens=12, do_sample=False) == actual
assert calls and calls[-1] != calls[0]  # admitted requests, and learned from finished ones
print("admission used: HeadroomAdmission")
"""


def test_example_plugin_package_is_discovered_by_name_and_used(tmp_path):
    """pip-install the example package (into a private target) and use it by entry-point name."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE_PLUGIN)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", USE_EXAMPLE_PLUGIN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plugins used: PromptRatioPredictor queue-pressure" in done.stdout
    assert "admission used: HeadroomAdmission" in done.stdout


def _fake_distribution(root: Path, group: str, name: str, target: str) -> None:
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    with open(info / "entry_points.txt", "a") as handle:
        handle.write(f"[{group}]\n{name} = {target}\n")


def test_broken_plugins_get_errors_naming_them(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, plugins.SWITCH_POLICIES, "unimportable", "no_such_module_xyz:Policy")
    _fake_distribution(tmp_path, plugins.PREDICTORS, "no-predict", "collections:OrderedDict")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"plugin 'unimportable' \(no_such_module_xyz:Policy\) .* failed to load"):
        plugins.load(plugins.SWITCH_POLICIES, "unimportable")
    model = tiny_model("llama", seed=33)
    with pytest.raises(TypeError, match=r"predictor 'no-predict' \(OrderedDict\) has no predict"):
        tdpipe_hf.wrap(model, num_stages=1, kv_blocks=16, predictor="no-predict")
    tdpipe_hf.register_switch_policy("mute", object)
    with pytest.raises(TypeError, match=r"switch policy 'mute' \(object\) has no should_prefill"):
        tdpipe_hf.wrap(model, num_stages=1, kv_blocks=16, switch_policy="mute")
