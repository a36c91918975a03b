"""CUDA graphs: work captured once per shape, then replayed as one launch.

On a GPU a pruned step is often bound by the host, not by the device: a 7B decoder layer is about 25 kernel
launches, a ViT block about 15, and at a few hundred tokens the host issues them more slowly than the device runs
them, so dropping tokens shortens the device's work but not the step. A replayed graph is one launch.

* :class:`LayerGraphs`: the executor's decoder layers, one graph per (span of layers, padded token count). A
  span runs from one point where a method reads attention or decides to the next (an unpruned pass is one span);
  a span whose last layer's attention a method reads has a graph of its own that also keeps that layer's queries,
  keys and values, and one whose keys and values a decode cache takes keeps every layer's. A graph runs fixed
  addresses and shapes, so the layers run over the kept tokens padded to a bucket (``core.kept_tokens.PaddedTokens``:
  padding keys masked out, padding rows dropped after the span), and every graph of one padded size reads the same
  static buffers: the input, the RoPE tables and the mask. The tables and the mask are copied in when the kept set
  changes, the input before each span; each span's output stays in its graph's own buffer until the next pass
  replays that graph.
* :class:`ShapeGraphs`: a function of tensors whose shapes repeat (the vision backbones, the greedy steps of the
  diversity selections, a method's fixed-shape selection work), one graph per input shapes; its outputs are copied
  out, since callers keep them across steps.
* :class:`DecodeGraphs`: greedy decoding (OpenVLA's action tokens), one graph per decoded token that runs every
  layer, embeds the token and picks the next, against the cache held in fixed-size buffers: a token is one launch,
  and nothing is read back until the last one.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import torch

# (x, RoPE tables, mask) -> the layers' output over the padded rows
LayerBody = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class _Captured:
    graph: 'torch.cuda.CUDAGraph'
    out: torch.Tensor | tuple[torch.Tensor, ...]     # the captured call's output buffers


@dataclass
class _SizeGraphs:
    """The static buffers of one padded size and the graphs of every span of layers captured at it."""

    x: torch.Tensor
    rope: torch.Tensor                          # (2, 1, padded size, head dim): cosine and signed sine
    mask: Optional[torch.Tensor]
    source: object = None                       # the padded kept set whose tables and mask are loaded
    layers: dict[tuple[Hashable, bool], _Captured] = field(default_factory=dict)   # (span, probed) -> its graph


class _GraphOwner:
    """Graphs that replay one after another on one stream and so share one memory pool (outputs stay allocated).

    The pool lives as long as a graph captured in it: when the last one is released, the next capture starts a
    new pool (capturing into a pool whose graphs are all gone fails inside the allocator).
    """

    def __init__(self) -> None:
        self.pool = None
        self.captures = 0

    def _capture(self, call: Callable[[], torch.Tensor], device: torch.device) -> _Captured:
        self.captures += 1
        return capture(call, device, self)

    def _all_released(self) -> None:
        self.pool = None

    def _make_room(self, entries: OrderedDict, limit: int, holds_graph: Callable[[object], bool]) -> None:
        """Release the least recently used ``entries`` until a new one fits under ``limit``.

        Once none left holds a graph (``holds_graph``), the next capture starts a new pool.
        """
        while len(entries) >= limit:
            entries.popitem(last=False)
        if not any(holds_graph(entry) for entry in entries.values()):
            self._all_released()


def capture(call: Callable[[], torch.Tensor], device: torch.device, owner: _GraphOwner) -> _Captured:
    """``call`` captured as a CUDA graph in ``owner``'s pool (after one run outside the graph), with its output."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        call()                                   # outside the graph first: library handles and workspaces
    torch.cuda.current_stream(device).wait_stream(stream)
    if owner.pool is None:
        owner.pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the ROS node's other threads (callbacks, publishing) may use CUDA while a worker captures
    with torch.cuda.graph(graph, pool=owner.pool, capture_error_mode='thread_local'):
        out = call()
    return _Captured(graph, out)


class RecomputingGraph:
    """A CUDA graph's replay without a GPU: the captured call rerun on the static buffers into its output buffers.

    What a replay does on the device, so the graph bookkeeping (static inputs, copies in and out, one capture per
    shape) can be checked and counted on the CPU: ``capture_recomputing`` stands in for :func:`capture`.
    """

    def __init__(self, call: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
                 out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        self.call, self.out = call, out

    def replay(self) -> None:
        got = self.call()
        for mine, new in zip(self.out, got) if isinstance(self.out, tuple) else [(self.out, got)]:
            mine.copy_(new)


def capture_recomputing(call: Callable[[], torch.Tensor], device: torch.device, owner: _GraphOwner) -> _Captured:
    """:func:`capture` with a :class:`RecomputingGraph` (any device)."""
    if owner.pool is None:
        owner.pool = object()                    # stands in for a memory pool handle
    out = call()
    return _Captured(RecomputingGraph(call, out), out)


class ShapeGraphs(_GraphOwner):
    """``function`` of tensors replayed as a CUDA graph per input shapes (called directly off CUDA).

    The inputs are copied into the graph's own buffers before each replay and the outputs (a tensor or a tuple of
    them) copied out after it: callers keep them while the graph replays again.
    """

    def __init__(self, function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], max_shapes: int = 4) -> None:
        super().__init__()
        self.function = function
        self.max_shapes = max_shapes
        self._shapes: OrderedDict[tuple, tuple[list[torch.Tensor], _Captured]] = OrderedDict()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self._graphs_on(inputs[0].device):
            return self.function(*inputs)
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        found = self._shapes.get(key)
        if found is None:
            self._make_room(self._shapes, self.max_shapes, lambda entry: True)
            static = [x.clone() for x in inputs]
            found = self._shapes[key] = (static, self._capture(lambda: self.function(*static), inputs[0].device))
        self._shapes.move_to_end(key)
        static, captured = found
        for buffer, x in zip(static, inputs):
            buffer.copy_(x)
        captured.graph.replay()
        out = captured.out
        return out.clone() if isinstance(out, torch.Tensor) else tuple(part.clone() for part in out)

    @staticmethod
    def _graphs_on(device: torch.device) -> bool:
        return device.type == 'cuda'


class LayerGraphs(_GraphOwner):
    """Captures and replays the decoder's layers as CUDA graphs, per layer and padded token count.

    ``max_sizes``: padded sizes kept at once; the least recently used one is released beyond it (a method whose
    kept count wanders over many buckets pays a capture per layer at each new one).
    """

    def __init__(self, max_sizes: int = 24) -> None:
        super().__init__()
        self.max_sizes = max_sizes
        self._sizes: OrderedDict[tuple, _SizeGraphs] = OrderedDict()

    def run(self, index: Hashable, hidden: torch.Tensor, padded_size: int, rope: torch.Tensor,
            mask: Optional[torch.Tensor], source: object, body: LayerBody,
            probed: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The graph ``index`` (the executor: a span's first and last layer) over ``hidden`` (1, n, d).

        ``n`` <= ``padded_size``; returns the output rows (1, n, d).

        ``rope`` / ``mask``: the padded kept set's RoPE tables (the cosine and the signed sine stacked, one copy)
        and key mask (None: none needed);
        ``source``: the object they belong to (copied into the static buffers when it changes); ``body``: the
        layers' arithmetic, called once outside the graph and once while capturing it. ``probed``: ``body``
        returns (output, queries, keys, values) over the padded rows, captured as a graph of its own, and returned
        whole.
        """
        key = (padded_size, hidden.shape[-1], hidden.dtype, hidden.device, rope.shape, mask is None)
        size = self._sizes.get(key)
        if size is None:
            size = self._new_size(key, hidden, padded_size, rope, mask)
        self._sizes.move_to_end(key)
        if size.source is not source:
            size.rope.copy_(rope)
            if mask is not None:
                size.mask.copy_(mask)
            size.source = source
        n = hidden.shape[1]
        size.x[:, :n].copy_(hidden)
        captured = size.layers.get((index, probed))
        if captured is None:
            captured = size.layers[(index, probed)] = self._capture(
                lambda: body(size.x, size.rope, size.mask), hidden.device)
        captured.graph.replay()
        return tuple(captured.out) if probed else captured.out[:, :n]

    def clear(self) -> None:
        """Release every graph and buffer."""
        self._sizes.clear()
        self._all_released()

    def _new_size(self, key: tuple, hidden: torch.Tensor, padded_size: int, rope: torch.Tensor,
                  mask: Optional[torch.Tensor]) -> _SizeGraphs:
        self._make_room(self._sizes, self.max_sizes, lambda size: bool(size.layers))
        size = _SizeGraphs(x=hidden.new_zeros(1, padded_size, hidden.shape[-1]), rope=torch.empty_like(rope),
                           mask=None if mask is None else torch.empty_like(mask))
        self._sizes[key] = size
        return size


@dataclass
class DecodeState:
    """The static buffers of greedy decoding at one key/value capacity, and its graph.

    One replay decodes one token: it reads ``ids`` at ``position``, writes each layer's new key and value into the
    first free slot of ``keys`` / ``values`` (``valid`` marks the slots in use), and leaves the next token in
    ``ids`` and in row ``count`` of ``history`` (and, per probed layer, its attention over the slots in row
    ``count`` of ``attention``), then advances ``position`` and ``count``.
    """

    ids: torch.Tensor                      # (1, 1) long: the token fed to the next replay
    position: torch.Tensor                 # (1,) long: its position
    count: torch.Tensor                    # (1,) long: tokens decoded since the state was loaded
    keys: list[torch.Tensor]               # per layer (1, kv heads, capacity, head dim)
    values: list[torch.Tensor]
    valid: list[torch.Tensor]              # per layer (1, 1, 1, capacity) bool
    history: torch.Tensor                  # (steps,) long: the decoded tokens
    attention: dict[int, torch.Tensor]     # probed layer -> (steps, capacity) float32
    cos: torch.Tensor                      # RoPE tables of every position up to the state's position capacity
    signed_sin: torch.Tensor
    captured: Optional[_Captured] = None

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor], first_ids: torch.Tensor,
             position: int) -> None:
        """Start a new decode: the prefill's keys and values in the first slots, ``first_ids`` at ``position``."""
        for layer, (k, v) in enumerate(zip(keys, values)):
            n = k.shape[2]
            self.keys[layer][:, :, :n].copy_(k)
            self.values[layer][:, :, :n].copy_(v)
            self.valid[layer].zero_()
            self.valid[layer][..., :n].fill_(True)
        self.ids.copy_(first_ids.view(1, 1))
        self.position.fill_(position)
        self.count.zero_()


class DecodeGraphs(_GraphOwner):
    """Greedy decoding replayed as one CUDA graph per token, per key/value capacity (and probed layers).

    A decoded token runs every decoder layer against the cache: on the host that is a few hundred launches per
    token, on the device a few microseconds each. The graph holds the cache in fixed-size buffers (a capacity
    bucket of slots per layer, the unused ones masked out), so one capture serves every step whose prefill fits.
    ``max_states``: capacities kept at once (each holds its buffers: about 170 MB at a 7B model's 320 slots).
    """

    def __init__(self, max_states: int = 8) -> None:
        super().__init__()
        self.max_states = max_states
        self._states: OrderedDict[tuple, DecodeState] = OrderedDict()

    def state(self, key: tuple, build: Callable[[], DecodeState]) -> DecodeState:
        """The state under ``key``, built by ``build`` when new.

        The least recently used state is released beyond ``max_states``.
        """
        state = self._states.get(key)
        if state is None:
            self._make_room(self._states, self.max_states, lambda entry: entry.captured is not None)
            state = self._states[key] = build()
        self._states.move_to_end(key)
        return state

    def decode(self, state: DecodeState, body: Callable[[DecodeState], torch.Tensor], steps: int,
               keys: list[torch.Tensor], values: list[torch.Tensor], first_ids: torch.Tensor, position: int) -> None:
        """``steps`` replays of ``body`` (captured at the first call) after loading the prefill into ``state``."""
        if state.captured is None:                 # capturing runs the body once: the state is loaded after it
            state.captured = self._capture(lambda: body(state), first_ids.device)
        state.load(keys, values, first_ids, position)
        for _ in range(steps):
            state.captured.graph.replay()

    def clear(self) -> None:
        self._states.clear()
        self._all_released()
