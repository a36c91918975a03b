"""Counts computed on the device in one step and read on the host in a later one, without waiting for the device.

A selection whose size depends on the attention needs that size on the host to shape the next layer's tensors;
reading it back in the same step stops the host until the device has caught up (on a GPU the host then issues
nothing while the device works, and the device idles while the host issues the rest of the step). A size taken
from the previous step instead was copied back while that step's remaining layers ran: by the next step it is
there, and reading it costs no wait.
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch


class DeferredCounts:
    """Small integer tensors put on the device now (per key) and read as host lists later.

    On CUDA :meth:`put` starts a copy into pinned host memory (one buffer per key, reused) on the current stream
    and records an event; :meth:`get` reads it once that event has passed (it waits only if the device has not
    reached it yet, which a later step's read does not meet). On the CPU the tensor is kept as it is.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[torch.Tensor, Optional[torch.cuda.Event]]] = {}
        self._buffers: dict[Hashable, torch.Tensor] = {}

    def put(self, key: Hashable, counts: torch.Tensor) -> None:
        """Remember ``counts`` (any integer tensor) under ``key``; nothing is read back now."""
        if counts.device.type != 'cuda':
            self._entries[key] = (counts.detach(), None)
            return
        host = self._buffers.get(key)
        if host is None or host.shape != counts.shape or host.dtype != counts.dtype:
            host = self._buffers[key] = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(counts.device))
        self._entries[key] = (host, event)

    def get(self, key: Hashable) -> Optional[list[int]]:
        """The counts put under ``key`` as a host list (None if none were put since :meth:`clear`)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        host, event = entry
        if event is not None and not event.query():
            event.synchronize()
        return [int(value) for value in host.reshape(-1).tolist()]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
