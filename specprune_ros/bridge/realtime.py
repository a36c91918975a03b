"""Real-time mode: the commands in effect over one control period, as a fast servo would apply them.

The simulator keeps stepping every period of wall-clock time whatever the policy does. Each received
``TwistStamped`` is in effect from its arrival (sim time) until the next one, or until it is older than
``command_timeout_s`` (then the robot stops: zero velocity, like MoveIt Servo's incoming-command timeout).
A period's action is the time average of the velocities in effect during it (the displacement a servo
integrating them would produce); the gripper takes the latest command. Pure and thread-safe.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class PeriodCommand:
    """What one period got."""

    twist: np.ndarray              # (6,) time-averaged velocity over the period
    gripper: Optional[float]       # latest gripper command value (None: never received)
    stale_fraction: float          # share of the period with no fresh command (robot stopped)
    commands: int                  # twists that arrived during the period


class CommandTimeline:
    """Arrival-stamped twists; ``period_command(start, end)`` integrates them (times in ns of sim time)."""

    def __init__(self, command_timeout_ns: int) -> None:
        self.command_timeout_ns = int(command_timeout_ns)
        self.lock = threading.Lock()
        self._times: list[int] = []
        self._twists: list[np.ndarray] = []
        self._gripper: Optional[float] = None

    def clear(self, gripper: Optional[float] = None) -> None:
        with self.lock:
            self._times.clear()
            self._twists.clear()
            self._gripper = gripper

    def put_twist(self, arrival_ns: int, twist) -> None:
        values = np.asarray(twist, dtype=np.float64).reshape(6)
        values = np.where(np.isfinite(values), values, 0.0)
        with self.lock:
            index = bisect.bisect_right(self._times, arrival_ns)
            self._times.insert(index, int(arrival_ns))
            self._twists.insert(index, values)

    def put_gripper(self, value: float) -> None:
        with self.lock:
            self._gripper = float(value)

    def period_command(self, start_ns: int, end_ns: int) -> PeriodCommand:
        """Average velocity in effect over [start, end); forgets commands older than needed afterwards."""
        if end_ns <= start_ns:
            raise ValueError('empty period')
        with self.lock:
            times, twists = self._times, self._twists
            first = max(bisect.bisect_right(times, start_ns) - 1, 0)
            total = np.zeros(6)
            stale = 0
            arrived = 0
            cursor = start_ns
            index = first
            # the command in effect at `cursor` is the last one with time <= cursor (if fresh)
            while cursor < end_ns:
                while index + 1 < len(times) and times[index + 1] <= cursor:
                    index += 1
                nxt = end_ns
                if index + 1 < len(times) and times[index + 1] < end_ns:
                    nxt = min(nxt, times[index + 1])
                active = None
                if times and times[index] <= cursor:
                    expires = times[index] + self.command_timeout_ns
                    if cursor < expires:
                        active = twists[index]
                        nxt = min(nxt, expires)
                span = nxt - cursor
                if active is None:
                    stale += span
                else:
                    total += active * span
                cursor = nxt
            arrived = sum(1 for t in times if start_ns <= t < end_ns)
            # keep the command in effect at end_ns and everything after it
            keep = max(bisect.bisect_right(times, end_ns) - 1, 0)
            del times[:keep]
            del twists[:keep]
            duration = end_ns - start_ns
            return PeriodCommand(twist=total / duration, gripper=self._gripper, stale_fraction=stale / duration,
                                 commands=arrived)
