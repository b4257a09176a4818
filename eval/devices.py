"""The eval device: the command line's 'cpu' | 'gpu' (or nothing: the GPU when torch sees one) resolved once, and
the one place that says what torch and DALI call it."""
from __future__ import annotations

DEVICES = ("cpu", "gpu")


class DeviceError(ValueError):
    """An unknown device, or 'gpu' where torch sees no CUDA GPU; reported as one line."""


def resolve_device(device: str | None) -> str:
    """'cpu' or 'gpu', checked against what torch sees; None picks the GPU when there is one."""
    import torch
    if device is None:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise DeviceError(f"--device must be cpu or gpu, got '{device}'")
    if device == "gpu" and not torch.cuda.is_available():
        raise DeviceError("--device gpu requested but torch sees no CUDA GPU")
    return device


def torch_device(device: str):
    import torch
    return torch.device("cuda" if device == "gpu" else "cpu")


def dali_device_id(device: str) -> int | None:
    """DALI's device_id: GPU 0 for 'gpu', None (no CUDA at all) for 'cpu'."""
    return 0 if device == "gpu" else None
