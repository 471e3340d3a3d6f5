"""Paper-scale discrete-event simulator: the real controller, scheduler and policies driven by
stage times from a roofline cost model instead of a model on hardware."""

from .cost import CostModel, Efficiency
from .executor import SimExecutor
from .run import POLICIES, SimSetup, simulate
from .specs import GPUS, MODELS, GPUSpec, ModelSpec
from .workload import SimRequest, sharegpt_like

__all__ = ["CostModel", "Efficiency", "GPUS", "GPUSpec", "MODELS", "ModelSpec", "POLICIES", "SimExecutor",
           "SimRequest", "SimSetup", "sharegpt_like", "simulate"]
