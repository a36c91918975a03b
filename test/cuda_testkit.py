"""What the CUDA twins of the CPU tests share."""
from __future__ import annotations

import pytest
import torch


def cuda_or_skip(covered_by: str) -> torch.device:
    """The CUDA device, or a skip that prints why and what covers the behaviour on the CPU (``covered_by``)."""
    if not torch.cuda.is_available():
        reason = f'CUDA is not available on this machine; {covered_by}'
        print(reason)
        pytest.skip(reason)
    return torch.device('cuda')
