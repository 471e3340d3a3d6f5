"""Where each stage runs, and how activations travel between stages on those devices."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

GLOO = "gloo"
GLOO_AND_NCCL = "cpu:gloo,cuda:nccl"  # host tensors (headers, plans) over gloo, GPU activations over NCCL


def parse_devices(devices: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"cuda:0,cuda:1"`` or a list of names -> a tuple of names; ValueError names a bad entry.

    Checked against this machine: asking for a GPU that is not there fails at ``wrap``, not in
    a worker process minutes later."""
    if devices is None:
        return None
    names = [name.strip() for name in devices.split(",")] if isinstance(devices, str) else list(devices)
    if not names:
        raise ValueError("TDPipeConfig.devices is empty: give one device per stage, or one for all")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"TDPipeConfig.devices: {name!r} is not a device name such as 'cpu' or 'cuda:1'")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"TDPipeConfig.devices: {name!r} is not a device name ({exc})") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ValueError(f"TDPipeConfig.devices: {name!r} asked for, but this machine has {count} "
                                 f"CUDA device{'s' if count != 1 else ''}")
        elif device.type != "cpu":
            raise ValueError(f"TDPipeConfig.devices: {name!r}: only cpu and cuda devices are supported")
    return tuple(names)


def stage_devices(model_device: torch.device, num_stages: int, devices: Sequence[str] | None) -> list[torch.device]:
    """One device per stage. Given ``devices``: one per stage, or one for all; plain ``"cuda"``
    means a GPU of its own in turn (stage i on GPU i mod the GPU count). Otherwise every stage
    stays on the model's device, except that a model on a GPU is spread the same way, starting
    from its own GPU (pipeline parallelism across GPUs is the point of the stages)."""
    first = (model_device.index or 0) if devices is None and model_device.type == "cuda" else 0
    return [_spread(_configured(model_device, devices, i), first + i) for i in range(num_stages)]


def torchrun_device(model_device: torch.device, rank: int, devices: Sequence[str] | None) -> torch.device:
    """This rank's stage device under torchrun: as :func:`stage_devices` picks it, except that a
    GPU of its own is the node's GPU ``LOCAL_RANK`` (so the same script works on every node)."""
    return _spread(_configured(model_device, devices, rank), int(os.environ.get("LOCAL_RANK", rank)))


def _configured(model_device: torch.device, devices: Sequence[str] | None, stage: int) -> torch.device:
    if devices is None:
        return torch.device("cuda") if model_device.type == "cuda" else model_device
    return torch.device(devices[0 if len(devices) == 1 else stage])


def _spread(device: torch.device, turn: int) -> torch.device:
    """``cuda`` without an index: GPU ``turn`` mod the GPU count; any other device as it is."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", turn % torch.cuda.device_count())
    return device


def offloaded_weights(model) -> list[str]:
    """Names of the weights accelerate keeps off any device (``device_map`` entries ``"cpu"`` or
    ``"disk"`` beside GPUs: the tensors sit on the meta device and arrive per forward call)."""
    return [name for name, param in model.named_parameters() if param.device.type == "meta"]


def remove_dispatch_hooks(model) -> bool:
    """A model dispatched by accelerate carries hooks that move each module's inputs to where
    accelerate put the module. Stages place their modules themselves, so the hooks would send
    activations to the wrong device: they go (:func:`restore_dispatch` puts them back). Returns
    whether there were any."""
    from accelerate.hooks import remove_hook_from_submodules

    hooked = any(hasattr(module, "_hf_hook") for module in model.modules())
    if hooked:
        remove_hook_from_submodules(model)
    return hooked


def restore_dispatch(model) -> None:
    """Dispatch the model again as accelerate had it (``hf_device_map``), hooks and all."""
    from accelerate import dispatch_model

    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        dispatch_model(model, device_map, force_hooks=True)


def activation_backend(devices: Sequence[torch.device], hosts: Sequence[str] | None = None) -> str:
    """NCCL carries activations when every stage has a GPU of its own (NCCL refuses two ranks on
    one GPU; ``hosts`` tells GPUs of different nodes apart); otherwise gloo carries everything,
    GPU tensors through a host copy."""
    places = {(host, device.index or 0) for host, device in zip(hosts or [""] * len(devices), devices)}
    distinct_gpus = all(d.type == "cuda" for d in devices) and len(places) == len(devices)
    return GLOO_AND_NCCL if distinct_gpus else GLOO


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where a stage's outgoing and incoming hidden states live while in transit."""
    return device if backend == GLOO_AND_NCCL and device.type == "cuda" else torch.device("cpu")
