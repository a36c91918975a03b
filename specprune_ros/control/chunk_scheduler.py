"""Which action of which chunk to command at a given time.

Chunks are indexed by time: step ``i`` of a chunk computed from an observation taken at ``start`` belongs
to ``[start + i*P, start + (i+1)*P)`` with ``P`` the policy's control period. Steps that elapsed while
the model ran are therefore skipped without any bookkeeping, and the control timer may tick at any rate.

A new chunk either replaces the rest of the old one, or blends with it: the old chunk's action for the
same time gets weight ``blend_old_weight * blend_decay**k`` at the k-th step after the new chunk arrived
(temporal ensembling that fades the old plan out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

ChunkMode = Literal['replace', 'blend']
_EPS = 1e-6
_MIN_WEIGHT = 1e-3


@dataclass
class Chunk:
    """One inference's actions, anchored in time."""

    actions: np.ndarray        # (chunk_size, action_dim) normalised
    start: float               # time of step 0 (when the observation was taken)
    arrived: float             # when the chunk became available
    chunk_id: int

    def step_at(self, now: float, period: float) -> int:
        return int(math.floor((now - self.start) / period + _EPS))

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
        if age > settings.max_chunk_age_s:
            return ScheduledAction(None, f'newest action chunk is {age:.3f} s old (max_chunk_age_s '
                                   f'{settings.max_chunk_age_s}): inference is late')
        step = chunk.step_at(now, settings.period_s)
        if step >= len(chunk.actions):
            return ScheduledAction(None, f'action chunk exhausted ({len(chunk.actions)} steps): inference is late')
        action = chunk.actions[max(step, 0)]
        if self.previous is not None:
            action = self._blend(action, now)
        return ScheduledAction(action.copy(), '', chunk.chunk_id, step)

    def _blend(self, new_action: np.ndarray, now: float) -> np.ndarray:
        settings = self.settings
        old_action = self.previous.action_at(now, settings.period_s)
        k = max(0, int(math.floor((now - self.blend_start) / settings.period_s + _EPS)))
        weight = settings.blend_old_weight * settings.blend_decay ** k
        if old_action is None or weight < _MIN_WEIGHT:
            self.previous = None
            return new_action
        return weight * old_action + (1.0 - weight) * new_action

    def clear(self) -> None:
        """Drop every chunk (hold until the next one)."""
        self.current = None
        self.previous = None
