"""One registry for every swappable part: built-ins, code registrations and entry points.

Each kind of part is an entry-point group. pyproject declares the built-ins in these groups exactly
as a third-party package declares its own; ``register(group, name, factory)`` does the same from
code. ``load`` finds a name's factory, ``build`` calls it and checks the result against the kind's
protocol (``tdpipe_hf.protocols``), so a broken plugin fails when it is built, naming itself and
the methods it lacks, not in the middle of a run.

What each group's factory is called with (all return one part):

- ``tdpipe_hf.schedulers``: ``factory(config, blocks, num_stages, predictor)`` -> a scheduler
- ``tdpipe_hf.admission``: ``factory(config, predictor)`` -> an admission policy
- ``tdpipe_hf.decode_batchers``: ``factory(config)`` -> a decode batcher
- ``tdpipe_hf.switch_policies``: ``cls()`` -> a switch policy; ``configure(config)`` if it has one
- ``tdpipe_hf.predictors``: ``cls()`` -> an output-length predictor
- ``tdpipe_hf.executors``: ``factory(engine, model, stages)`` -> an executor
- ``tdpipe_hf.attention_backends``: ``cls()`` -> an attention backend (``build``, ``forward``)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

SCHEDULERS = "tdpipe_hf.schedulers"
ADMISSION = "tdpipe_hf.admission"
DECODE_BATCHERS = "tdpipe_hf.decode_batchers"
SWITCH_POLICIES = "tdpipe_hf.switch_policies"
PREDICTORS = "tdpipe_hf.predictors"
EXECUTORS = "tdpipe_hf.executors"
ATTENTION_BACKENDS = "tdpipe_hf.attention_backends"

KIND = {SCHEDULERS: "scheduler", ADMISSION: "admission policy", DECODE_BATCHERS: "decode batcher",
        SWITCH_POLICIES: "switch policy", PREDICTORS: "predictor", EXECUTORS: "executor",
        ATTENTION_BACKENDS: "attention backend"}

# The same targets as pyproject's entry points (a test holds them equal), so that a source checkout
# that was never pip-installed still finds its built-ins.
BUILTINS = {
    SCHEDULERS: {"tdpipe": "tdpipe_hf.scheduling:tdpipe_scheduler",
                 "hybrid": "tdpipe_hf.scheduling:hybrid_scheduler",
                 "naive": "tdpipe_hf.scheduling:naive_scheduler",
                 "vllm-v0-pp": "tdpipe_hf.scheduling:vllm_v0_scheduler",
                 "vllm-v1-pp": "tdpipe_hf.scheduling:vllm_v1_scheduler",
                 "vllm-v1-pp-capped": "tdpipe_hf.scheduling:vllm_v1_capped_scheduler",
                 "hybrid-throttled": "tdpipe_hf.scheduling:throttled_hybrid_scheduler"},
    ADMISSION: {"greedy": "tdpipe_hf.policies.prefill:GreedyPrefill.from_config",
                "fits": "tdpipe_hf.policies.prefill:AdmitWhileFits.from_config",
                "whole-group": "tdpipe_hf.policies.baselines:AdmitWholeGroup.from_config"},
    DECODE_BATCHERS: {"steal-time": "tdpipe_hf.policies.stealing:steal_by_time",
                      "steal-rows": "tdpipe_hf.policies.stealing:steal_by_rows",
                      "static": "tdpipe_hf.policies.stealing:StaticBatcher.from_config"},
    SWITCH_POLICIES: {"intensity": "tdpipe_hf.policies.switch:IntensitySwitch",
                      "threshold": "tdpipe_hf.policies.switch:ThresholdSwitch",
                      "drain": "tdpipe_hf.policies.baselines:DrainSwitch"},
    PREDICTORS: {"constant": "tdpipe_hf.predictors.constant:ConstantPredictor",
                 "oracle": "tdpipe_hf.predictors.oracle:OraclePredictor",
                 "sklearn": "tdpipe_hf.predictors.learned:LearnedLengthPredictor"},
    EXECUTORS: {"local": "tdpipe_hf.runtime.executors:local_executor",
                "distributed": "tdpipe_hf.runtime.executors:distributed_executor"},
    ATTENTION_BACKENDS: {"paged-sdpa": "tdpipe_hf.runtime.attention:PagedSDPA",
                         "paged-cpu": "tdpipe_hf.runtime.cpu_attention:PagedCPU",
                         "paged-batched": "tdpipe_hf.runtime.batched_attention:PagedBatched"},
}
_REGISTERED: dict[str, dict[str, Callable]] = {group: {} for group in BUILTINS}


def _check_group(group: str) -> None:
    if group not in BUILTINS:
        raise ValueError(f"unknown plugin group {group!r}; groups: {', '.join(BUILTINS)}")


def register(group: str, name: str, factory: Callable) -> None:
    """Make ``factory`` available as ``name`` in ``group`` for this process (ahead of entry points)."""
    _check_group(group)
    if not isinstance(name, str) or not name:
        raise ValueError(f"plugin name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"plugin {name!r} for {group} must be a class or factory, got {factory!r}")
    _REGISTERED[group][name] = factory


def register_switch_policy(name: str, cls: type) -> None:
    register(SWITCH_POLICIES, name, cls)


def register_predictor(name: str, cls: type) -> None:
    register(PREDICTORS, name, cls)


def register_admission(name: str, factory: Callable) -> None:
    register(ADMISSION, name, factory)


def register_scheduler(name: str, factory: Callable) -> None:
    register(SCHEDULERS, name, factory)


_INSTALLED: dict[tuple, dict[str, tuple]] = {}


def _installed(group: str) -> tuple:
    """The entry points installed in ``group``. Reading package metadata scans every directory
    on ``sys.path`` (about 5 ms a group here), and every config and scheduler build asks, so the
    answer is kept for as long as ``sys.path`` is unchanged."""
    key = tuple(sys.path)
    if key not in _INSTALLED:
        _INSTALLED.clear()
        _INSTALLED[key] = {}
    groups = _INSTALLED[key]
    if group not in groups:
        groups[group] = tuple(entry_points(group=group))
    return groups[group]


def available(group: str) -> list[str]:
    _check_group(group)
    names = set(BUILTINS[group]) | set(_REGISTERED[group])
    names |= {ep.name for ep in _installed(group)}
    return sorted(names)


def _import(target: str) -> Callable:
    module, _, attrs = target.partition(":")
    obj = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


def load(group: str, name: str) -> Callable:
    """The factory registered as ``name`` in ``group``; a ValueError lists the names that exist."""
    _check_group(group)
    if not isinstance(name, str):
        raise ValueError(f"{KIND[group]} must be given by name (a string), got {name!r}")
    if name in _REGISTERED[group]:
        return _REGISTERED[group][name]
    for ep in _installed(group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise ValueError(f"plugin {name!r} ({ep.value}) in {group} failed to load: {exc}") from exc
    if name in BUILTINS[group]:
        return _import(BUILTINS[group][name])
    raise ValueError(f"unknown {KIND[group]} {name!r}; available: {', '.join(available(group))}")


def build(group: str, name: str, *args, factory: Callable | None = None):
    """``load(group, name)(*args)`` checked against the kind's protocol. Errors name the plugin."""
    from .protocols import PROTOCOLS, check

    factory = factory or load(group, name)
    try:
        part = factory(*args)
    except ValueError:
        raise  # a bad setting or name: its message already says which
    except Exception as exc:
        raise TypeError(f"{KIND[group]} {name!r} could not be built: {exc}") from exc
    return check(part, PROTOCOLS[group], f"{KIND[group]} {name!r}")
