"""Output-length predictors: the protocol, the built-ins and ``load_predictor``.

Built-ins (entry-point names): ``sklearn`` (default, trained per model), ``constant`` (mean length),
``oracle`` (true lengths, for experiments). Third parties add theirs under the entry-point group
``tdpipe_hf.predictors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import plugins
from ..models import DEFAULT_MODEL_NAME, model_name, same_weights, weight_signature
from .base import Predictor, check_predictor, checked_predictions, read_arrays
from .constant import ConstantPredictor
from .learned import LearnedLengthPredictor
from .oracle import OraclePredictor
from .probe import HiddenStateProbe

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "predictors"
PROBE_SUFFIX = ".probe.npz"  # a model's length probe ships beside its predictor


def shipped_predictor_path(model_name: str) -> Path:
    return SHIPPED_DIR / f"{model_name}.npz"


def shipped_models() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.npz") if not p.name.endswith(PROBE_SUFFIX))


def shipped_probe_path(model_name: str) -> Path:
    return SHIPPED_DIR / f"{model_name}{PROBE_SUFFIX}"


def load_probe(probe, model_name: str, num_layers: int, predictor=None):
    """The length probe that refines predictions after prefill (``TDPipeConfig.length_probe``):
    False for none, a ``.npz`` path, or a probe object. None: the one that belongs with the
    predictor: shipped for ``model_name`` beside the shipped predictor, or ``P.probe.npz`` beside
    a predictor file ``P.npz`` (``train-predictor`` writes both); a predictor given by name or as
    an object (an oracle, a plugin) plans alone. A probe must read a layer the model has."""
    if probe is False:
        return None
    if probe is None:
        if predictor is None or predictor == "default":
            path = shipped_probe_path(model_name)
        elif isinstance(predictor, str) and predictor.endswith(".npz"):
            path = Path(predictor[:-len(".npz")] + PROBE_SUFFIX)
        else:
            return None
        if not path.exists():
            return None
        probe = str(path)
    if isinstance(probe, str):
        if not Path(probe).exists():
            raise FileNotFoundError(f"length probe file {probe} does not exist")
        probe = HiddenStateProbe.load(probe)
    if not getattr(probe, "is_trained", True):
        raise ValueError("the length probe is not trained: fit(states, lengths) it or train one with "
                         "`tdpipe train-predictor`")
    if not 1 <= probe.layer < num_layers:
        raise ValueError(f"the length probe reads layer {probe.layer}, but the model has {num_layers} decoder "
                         f"layers: a probe must read one of layers 1-{num_layers - 1}")
    return probe


def signature_path(model_name: str) -> Path:
    return SHIPPED_DIR / f"{model_name}.signature.json"


def shipped_name_for(model) -> str:
    """The name of the shipped predictor for ``model``: its own name when a predictor is shipped
    under it, else the shipped model whose weight signature ``model`` has (so a model loaded with
    ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` or saved to another directory is
    still recognised); else its own name."""
    name = model_name(model)
    if shipped_predictor_path(name).exists():
        return name
    mine = weight_signature(model)
    for candidate in shipped_models():
        path = signature_path(candidate)
        if path.exists() and same_weights(mine, json.loads(path.read_text())):
            return candidate
    return name


def load_predictor_file(path: str | os.PathLike):
    """A predictor saved with ``save(path)``, read back by the kind recorded in the file."""
    meta, _ = read_arrays(path)
    cls = plugins.load(plugins.PREDICTORS, meta["kind"])
    if not callable(getattr(cls, "load", None)):
        raise TypeError(f"predictor kind {meta['kind']!r} in {path} has no load(path) classmethod")
    return check_predictor(cls.load(path), meta["kind"])


def load_predictor(name: str | None = None, model_name: str = DEFAULT_MODEL_NAME):
    """A ready-to-use predictor.

    ``None``/``"default"``: the one shipped for ``model_name`` (trained on its own outputs).
    A path to a ``.npz`` file: a saved predictor. Otherwise an entry-point name: the plugin's
    class built with no arguments; a built-in kind that has a shipped file for ``model_name``
    (``sklearn``) comes back trained.
    """
    if name is None or name == "default":
        path = shipped_predictor_path(model_name)
        if not path.exists():
            raise ValueError(f"no predictor is shipped for model {model_name!r} (shipped: "
                             f"{', '.join(shipped_models()) or 'none'}); train one with `tdpipe train-predictor` "
                             f"or pass a predictor name: {', '.join(plugins.available(plugins.PREDICTORS))}")
        return load_predictor_file(path)
    if name.endswith(".npz") or os.sep in name:
        if not Path(name).exists():
            raise FileNotFoundError(f"predictor file {name} does not exist")
        return load_predictor_file(name)
    cls = plugins.load(plugins.PREDICTORS, name)
    shipped = shipped_predictor_path(model_name)
    if shipped.exists() and read_arrays(shipped)[0]["kind"] == name:
        return load_predictor_file(shipped)
    try:
        predictor = cls()
    except Exception as exc:
        raise TypeError(f"predictor {name!r} could not be built with no arguments: {exc}") from exc
    return check_predictor(predictor, name)


__all__ = ["PROBE_SUFFIX", "ConstantPredictor", "HiddenStateProbe", "LearnedLengthPredictor", "OraclePredictor", "Predictor", "check_predictor",
           "checked_predictions", "load_predictor", "load_predictor_file", "load_probe", "shipped_models", "shipped_name_for",
           "shipped_predictor_path", "shipped_probe_path"]
