"""A cache for functions that build constant tensors (index tables, masks, weights) shared by every later call.

The first call may come from inside ``torch.inference_mode()`` (the node's and the harness's steps): a tensor built
there is an inference tensor, and any later autograd use of it (training or fine-tuning the same model in the same
process) fails with "Inference tensors cannot be saved for backward". :func:`constant_tensors` builds the value
outside inference mode and without autograd, so the cached tensors serve both.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch

F = TypeVar('F', bound=Callable)


def constant_tensors(function: Optional[F] = None, *, maxsize: Optional[int] = None):
    """``functools.lru_cache(maxsize)`` (unbounded by default) whose misses build plain tensors, whatever the mode."""
    def decorate(build: F) -> F:
        @functools.wraps(build)
        def outside_inference_mode(*args, **kwargs):
            with torch.inference_mode(False), torch.no_grad():
                return build(*args, **kwargs)
        return functools.lru_cache(maxsize=maxsize)(outside_inference_mode)
    return decorate if function is None else decorate(function)
