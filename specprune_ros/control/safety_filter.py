"""Normalised policy action -> bounded end-effector velocity and gripper command, or a hold.

Velocity = delta per policy step / policy period (what MoveIt Servo's TwistStamped input expects).
Order: NaN/Inf check (hold) -> clip to [-1, 1] -> scale -> clip per axis to the speed limits -> rate-limit
the change against the previous command (itself clipped to the current speed limits, so a lowered limit holds at
once) -> final finiteness check. Every intervention is counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

LINEAR, ANGULAR = slice(0, 3), slice(3, 6)
_STOPPED_AFTER_S = 0.5        # a previous command older than this no longer counts as the current velocity


@dataclass
class ActionUnits:
    """What |action| = 1 means (from the policy's ``ActionSpec``) and an overall slow-down factor."""

    translation_scale_m: float = 0.02
    rotation_scale_rad: float = 0.2
    period_s: float = 0.1
    action_scale: float = 1.0


@dataclass
class SafetyLimits:
    """Per-axis speed and acceleration limits, and how the gripper value is produced."""

    max_linear_speed: float = 0.25        # m/s per axis
    max_angular_speed: float = 2.5        # rad/s per axis
    max_linear_accel: float = 5.0         # m/s^2 per axis
    max_angular_accel: float = 50.0       # rad/s^2 per axis
    gripper_binarize: bool = True
    gripper_open_value: float = -1.0      # published when the policy says open (-1)
    gripper_closed_value: float = 1.0     # published when the policy says close (+1)


@dataclass
class FilteredCommand:
    """What to publish this tick."""

    twist: np.ndarray                     # (6,) linear m/s, angular rad/s; zeros on hold
    gripper: Optional[float]              # None on hold (the gripper keeps its last command)
    hold_reason: str = ''
    executed: np.ndarray = field(default_factory=lambda: np.zeros(7))  # the command in normalised units
    joints: Optional[np.ndarray] = None   # joint-space policies: the joint command (None on hold and for twists)

    @property
    def holding(self) -> bool:
        return bool(self.hold_reason)


class SafetyFilter:
    """Stateful (remembers the last command for rate limiting); not thread-safe on its own."""

    COUNTERS = ('non_finite_actions', 'clipped_normalised', 'clipped_linear_speed', 'clipped_angular_speed',
                'rate_limited')

    def __init__(self, units: ActionUnits, limits: SafetyLimits) -> None:
        self.units = units
        self.limits = limits
        self.counts = {name: 0 for name in self.COUNTERS}
        self._last_twist = np.zeros(6)
        self._last_time: Optional[float] = None
        self._last_gripper = -1.0

    def restart(self) -> None:
        """Start over at rest, on activation or a clock jumping back: the next command ramps up from zero."""
        self._last_twist, self._last_time = np.zeros(6), None

    def hold(self, reason: str, now: float) -> FilteredCommand:
        """Zero twist (stop now, no ramp), gripper untouched."""
        self._last_twist = np.zeros(6)
        self._last_time = now
        executed = np.zeros(7)
        executed[6] = self._last_gripper
        return FilteredCommand(np.zeros(6), None, reason or 'hold', executed)

    def command(self, action: np.ndarray, now: float) -> FilteredCommand:
        """The bounded command for a normalised 7-D action (a hold when it is not finite)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,) or not np.isfinite(action).all():
            self.counts['non_finite_actions'] += 1
            return self.hold('policy produced a non-finite or malformed action', now)
        if np.abs(action).max() > 1.0:
            self.counts['clipped_normalised'] += 1
            action = np.clip(action, -1.0, 1.0)
        units, limits = self.units, self.limits
        twist = np.empty(6)
        twist[LINEAR] = action[0:3] * units.translation_scale_m / units.period_s * units.action_scale
        twist[ANGULAR] = action[3:6] * units.rotation_scale_rad / units.period_s * units.action_scale
        twist[LINEAR] = self._clip(twist[LINEAR], limits.max_linear_speed, 'clipped_linear_speed')
        twist[ANGULAR] = self._clip(twist[ANGULAR], limits.max_angular_speed, 'clipped_angular_speed')
        twist = self._rate_limit(twist, now)
        if not np.isfinite(twist).all():
            self.counts['non_finite_actions'] += 1
            return self.hold('non-finite command after scaling (check the limits)', now)
        gripper_norm = float(np.clip(action[6], -1.0, 1.0))
        if limits.gripper_binarize:
            gripper_norm = 1.0 if gripper_norm >= 0.0 else -1.0
        gripper = limits.gripper_open_value + (gripper_norm + 1.0) / 2.0 * (
            limits.gripper_closed_value - limits.gripper_open_value)
        self._last_twist, self._last_time, self._last_gripper = twist, now, gripper_norm
        executed = np.concatenate([twist[LINEAR] * units.period_s / units.translation_scale_m,
                                   twist[ANGULAR] * units.period_s / units.rotation_scale_rad, [gripper_norm]])
        return FilteredCommand(twist, float(gripper), '', executed)

    def _clip(self, values: np.ndarray, limit: float, counter: str) -> np.ndarray:
        if np.abs(values).max() > limit:
            self.counts[counter] += 1
            return np.clip(values, -limit, limit)
        return values

    def _rate_limit(self, twist: np.ndarray, now: float) -> np.ndarray:
        if self._last_time is None or now - self._last_time > _STOPPED_AFTER_S:
            previous, dt = np.zeros(6), self.units.period_s
        else:   # a lowered speed limit holds from this tick: slowing down to it is never rate-limited
            previous, dt = self._last_twist.copy(), max(now - self._last_time, 1e-3)
            previous[LINEAR] = np.clip(previous[LINEAR], -self.limits.max_linear_speed, self.limits.max_linear_speed)
            previous[ANGULAR] = np.clip(previous[ANGULAR], -self.limits.max_angular_speed,
                                        self.limits.max_angular_speed)
        step = np.empty(6)
        step[LINEAR] = self.limits.max_linear_accel * dt
        step[ANGULAR] = self.limits.max_angular_accel * dt
        limited = np.clip(twist, previous - step, previous + step)
        if not np.array_equal(limited, twist):
            self.counts['rate_limited'] += 1
        return limited
