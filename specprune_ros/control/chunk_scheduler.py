"""Which action of which chunk to command at a given time.

Chunks are indexed by time: step ``i`` of a chunk computed from an observation taken at ``start`` belongs
to ``[start + i*P, start + (i+1)*P)`` with ``P`` the policy's control period. Steps that elapsed while
the model ran are therefore skipped without any bookkeeping, and the control timer may tick at any rate.

A new chunk either replaces the rest of the old one, or blends with it: the old chunk's action for the
same time gets weight ``blend_old_weight * blend_decay**k`` at the k-th step after the new chunk arrived
(temporal ensembling that fades the old plan out), until the old chunk's observation is older than
``max_chunk_age_s``.

The chunk deadline: the robot misses a deadline when a control tick finds no action to command because the
current chunk ran out (its last step is over, or its observation is older than ``max_chunk_age_s``) before the next
chunk arrived. ``time_left`` is how long the next inference may take, from now, before that happens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

ChunkMode = Literal['replace', 'blend']
_EPS = 1e-6
_MIN_WEIGHT = 1e-3


def control_rate_warning(control_rate_hz: float, period_s: float) -> str:
    """Why ticks at ``control_rate_hz`` miss steps of a policy stepping every ``period_s`` ('' when they do not).

    A tick commands the step whose window it falls in: with ticks further apart than the windows, steps in between
    are never commanded.
    """
    tick_s = 1.0 / control_rate_hz
    if tick_s <= period_s * (1.0 + 1e-6):
        return ''
    return (f'control_rate_hz {control_rate_hz:g} ticks every {tick_s:.3f} s, slower than the policy steps '
            f'({period_s:g} s per action): about {1.0 - period_s / tick_s:.0%} of its actions are never commanded '
            f'and the motion differs from the one it was trained on; set control_rate_hz to at least '
            f'{1.0 / period_s:g}')


@dataclass
class Chunk:
    """One inference's actions, anchored in time."""

    actions: np.ndarray        # (chunk_size, action_dim) normalised
    start: float               # time of step 0 (when the observation was taken)
    arrived: float             # when the chunk became available
    chunk_id: int

    def step_at(self, now: float, period: float) -> int:
        return int(math.floor((now - self.start) / period + _EPS))

    def end(self, settings: 'ChunkSettings') -> float:
        """When the chunk runs out: its last step is over or its observation too old, whichever comes first."""
        return self.start + min(len(self.actions) * settings.period_s, settings.max_chunk_age_s)

    def action_at(self, now: float, period: float) -> Optional[np.ndarray]:
        step = self.step_at(now, period)
        return self.actions[step] if 0 <= step < len(self.actions) else None


@dataclass
class ScheduledAction:
    """The action for now, or why there is none (``action`` None means hold)."""

    action: Optional[np.ndarray]
    reason: str = ''
    chunk_id: int = -1
    step: int = -1


@dataclass
class ChunkSettings:
    """Chunk handling (see the module docstring)."""

    period_s: float = 0.1
    mode: ChunkMode = 'replace'
    blend_old_weight: float = 0.5
    blend_decay: float = 0.5
    max_chunk_age_s: float = 0.6


class ChunkScheduler:
    """Holds the current (and, when blending, the previous) chunk; not thread-safe on its own."""

    def __init__(self, settings: ChunkSettings) -> None:
        self.settings = settings
        self.current: Optional[Chunk] = None
        self.previous: Optional[Chunk] = None
        self.blend_start = 0.0
        self._next_id = 0

    def accept(self, actions: np.ndarray, start: float, now: float) -> int:
        """Make ``actions`` the current chunk; returns the number of steps skipped (elapsed during inference)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f'a chunk must be (steps, action_dim), got shape {actions.shape}')
        period = self.settings.period_s
        old = self.current
        if self.settings.mode == 'blend' and old is not None and old.action_at(now, period) is not None:
            self.previous, self.blend_start = old, now
        else:
            self.previous = None
        self.current = Chunk(actions=actions, start=start, arrived=now, chunk_id=self._next_id)
        self._next_id += 1
        return max(0, self.current.step_at(now, period))

    def action_at(self, now: float) -> ScheduledAction:
        """The (possibly blended) action for ``now``, or a hold with its reason."""
        chunk, settings = self.current, self.settings
        if chunk is None:
            return ScheduledAction(None, 'waiting for the first action chunk')
        age = now - chunk.start
        if age >= settings.max_chunk_age_s - _EPS * settings.period_s:    # ran out at ``end``, as time_left says
            return ScheduledAction(None, f'newest action chunk is {age:.3f} s old (max_chunk_age_s '
                                   f'{settings.max_chunk_age_s}): inference is late')
        step = chunk.step_at(now, settings.period_s)
        if step >= len(chunk.actions):
            return ScheduledAction(None, f'action chunk exhausted ({len(chunk.actions)} steps): inference is late')
        action = chunk.actions[max(step, 0)]
        if self.previous is not None:
            action = self._blend(action, now)
        return ScheduledAction(action.copy(), '', chunk.chunk_id, step)

    def time_left(self, now: float) -> Optional[float]:
        """Seconds until the current chunk runs out (negative: it already has); None without a chunk."""
        return None if self.current is None else self.current.end(self.settings) - now

    def _blend(self, new_action: np.ndarray, now: float) -> np.ndarray:
        settings = self.settings
        old_action = self.previous.action_at(now, settings.period_s)
        # steps of the new chunk since the blend began: one weight per step, whatever the node's tick rate
        current = self.current
        k = max(0, current.step_at(now, settings.period_s) - current.step_at(self.blend_start, settings.period_s))
        weight = settings.blend_old_weight * settings.blend_decay ** k
        too_old = now - self.previous.start >= settings.max_chunk_age_s - _EPS * settings.period_s
        if old_action is None or weight < _MIN_WEIGHT or too_old:
            self.previous = None
            return new_action
        return weight * old_action + (1.0 - weight) * new_action

    def clear(self) -> None:
        """Drop every chunk (hold until the next one)."""
        self.current = None
        self.previous = None


@dataclass
class LateChunks:
    """How often chunks came too late for the robot (see ``late_chunks``)."""

    chunks: int = 0            # chunks that followed another one of the same episode
    late: int = 0              # ... and arrived after it had run out: the robot had no action for a while
    late_s: float = 0.0        # summed time without an action
    span_s: float = 0.0        # summed time between consecutive arrivals

    @property
    def late_fraction(self) -> float:
        return self.late / self.chunks if self.chunks else float('nan')

    @property
    def late_time_fraction(self) -> float:
        return self.late_s / self.span_s if self.span_s > 0 else float('nan')


def late_chunks(chunks: Sequence[tuple[float, float, bool]], chunk_steps: int, settings: ChunkSettings) -> LateChunks:
    """Deadline misses of a run of chunks: (observation time, arrival time, first of its episode) in order.

    A chunk is late when it arrives after the chunk before it ran out (``Chunk.end``): from then until it arrives
    the control ticks find no action and the robot holds.
    """
    horizon = min(chunk_steps * settings.period_s, settings.max_chunk_age_s)
    result = LateChunks()
    previous: Optional[tuple[float, float]] = None
    for observed, arrived, first in chunks:
        if previous is not None and not first:
            lateness = arrived - (previous[0] + horizon)
            result.chunks += 1
            result.late += int(lateness > 0)
            result.late_s += max(lateness, 0.0)
            result.span_s += max(arrived - previous[1], 0.0)
        previous = (observed, arrived)
    return result
