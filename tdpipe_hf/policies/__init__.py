"""Pluggable decisions. Each policy is a small class with one method; none touches tensors."""

from .prefill import AdmitWhileFits, GreedyPrefill
from .stealing import ReadyPoolBatcher
from .switch import ThresholdSwitch

__all__ = ["AdmitWhileFits", "GreedyPrefill", "ReadyPoolBatcher", "ThresholdSwitch"]
