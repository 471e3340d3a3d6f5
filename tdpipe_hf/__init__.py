"""tdpipe_hf: TD-Pipe temporally disaggregated pipeline inference for Hugging Face causal LMs."""

from __future__ import annotations

from .config import TDPipeConfig
from .plugins import register_predictor, register_switch_policy
from .predictors import load_predictor
from .wrap import from_pretrained, unwrap, wrap

__version__ = "0.1.0"


def __getattr__(name: str):
    # run_batch is an application (tdpipe_hf.apps.offline); imported on first use so that importing
    # the core never imports the applications.
    if name == "run_batch":
        from .apps.offline import run_batch
        return run_batch
    raise AttributeError(f"module 'tdpipe_hf' has no attribute {name!r}")

__all__ = ["TDPipeConfig", "from_pretrained", "load_predictor", "register_predictor", "register_switch_policy", "run_batch", "unwrap", "wrap", "__version__"]
