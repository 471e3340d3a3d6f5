"""tdpipe_hf: TD-Pipe temporally disaggregated pipeline inference for Hugging Face causal LMs."""

from __future__ import annotations

from .config import TDPipeConfig
from .offline import run_batch
from .plugins import register_predictor, register_switch_policy
from .predictors import load_predictor
from .wrap import from_pretrained, unwrap, wrap

__version__ = "0.1.0"

__all__ = ["TDPipeConfig", "from_pretrained", "load_predictor", "register_predictor", "register_switch_policy", "run_batch", "unwrap", "wrap", "__version__"]
