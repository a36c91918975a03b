"""Step-synchronous mode: knowing when the policy node has answered the observation of tick ``k``.

The protocol (the policy node runs with ``use_sim_time: true``; sim time only moves when the bridge says so):

1. The bridge steps the physics, publishes the robot state stamped ``t_k``, then ``/clock = t_k`` (exactly one
   control period after ``t_{k-1}``).
2. The clock advance fires the node's control timer once (a ROS timer on sim time fires once per clock jump of
   one period): it publishes one ``TwistStamped`` stamped ``t_k``, the current chunk's action for ``t_k`` or a
   hold (zero twist) when the chunk is used up. The bridge waits for that twist (at most ``timer_wait_s``) and only
   then publishes the camera frames stamped ``t_k``: the node has surely taken the clock (and the state sent
   before it) when the frames arrive, and the timer never fires in the middle of an inference. Frames go out
   only on ticks where an inference is expected (unused frames of an earlier tick would let the node's worker,
   which also polls every 0.5 s, start an inference on them right after the clock advance); so the node's
   ``max_image_age_s`` must cover ``replan_every_steps`` periods, and its ``max_camera_skew_s`` must be below
   one period so that the first new frame is not paired with the other camera's previous one
   (config/sim_bridge.yaml: 1.0 s and 0.05 s). The state stamped ``t_k`` reaches the node before ``/clock = t_k``,
   so the node's ``max_future_stamp_s`` must exceed one period (0.2 s there).
3. When an inference is due (the node re-plans every ``replan_every_steps`` ticks, and at the first tick of an
   episode), the new frames start one; sim time stands still meanwhile, so the chunk is accepted at ``t_k``:
   the node publishes its first command at once (``publish_on_new_chunk``), again stamped ``t_k``, and the
   chunk on ``~/action_chunk`` with ``header.stamp = t_k``.
4. The command for tick ``k`` is the *last* ``TwistStamped`` stamped ``t_k`` (what a servo would do with two
   commands for the same instant), with the latest gripper command. The gate calls the tick answered when:
   a twist stamped ``t_k`` arrived; if an inference is expected, the chunk stamped ``t_k`` arrived and two
   twists stamped ``t_k`` (timer + new chunk) did; every non-zero twist has its gripper command (the node
   publishes one right after each non-hold twist). As a fallback (a timer out of phase, a node configured
   differently), a tick with at least one twist is also answered once nothing arrived for ``settle_s``.

Whether an inference is expected mirrors the node's rule: the first tick of an episode, or
``t_k - t_last_chunk >= replan_every_steps * period`` (minus 1 ms of rounding; the node allows half a period, which
on the simulator's exact period grid picks the same ticks). Everything here is pure and thread-safe.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

DUE_TOLERANCE_NS = 1_000_000      # rounding of "an inference is due" on the period grid (1 ms)


@dataclass
class TickAnswer:
    """What the bridge applies for one tick, and how it got it."""

    twist: np.ndarray                 # (6,) m/s, rad/s (zeros when nothing arrived or on a timeout)
    gripper: Optional[float]          # latest gripper_command value (None: never received, or a timeout)
    twists: int                       # TwistStamped messages stamped with this tick
    inference: bool                   # a new chunk for this tick arrived
    expected_inference: bool
    how: str                          # 'complete', 'settled' or 'timeout'


@dataclass
class GateCounters:
    late_commands: int = 0            # twists stamped before the current tick (arrived after it was decided)
    idle_commands: int = 0            # twists between ticks (the node's timer on the clock moves between episodes)
    future_commands: int = 0          # twists stamped after the current tick (clock mismatch)
    settled_ticks: int = 0
    timeouts: int = 0
    missing_inferences: int = 0       # expected an inference, none came (check replan_every_steps)
    extra_inferences: int = 0         # a chunk came when none was expected
    timer_waits_expired: int = 0      # the node's timer did not answer a clock advance within timer_wait_s


@dataclass
class _Tick:
    stamp_ns: int
    expected_inference: bool
    twists: list = field(default_factory=list)
    nonzero_twists: int = 0
    grippers: int = 0
    chunk: bool = False
    last_event: float = 0.0


class TickGate:
    """See the module docstring. ``now`` arguments are wall-clock seconds (``time.monotonic``)."""

    def __init__(self, replan_every_steps: int, period_ns: int, settle_s: float = 1.0) -> None:
        if replan_every_steps < 1 or period_ns <= 0:
            raise ValueError('replan_every_steps must be >= 1 and period_ns > 0')
        self.replan_every_steps = int(replan_every_steps)
        self.period_ns = int(period_ns)
        self.settle_s = float(settle_s)
        self.counters = GateCounters()
        self.condition = threading.Condition()
        self._tick: Optional[_Tick] = None
        self._last_chunk_ns: Optional[int] = None
        self._gripper: Optional[float] = None
        self._stopped = False

    def stop(self) -> None:
        """Wake every waiter now, and make later waits return at once (the run is being interrupted)."""
        with self.condition:
            self._stopped = True
            self.condition.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # --- bridge side -----------------------------------------------------------------------------------
    def begin_episode(self) -> None:
        with self.condition:
            self._last_chunk_ns = None
            self._tick = None

    def begin_tick(self, stamp_ns: int, now: float) -> bool:
        """Start waiting for the answer to the observation stamped ``stamp_ns``.

        Returns whether an inference is expected. Call it *before* publishing the clock (answers can be fast).
        """
        with self.condition:
            expected = self.inference_due(stamp_ns)
            self._tick = _Tick(stamp_ns=int(stamp_ns), expected_inference=expected, last_event=now)
            return expected

    def inference_due(self, stamp_ns: int) -> bool:
        if self._last_chunk_ns is None:
            return True
        replan_ns = self.replan_every_steps * self.period_ns
        return stamp_ns - self._last_chunk_ns >= replan_ns - DUE_TOLERANCE_NS

    def status(self, now: float) -> str:
        """'waiting', 'complete' or 'settled' (answered by the fallback)."""
        with self.condition:
            return self._status_locked(now)

    def _status_locked(self, now: float) -> str:
        tick = self._tick
        if tick is None or not tick.twists:
            return 'waiting'
        grippers_ok = tick.grippers >= tick.nonzero_twists
        if tick.expected_inference:
            complete = tick.chunk and len(tick.twists) >= 2 and grippers_ok
        else:
            complete = grippers_ok
        if complete:
            return 'complete'
        quiet = now - tick.last_event >= self.settle_s
        if quiet and (tick.chunk or not tick.expected_inference):
            return 'settled'
        return 'waiting'

    def wait(self, timeout_s: float, clock=None) -> str:
        """Block until the tick is answered or ``timeout_s`` passes; returns the status ('waiting' on timeout).

        Returns at once after ``stop()``.
        """
        import time
        clock = clock or time.monotonic
        deadline = clock() + timeout_s
        with self.condition:
            while True:
                now = clock()
                status = self._status_locked(now)
                if status != 'waiting' or now >= deadline or self._stopped:
                    return status
                self.condition.wait(min(deadline - now, max(self.settle_s / 4, 0.005)))

    def wait_first_twist(self, timeout_s: float) -> bool:
        """Block until a twist stamped with the current tick arrived (the node's timer answered the clock)."""
        import time
        deadline = time.monotonic() + timeout_s
        with self.condition:
            while self._tick is not None and not self._tick.twists and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.condition.wait(min(remaining, 0.05))
            return True

    def answer(self, how: str) -> TickAnswer:
        """Close the tick: the command to apply.

        A zero twist when nothing arrived or the tick timed out (a partial answer is never applied); ``gripper`` is
        then None (the caller keeps the gripper where it is).
        """
        with self.condition:
            tick = self._tick
            if tick is None:
                raise RuntimeError('answer() without begin_tick()')
            if how == 'settled':
                self.counters.settled_ticks += 1
            elif how == 'timeout':
                self.counters.timeouts += 1
            if tick.expected_inference and not tick.chunk:
                self.counters.missing_inferences += 1
            timed_out = how == 'timeout'
            twist = tick.twists[-1] if tick.twists and not timed_out else np.zeros(6)
            self._tick = None
            return TickAnswer(twist=np.array(twist, dtype=np.float64), gripper=None if timed_out else self._gripper,
                              twists=len(tick.twists), inference=tick.chunk,
                              expected_inference=tick.expected_inference, how=how)

    def reset_gripper(self, value: Optional[float]) -> None:
        with self.condition:
            self._gripper = value

    # --- subscription callbacks ------------------------------------------------------------------------
    def on_twist(self, stamp_ns: int, twist, now: float) -> None:
        values = np.asarray(twist, dtype=np.float64)
        with self.condition:
            tick = self._tick
            if tick is None:
                self.counters.idle_commands += 1
                return
            if stamp_ns < tick.stamp_ns:
                self.counters.late_commands += 1
                return
            if stamp_ns > tick.stamp_ns:
                self.counters.future_commands += 1
                return
            tick.twists.append(values)
            tick.nonzero_twists += int(bool(np.any(values != 0.0)))
            tick.last_event = now
            self.condition.notify_all()

    def on_gripper(self, value: float, now: float) -> None:
        with self.condition:
            self._gripper = float(value)
            if self._tick is not None:
                self._tick.grippers += 1
                self._tick.last_event = now
            self.condition.notify_all()

    def on_chunk(self, stamp_ns: int, now: float) -> None:
        with self.condition:
            if self._last_chunk_ns is None or stamp_ns > self._last_chunk_ns:
                self._last_chunk_ns = int(stamp_ns)
            tick = self._tick
            if tick is not None and stamp_ns == tick.stamp_ns:
                if not tick.expected_inference:
                    self.counters.extra_inferences += 1
                tick.chunk = True
                tick.last_event = now
            self.condition.notify_all()
