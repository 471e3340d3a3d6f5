"""The hierarchy controller: owns requests and KV accounting, decides every micro-batch."""

from .controller import Controller
from .kv import BlockManager
from .request import Request, Status
from .scheduler import Phase, Scheduler

__all__ = ["BlockManager", "Controller", "Phase", "Request", "Scheduler", "Status"]
