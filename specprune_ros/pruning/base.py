"""Shared plumbing of the pruning methods: config parsing, episode bookkeeping, the info contract.

Info contract
-------------
Every method fills ``method.last_info`` (a dict) during a step and, in ``end_step(record)``, merges it into
``record.info`` (so the runtime may read either; ``record.info`` is the canonical place). Keys common to all
methods: ``method``, ``step`` (steps since the last reset, before this one), ``reset`` (why the state was reset at
the start of this step, '' if it was not), ``visual_kept_before`` (visual tokens entering layer 0).

Episode bookkeeping (``_sync``), at the start of every step: the temporal state is reset when the instruction
changes, when ``context.step_index`` does not move forward (0 again or smaller: a new episode, can be switched off
with ``reset_on_step_index=False``), after a gap longer than ``max_gap_s`` (from ``context.timestamp`` if the
runtime provides one, or from :meth:`observe_time` / :meth:`observe_gap` called by the caller), and when the token
layout changes.

Layer numbers in configs may be negative (Python style: -1 = last layer); they are resolved against the decoder
depth, taken from ``context.num_layers`` if the runtime provides it (> 0), else from the depth seen in the previous
step's record, else from the config's ``num_layers`` (default 6, the reference VLA's depth).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from specprune_ros.core.constant_tensors import constant_tensors
from specprune_ros.core.dataclass_mapping import dataclass_from_mapping
from specprune_ros.core.step_types import (AttentionRequest, LayerView, StepContext, StepPlan, StepRecord,
                                           VisualMask)
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.pruning.scoring import (dense_visual_scores, dense_visual_scores_on_device,
                                           mask_to_sequence_on_device, present_mask)
from specprune_ros.pruning.temporal_state import TemporalStateConfig, TemporalTokenState

DEFAULT_NUM_LAYERS = 6


@dataclass
class BaseConfig:
    """Fields every method config has."""

    num_layers: int = DEFAULT_NUM_LAYERS   # decoder depth, used only if the context does not carry it
    max_gap_s: float = 2.0                 # reset the temporal state after a longer input gap (<= 0: never)
    reset_on_step_index: bool = True       # reset when context.step_index restarts
    keep_regions: tuple = ()               # image boxes never pruned, (camera, x0, y0, x1, y1) in image fractions
    # (see ``protected_visual``); e.g. ((1, 0, 0, 1, 1),): camera 1 whole


def config_from_dict(cls: type, values: Optional[dict[str, Any]]) -> Any:
    """Build dataclass ``cls`` from a dict; unknown keys raise ValueError, lists become tuples for tuple fields."""
    return dataclass_from_mapping(cls, values)


def resolve_layer(layer: int, num_layers: int) -> int:
    resolved = layer + num_layers if layer < 0 else layer
    if not 0 <= resolved < num_layers:
        raise ValueError(f'layer {layer} outside a decoder of {num_layers} layers')
    return resolved


class PruningMethodBase:
    """Base class implementing the ``PruningMethod`` protocol's bookkeeping; subclasses override the hooks."""

    name = 'base'

    def __init__(self, config: BaseConfig, seed: int = 0, frame_history: int = 2, attention_window: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        self.state = TemporalTokenState(TemporalStateConfig(
            frame_history=frame_history, attention_window=attention_window, max_gap_s=config.max_gap_s))
        self.last_info: dict[str, Any] = {}
        self._layout: Optional[TokenLayout] = None
        self._context: Optional[StepContext] = None
        self._pending_reset = ''
        self._learned_layers = 0
        self._protected: Optional[torch.Tensor] = None
        self._idle = False                     # this step has no visual token to prune (no camera in the layout)
        check_regions(config.keep_regions)     # fail when the method is built, not at the first inference
        self.num_layers = config.num_layers

    # ------------------------------------------------------------------------------------ protocol

    def reset(self) -> None:
        self.state.reset('explicit')
        self._pending_reset = 'explicit'
        self._reset_method()

    def begin_step(self, context: StepContext) -> StepPlan:
        self._sync(context)
        self._context = context
        self.last_info = {'method': self.name, 'step': self.state.steps, 'reset': self._pending_reset}
        self._pending_reset = ''
        self._idle = context.layout.num_visual == 0
        if self._idle:                         # no camera in this step's input: it runs as it is
            self.last_info.update(visual_kept_before=0, idle='no visual tokens')
            return StepPlan(after_layers=frozenset())
        plan = self._begin(context)
        if plan.after_layers is None and type(self)._after is PruningMethodBase._after:
            plan.after_layers = frozenset()         # a method that decides nothing between layers needs no hook
        self._protected = _protected_cached(context.layout, _as_regions(self.config.keep_regions))
        if plan.keep_before is not None and self._protected is not None:
            plan.keep_before = torch.unique(torch.cat([_sequence_indices(plan.keep_before, context.layout),
                                                       self._protected]))
        if plan.reuse_kv is not None and self._protected is not None:   # protected tokens are computed afresh
            reuse = _sequence_indices(plan.reuse_kv, context.layout)
            plan.reuse_kv = reuse[~torch.isin(reuse, self._protected)]
        keep = plan.keep_before
        nv = context.layout.num_visual if keep is None else keep.count if isinstance(keep, VisualMask) else \
            int(keep.numel())
        self.last_info['visual_kept_before'] = nv
        return plan

    def after_layer(self, view: LayerView) -> Optional[torch.Tensor | VisualMask]:
        if self._idle:
            return None
        keep = self._after(view)
        if keep is None or self._protected is None:
            return keep
        still_there = self._protected[torch.isin(self._protected, view.kept)]
        return torch.unique(torch.cat([_sequence_indices(keep, self._layout), still_there]))

    def end_step(self, record: StepRecord) -> None:
        if record.kept_per_layer:
            self._learned_layers = len(record.kept_per_layer)     # the real depth, if the context did not say
        if not self._idle:
            self._end(record)
        self.state.finish_step()
        if record.info is None:
            record.info = {}
        record.info.update(self.last_info)

    # ------------------------------------------------------------------------------ caller helpers

    def observe_gap(self, seconds: float) -> bool:
        """Tell the method how long the input stream paused; resets after more than ``max_gap_s``."""
        if self.state.observe_gap(seconds):
            self._pending_reset = 'gap'
            self._reset_method()
            return True
        return False

    def observe_time(self, t: float) -> bool:
        """Tell the method the (monotonic) time of the current observation; resets after a long gap."""
        if self.state.observe_time(t):
            self._pending_reset = self.state.last_reset_reason
            self._reset_method()
            return True
        return False

    # ------------------------------------------------------------------------------- subclass hooks

    def _reset_method(self) -> None:
        """Clear method-specific state beyond ``self.state`` (called on every reset)."""

    def _begin(self, context: StepContext) -> StepPlan:
        return StepPlan()

    def _after(self, view: LayerView) -> Optional[torch.Tensor | VisualMask]:
        return None

    def _end(self, record: StepRecord) -> None:
        pass

    # ------------------------------------------------------------------------------------ utilities

    def _sync(self, context: StepContext) -> None:
        reason = ''
        if self._layout is not None and context.layout != self._layout:
            self.state.reset('layout changed')
            reason = 'layout changed'
        self._layout = context.layout
        if self.state.observe_instruction(context.instruction or None):
            reason = 'instruction'
        stamp = getattr(context, 'timestamp', None)
        if stamp is not None and self.state.observe_time(float(stamp)):
            reason = self.state.last_reset_reason
        if self.config.reset_on_step_index and self.state.observe_step_index(context.step_index):
            reason = 'step index restarted'
        n = int(getattr(context, 'num_layers', 0) or 0)
        self.num_layers = n if n > 0 else (self._learned_layers or self.config.num_layers)
        if reason:
            self._pending_reset = reason
            self._reset_method()

    def layer(self, layer: int) -> int:
        """Resolve a (possibly negative) configured layer against this step's decoder depth."""
        return resolve_layer(layer, self.num_layers)

    def requests(self, *items: tuple[int, str, str]) -> list[AttentionRequest]:
        """Deduplicated attention requests from (layer, rows, name) triples.

        Rows the layout cannot provide fall back (recorded in ``last_info['rows_fallback']``): 'text' -> 'prefill'
        when there is no text span, 'action' -> 'last' when there is no action span.
        """
        seen: set[tuple[int, str]] = set()
        out = []
        for layer, rows, name in items:
            rows = self._rows_for(rows)
            if (layer, name) not in seen:
                seen.add((layer, name))
                out.append(AttentionRequest(layer=layer, rows=rows, name=name))  # type: ignore[arg-type]
        return out

    def _rows_for(self, rows: str) -> str:
        layout = self._layout
        if layout is None:
            return rows
        fallback = None
        if rows == 'text' and layout.text_span[1] <= layout.text_span[0]:
            fallback = 'prefill'
        elif rows == 'action' and layout.action_span[1] <= layout.action_span[0]:
            fallback = 'last'
        if fallback is None:
            return rows
        self.last_info.setdefault('rows_fallback', {})[rows] = fallback
        return fallback

    def view_scores(self, view: LayerView, key: str, fill: float = 0.0) -> Optional[torch.Tensor]:
        """Dense visual scores of an attention summary in a LayerView (None if the runner did not provide it)."""
        weights = view.attention.get(key) if view.attention else None
        if weights is None:
            return None
        return dense_visual_scores(view.key_indices, weights, view_layout(self), fill=fill)

    def view_scores_on_device(self, view: LayerView, key: str, fill: float = 0.0) -> Optional[torch.Tensor]:
        """:meth:`view_scores` on the device of the attention weights (nothing is read back to the host)."""
        weights = view.attention.get(key) if view.attention else None
        if weights is None:
            return None
        return dense_visual_scores_on_device(view.key_indices, weights, view_layout(self), fill=fill)

    def record_scores(self, record: StepRecord, layer: int, key: str, fill: float = 0.0) -> Optional[torch.Tensor]:
        """Dense visual scores of an attention summary in a StepRecord (None if absent)."""
        entry = (record.attention or {}).get(layer, {}).get(key)
        if entry is None:
            return None
        keys, weights = entry
        return dense_visual_scores(keys, weights, record.layout, fill=fill)

    def record_scores_on_device(self, record: StepRecord, layer: int, key: str,
                                fill: float = 0.0) -> Optional[torch.Tensor]:
        """:meth:`record_scores` on the device of the attention weights (nothing is read back to the host)."""
        entry = (record.attention or {}).get(layer, {}).get(key)
        if entry is None:
            return None
        keys, weights = entry
        return dense_visual_scores_on_device(keys, weights, record.layout, fill=fill)

    def kept_visual(self, view: LayerView) -> torch.Tensor:
        """Dense visual mask of the visual tokens that ran through this layer."""
        return present_mask(view.kept, view_layout(self))


def protected_visual(layout: TokenLayout, regions: tuple) -> Optional[torch.Tensor]:
    """Sorted sequence indices of the patches whose centre lies in one of ``regions`` (None if there are none).

    A region is ``(camera, x0, y0, x1, y1)``: a camera number of the layout and a box in fractions of the image
    width (x, left to right) and height (y, top to bottom). Every method keeps these patches whatever it decides
    (they count in its kept tokens; VLA-Cache computes them afresh instead of reusing their keys and values):
    for a camera the policy cannot do without (the box (0, 0, 1, 1)), or a region a selection rule cannot see as
    important, e.g. the gripper fingers of a wrist camera, which sit still in its image so that change detection
    never flags them.
    """
    if not regions:
        return None
    check_regions(regions)
    rows, cols = layout.grid_shape
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    inside = torch.zeros(layout.num_cameras, rows, cols, dtype=torch.bool)
    for region in regions:
        camera, x0, y0, x1, y1 = region
        if not 0 <= int(camera) < layout.num_cameras:
            raise ValueError(f'keep region {region!r}: camera {camera} outside the layout\'s {layout.num_cameras}')
        inside[int(camera)] |= (((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :])
    starts = torch.tensor([start for start, _ in layout.camera_spans])
    patches = torch.nonzero(inside.flatten(1))
    if len(patches) == 0:
        return None
    return (starts[patches[:, 0]] + patches[:, 1]).sort().values


def check_regions(regions) -> None:
    """Raise ValueError unless every region is (camera, x0, y0, x1, y1) with 0 <= x0 <= x1 <= 1, the same for y.

    The camera number is checked against the layout at the first step.
    """
    for region in regions:
        try:
            camera, x0, y0, x1, y1 = (float(v) for v in region)
        except (TypeError, ValueError):
            raise ValueError(f'keep region {region!r}: expected (camera, x0, y0, x1, y1) numbers') from None
        if camera != int(camera) or not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
            raise ValueError(f'keep region {region!r}: camera must be an index and 0 <= x0 <= x1 <= 1, '
                             '0 <= y0 <= y1 <= 1 (fractions of the image)')


def _sequence_indices(keep: torch.Tensor | VisualMask, layout: TokenLayout) -> torch.Tensor:
    """A plan's token set as sequence indices (a visual mask's in camera order), to add protected tokens to."""
    if isinstance(keep, VisualMask):
        return mask_to_sequence_on_device(keep.mask, keep.count, layout)
    return torch.as_tensor(keep, dtype=torch.long)


def _as_regions(regions) -> tuple:
    return tuple(tuple(region) for region in regions)


@constant_tensors(maxsize=16)
def _protected_cached(layout: TokenLayout, regions: tuple) -> Optional[torch.Tensor]:
    """``protected_visual`` once per (layout, regions): it is asked every step (do not modify the result)."""
    return protected_visual(layout, regions)


def view_layout(method: PruningMethodBase) -> TokenLayout:
    if method._layout is None:
        raise RuntimeError('after_layer called before begin_step')
    return method._layout


def split_per_camera(dense: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, ...]:
    p = layout.patches_per_camera
    return tuple(dense[c * p:(c + 1) * p].clone() for c in range(layout.num_cameras))
