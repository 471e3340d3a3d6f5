"""Output-length predictors: a small protocol and the built-ins."""

from .base import Predictor
from .constant import ConstantPredictor

__all__ = ["ConstantPredictor", "Predictor"]
