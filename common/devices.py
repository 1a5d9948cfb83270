"""Where a process computes: `run.device` ("cpu", "cuda", "cuda:N") resolved to a torch device.

Kept apart from the config so that loading a config never touches CUDA: a config that names a
GPU is valid anywhere, and only the process that runs it needs one (a GPU server and its CPU
workers read the same file).
"""

from __future__ import annotations

import torch

from byzps.common.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """The torch device `name` names; ConfigError naming `run.device` when this machine lacks it
    (no CUDA build of torch, no GPU, or an index past the last GPU)."""
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f'run.device: unknown device {name!r} ("cpu", "cuda" or "cuda:N")')
    if not torch.cuda.is_available():
        raise ConfigError(
            f"run.device: {name!r} needs a CUDA GPU, and this machine has none that torch "
            f"{torch.__version__} can use"
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"run.device: {name!r} is past the last GPU ({torch.cuda.device_count()} visible)"
        )
    return torch.device("cuda", index)
