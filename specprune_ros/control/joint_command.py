"""Joint-space policy action -> the joint command of this control tick, or a hold.

A joint-space policy's action is a vector of joint targets (the checkpoint's units and order). The command is that
vector as it is; a malformed or non-finite action is a hold. On a hold nothing new is commanded: a ros2_control
forward position controller keeps the last command it received, so the arm stays where it was sent last. No twist
is computed from joint actions (``twist`` is always zero and is not published for joint-space policies).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from specprune_ros.control.safety_filter import FilteredCommand


class JointCommandFilter:
    """Same calls as ``SafetyFilter`` for joint-space actions; not thread-safe on its own."""

    COUNTERS = ('non_finite_actions',)

    def __init__(self, action_dim: int) -> None:
        self.action_dim = action_dim
        self.counts = {name: 0 for name in self.COUNTERS}
        self._last: Optional[np.ndarray] = None

    def hold(self, reason: str, now: float) -> FilteredCommand:
        """No new joint command (the controller keeps the last one); executed = the last command."""
        executed = np.zeros(self.action_dim) if self._last is None else self._last.copy()
        return FilteredCommand(np.zeros(6), None, reason or 'hold', executed)

    def command(self, action: np.ndarray, now: float) -> FilteredCommand:
        """The joint command for one action (a hold when it is malformed or not finite)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            self.counts['non_finite_actions'] += 1
            return self.hold('policy produced a non-finite or malformed action', now)
        self._last = action.copy()
        return FilteredCommand(np.zeros(6), None, '', action.copy(), joints=action.copy())
