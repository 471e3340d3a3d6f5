"""Pluggable decisions. Each policy is a small class with one method; none touches tensors."""

from .prefill import AdmitWhileFits, GreedyPrefill
from .stealing import ReadyPoolBatcher, StaticBatcher
from .switch import IntensitySwitch, ThresholdSwitch

__all__ = ["AdmitWhileFits", "GreedyPrefill", "IntensitySwitch", "ReadyPoolBatcher", "StaticBatcher", "ThresholdSwitch"]
