"""Host data onto the device without waiting for it.

A plain copy from pageable host memory to a GPU synchronises the stream: the host stops until the device has run
everything queued before it. Staged through pinned memory the copy is queued like a kernel instead.
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host ``tensor`` on ``device`` without waiting for it (through pinned memory on CUDA); itself if already there."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == 'cuda' and tensor.device.type == 'cpu':
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
