"""Plugin discovery: built-ins, code registrations and installed entry points, one lookup.

Third parties publish classes under the entry-point groups ``tdpipe_hf.switch_policies`` and
``tdpipe_hf.predictors``; ``register_*`` does the same from code.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

SWITCH_POLICIES = "tdpipe_hf.switch_policies"
PREDICTORS = "tdpipe_hf.predictors"

# Same targets as pyproject's entry points, so a source checkout that is not pip-installed works.
_BUILTINS = {
    SWITCH_POLICIES: {"intensity": "tdpipe_hf.policies.switch:IntensitySwitch",
                      "threshold": "tdpipe_hf.policies.switch:ThresholdSwitch"},
    PREDICTORS: {"constant": "tdpipe_hf.predictors.constant:ConstantPredictor",
                 "oracle": "tdpipe_hf.predictors.oracle:OraclePredictor",
                 "sklearn": "tdpipe_hf.predictors.learned:LearnedLengthPredictor"},
}
_REGISTERED: dict[str, dict[str, type]] = {SWITCH_POLICIES: {}, PREDICTORS: {}}
_KIND = {SWITCH_POLICIES: "switch policy", PREDICTORS: "predictor"}


def register(group: str, name: str, cls: type) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"plugin name must be a non-empty string, got {name!r}")
    if not callable(cls):
        raise TypeError(f"plugin {name!r} for {group} must be a class or factory, got {cls!r}")
    _REGISTERED[group][name] = cls


def register_switch_policy(name: str, cls: type) -> None:
    register(SWITCH_POLICIES, name, cls)


def register_predictor(name: str, cls: type) -> None:
    register(PREDICTORS, name, cls)


def available(group: str) -> list[str]:
    names = set(_BUILTINS[group]) | set(_REGISTERED[group])
    names |= {ep.name for ep in entry_points(group=group)}
    return sorted(names)


def load(group: str, name: str) -> type:
    """The class registered as ``name`` in ``group``; a ValueError lists the names that exist."""
    if name in _REGISTERED[group]:
        return _REGISTERED[group][name]
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise ValueError(f"plugin {name!r} ({ep.value}) in {group} failed to load: {exc}") from exc
    if name in _BUILTINS[group]:
        module, attr = _BUILTINS[group][name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown {_KIND[group]} {name!r}; "
                     f"available: {', '.join(available(group))}")
