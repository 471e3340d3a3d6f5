"""Pluggable decisions. Each policy is a small class with one method; none touches tensors."""

from .prefill import AdmitWhileFits
from .stealing import ReadyPoolBatcher
from .switch import ThresholdSwitch

__all__ = ["AdmitWhileFits", "ReadyPoolBatcher", "ThresholdSwitch"]
