"""A method's fixed-shape selection work replayed as CUDA graphs (off by default; a process-wide choice).

On a GPU a selection is a few dozen small operations per hook, each a kernel launch the host issues; at the 7B
shape they took longer than the decoder layers the pruning saved (``docs/benchmarks.md``, "On a GPU"). Work whose
shapes repeat (per-camera ranks, a cut at a given budget, the greedy steps of a diversity selection) is captured
once per key and input shapes, then replayed as one launch: inputs copied in, outputs copied out
(:class:`specprune_ros.core.cuda_graphs.ShapeGraphs`). Off CUDA, or switched off, the function runs directly, so the
CPU runs the very same operations.

An adapter's ``use_cuda_graphs()`` switches it on (``ENABLED``) together with its vision and decoder-layer graphs.
A capture that fails is logged once and that work runs eagerly from then on. A graph reads the constants its
function uses (tables, fill values) by address: they come from caches that never evict.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional

import torch

from specprune_ros.core.cuda_graphs import ShapeGraphs

ENABLED = False

_LOG = logging.getLogger(__name__)
_EAGER = None          # an entry whose capture failed: its work runs eagerly


class SelectionGraphs:
    """Graphs of one owner's selection functions, one :class:`ShapeGraphs` per key (least recently used dropped).

    ``run(key, function, *inputs)``: ``key`` must name everything ``function`` bakes in besides its input tensors
    (budgets, layouts, which optional inputs are given): the function met first under a key is the one captured.
    A capture waits for the device and runs the work twice, so an owner captures at most ``max_captures`` keys in
    its life: a budget that keeps moving (the latency budget's knob) then runs its new keys eagerly instead of
    capturing again and again.
    """

    def __init__(self, max_entries: int = 16, max_captures: int = 64) -> None:
        self.max_entries = max_entries
        self.max_captures = max_captures
        self._entries: OrderedDict[tuple, Optional[ShapeGraphs]] = OrderedDict()
        self._keys_captured = 0
        self._limit_logged = False

    def run(self, key: tuple, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
            *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not (ENABLED and ShapeGraphs._graphs_on(inputs[0].device)) or _capturing(inputs[0].device):
            return function(*inputs)        # off, or inside another capture: part of that graph
        if key not in self._entries:
            if self._keys_captured >= self.max_captures:
                if not self._limit_logged:
                    _LOG.warning('%d selection keys captured as CUDA graphs; new ones run eagerly from now on',
                                 self.max_captures)
                    self._limit_logged = True
                return function(*inputs)
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = ShapeGraphs(function, max_shapes=2)
            self._keys_captured += 1
        self._entries.move_to_end(key)
        graphs = self._entries[key]
        if graphs is _EAGER:
            return function(*inputs)
        try:
            return graphs(*inputs)
        except RuntimeError as error:           # a capture CUDA refused: this work stays eager
            _LOG.warning('selection work %s could not run as a CUDA graph (%s); it runs eagerly from now on',
                         key[0], error)
            self._entries[key] = _EAGER
            return function(*inputs)

    def keys(self) -> list[tuple]:
        """The keys with graphs (or a failed capture), least recently used first."""
        return list(self._entries)

    def captures(self, key: tuple) -> int:
        """How many graphs ``key`` has captured (0 for none, or after a failed capture)."""
        graphs = self._entries.get(key)
        return 0 if graphs is None else graphs.captures

    def clear(self) -> None:
        self._entries.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == 'cuda' and torch.cuda.is_current_stream_capturing()
