"""Joint-space policy action -> the joint command of this control tick, in the controller's order and limits.

A joint-space policy's action is a vector of joint targets (the checkpoint's units and order, named by the action
names). The command is, in order:

1. a malformed or non-finite action is a hold (counted; nothing new is commanded);
2. the targets of the controller's joints (``joint_names``), picked by name from the action;
3. each target clamped into its joint's position limits (``min_position`` / ``max_position``; counted);
   (from ``joint_limits.<joint>.*``, over the URDF's ``<limit>`` of the joint when ``robot_description`` is given);
4. each target's change limited to ``max_velocity`` x the control period against the reference: the previous command
   when it went out within two periods, else the measured position (``set_measured``), else the previous command;
   the first command without a measured position is only clamped (counted when it limits); a reference just past a
   limit steps from that limit. A measured position far beyond its joint's limits is refused (``measured_problem``),
   and a restart (activation, a clock jumping back) forgets the last command and the measurement.

On a hold nothing new is commanded: a ros2_control forward position controller keeps the last command it received,
so the arm stays where it was sent last. No twist is computed from joint actions (``twist`` is always zero).
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from specprune_ros.control.safety_filter import FilteredCommand

# ros2_control's joint_limits fields this filter applies; the other ones of that convention are accepted and ignored
APPLIED_LIMIT_FIELDS = ('has_position_limits', 'min_position', 'max_position', 'has_velocity_limits', 'max_velocity')
IGNORED_LIMIT_FIELDS = ('has_acceleration_limits', 'max_acceleration', 'has_deceleration_limits', 'max_deceleration',
                        'has_jerk_limits', 'max_jerk', 'has_effort_limits', 'max_effort', 'angle_wraparound',
                        'has_soft_limits', 'k_position', 'k_velocity', 'soft_lower_limit', 'soft_upper_limit')


MEASURED_LIMIT_MARGIN = 0.1     # a measured position may pass a limit by this share of the joint's range


class JointOrderError(ValueError):
    """The controller's joints, or the joint limits, do not fit the policy's action names."""


@dataclass(frozen=True)
class JointLimit:
    """Limits of one joint in the command's units (radians, metres); infinite = none."""

    min_position: float = -math.inf
    max_position: float = math.inf
    max_velocity: float = math.inf          # per second; the step per command is this x the control period


def _number(joint: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JointOrderError(f'joint_limits.{joint}.{name}: expected a finite number, got {value!r}')
    return float(value)


def _flag(joint: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise JointOrderError(f'joint_limits.{joint}.{name}: expected true or false, got {value!r}')
    return value


def joint_limit(joint: str, fields: Mapping[str, object]) -> JointLimit:
    """One joint's limits from ros2_control's ``joint_limits.<joint>.*`` fields.

    A limit given is applied unless its ``has_*_limits`` flag is false; unknown fields raise ``JointOrderError``.
    """
    if not isinstance(fields, Mapping):
        raise JointOrderError(f'joint_limits.{joint}: expected a mapping of limits (min_position, max_position, '
                              f'max_velocity), got {fields!r}')
    unknown = sorted(set(fields) - set(APPLIED_LIMIT_FIELDS) - set(IGNORED_LIMIT_FIELDS))
    if unknown:
        raise JointOrderError(f'joint_limits.{joint}: unknown field(s) {unknown}; applied: '
                              f'{list(APPLIED_LIMIT_FIELDS)}')
    low, high, speed = -math.inf, math.inf, math.inf
    if _flag(joint, 'has_position_limits', fields.get('has_position_limits', True)):
        if 'min_position' in fields:
            low = _number(joint, 'min_position', fields['min_position'])
        if 'max_position' in fields:
            high = _number(joint, 'max_position', fields['max_position'])
        if low > high:
            raise JointOrderError(f'joint_limits.{joint}: min_position {low} is above max_position {high}')
    if _flag(joint, 'has_velocity_limits', fields.get('has_velocity_limits', True)) and 'max_velocity' in fields:
        speed = _number(joint, 'max_velocity', fields['max_velocity'])
        if speed <= 0:
            raise JointOrderError(f'joint_limits.{joint}.max_velocity: {speed} must be positive')
    return JointLimit(low, high, speed)


def joint_limits_from_settings(settings: Mapping[str, Mapping[str, object]]) -> dict[str, JointLimit]:
    """{joint: JointLimit} from the nested ``joint_limits`` settings (raises ``JointOrderError``)."""
    return {joint: joint_limit(joint, fields) for joint, fields in settings.items()}


def urdf_joint_limits(urdf: str) -> dict[str, dict[str, float]]:
    """ros2_control-style limit fields of the joints of a URDF's ``<joint><limit/>`` (raises ``JointOrderError``).

    Revolute and prismatic joints give ``min_position`` / ``max_position`` (``lower`` / ``upper``), every joint with a
    positive ``velocity`` gives ``max_velocity``; fixed, floating and planar joints give none. '' = no joints.
    """
    if not urdf.strip():
        return {}
    try:
        robot = ElementTree.fromstring(urdf)
    except ElementTree.ParseError as error:
        raise JointOrderError(f'robot_description: not valid URDF XML: {error}') from None
    limits: dict[str, dict[str, float]] = {}
    for joint in robot.iter('joint'):
        name, kind, limit = joint.get('name'), joint.get('type'), joint.find('limit')
        if not name or limit is None or kind not in ('revolute', 'prismatic', 'continuous'):
            continue
        try:
            fields = {key: float(limit.get(attribute, 0.0)) for key, attribute in
                      (('min_position', 'lower'), ('max_position', 'upper'), ('max_velocity', 'velocity'))}
        except ValueError as error:
            raise JointOrderError(f'robot_description: joint {name!r}: {error}') from None
        if kind == 'continuous':
            fields.pop('min_position'), fields.pop('max_position')
        if fields['max_velocity'] <= 0:
            fields.pop('max_velocity')
        limits[name] = fields
    return limits


def merged_joint_limits(urdf: str, settings: Mapping[str, Mapping[str, object]],
                        joints: Sequence[str]) -> dict[str, JointLimit]:
    """The limits of ``joints``: the URDF's, with the ``joint_limits`` settings on top field by field."""
    from_urdf = {name: fields for name, fields in urdf_joint_limits(urdf).items() if name in joints}
    merged: dict[str, object] = dict(from_urdf)
    for name, fields in settings.items():
        merged[name] = {**from_urdf.get(name, {}), **fields} if isinstance(fields, Mapping) else fields
    return joint_limits_from_settings(merged)


def command_order(action_names: Sequence[str], joint_names: Sequence[str]) -> tuple[str, ...]:
    """The controller's joint order (``joint_names``; empty: the action names), checked against the actions."""
    order = tuple(joint_names) or tuple(action_names)
    repeated = sorted({name for name in order if order.count(name) > 1})
    if repeated:
        raise JointOrderError(f'joint_names: {repeated} listed more than once')
    missing = [name for name in order if name not in action_names]
    if missing:
        raise JointOrderError(f'joint_names: the controller joints {missing} are not among the policy actions '
                              f'{list(action_names)}; the policy cannot command them (set joint_names to the '
                              "controller's joints, or the checkpoint's action_names to the robot's joint names)")
    return order


class JointCommandFilter:
    """Same calls as ``SafetyFilter`` for joint-space actions; not thread-safe on its own."""

    COUNTERS = ('non_finite_actions', 'position_clamped', 'velocity_limited')

    def __init__(self, action_names: Sequence[str], joint_names: Sequence[str] = (),
                 limits: Optional[Mapping[str, JointLimit]] = None, period_s: float = 0.1) -> None:
        self.action_names = tuple(action_names)
        self.action_dim = len(self.action_names)
        self.joint_names = command_order(self.action_names, joint_names)
        limits = dict(limits or {})
        unknown = sorted(set(limits) - set(self.joint_names))
        if unknown:
            raise JointOrderError(f'joint_limits name joints {unknown} that are not commanded '
                                  f'(commanded: {list(self.joint_names)})')
        self.unlimited = [name for name in self.joint_names if name not in limits]
        chosen = [limits.get(name, JointLimit()) for name in self.joint_names]
        self._index = np.array([self.action_names.index(name) for name in self.joint_names], dtype=int)
        self._low = np.array([limit.min_position for limit in chosen])
        self._high = np.array([limit.max_position for limit in chosen])
        self._speed = np.array([limit.max_velocity for limit in chosen])
        self.period_s = period_s
        self.counts = {name: 0 for name in self.COUNTERS}
        self._last: Optional[np.ndarray] = None        # the last command (controller order)
        self._last_time = -math.inf
        self._last_action: Optional[np.ndarray] = None  # the last command as an action (policy order)
        self._measured: Optional[np.ndarray] = None    # measured positions of the commanded joints

    def restart(self) -> None:
        """Forget the last command's time and the measured positions: the next command starts from a new measurement.

        After a restart (activation, a clock jumping back) the arm may be anywhere: only a fresh joint state says.
        """
        self._last, self._last_time, self._measured = None, -math.inf, None

    def measured_problem(self, positions: Mapping[str, float]) -> str:
        """Why measured positions cannot be true ('' when they can): a commanded joint beyond its position limits.

        A reading may pass a limit by ``MEASURED_LIMIT_MARGIN`` of the joint's range (0.1 when a side is unlimited).
        """
        for name, low, high in zip(self.joint_names, self._low, self._high):
            value = positions.get(name)
            if value is None:
                continue
            margin = MEASURED_LIMIT_MARGIN * ((high - low) if np.isfinite(high - low) else 1.0)
            if not low - margin <= value <= high + margin:
                return (f'joint {name!r} measured at {value:g}, beyond its position limits [{low:g}, {high:g}] '
                        f'(by more than {margin:g}): a faulty reading or the wrong joint_limits')
        return ''

    @property
    def columns(self) -> tuple[int, ...]:
        """The action column of each commanded joint, in the controller's order."""
        return tuple(int(i) for i in self._index)

    def set_measured(self, positions: Mapping[str, float]) -> None:
        """The robot's measured joint positions by name; used when it has every commanded joint."""
        try:
            values = np.array([positions[name] for name in self.joint_names], dtype=np.float64)
        except KeyError:
            return
        if np.isfinite(values).all():
            self._measured = values

    def hold(self, reason: str, now: float) -> FilteredCommand:
        """No new joint command (the controller keeps the last one); executed = the last command."""
        executed = np.zeros(self.action_dim) if self._last_action is None else self._last_action.copy()
        return FilteredCommand(np.zeros(6), None, reason or 'hold', executed)

    def command(self, action: np.ndarray, now: float) -> FilteredCommand:
        """The joint command for one action (a hold when it is malformed or not finite)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            self.counts['non_finite_actions'] += 1
            return self.hold('policy produced a non-finite or malformed action', now)
        target = action[self._index]
        clamped = np.clip(target, self._low, self._high)
        if not np.array_equal(clamped, target):
            self.counts['position_clamped'] += 1
        limited = self._limit_step(clamped, now)
        if not np.isfinite(limited).all():
            self.counts['non_finite_actions'] += 1
            return self.hold('non-finite joint command after limiting (check joint_limits)', now)
        executed = action.copy()
        executed[self._index] = limited
        self._last, self._last_time, self._last_action = limited.copy(), now, executed.copy()
        return FilteredCommand(np.zeros(6), None, '', executed, joints=limited)

    def _limit_step(self, target: np.ndarray, now: float) -> np.ndarray:
        recent = self._last is not None and 0.0 <= now - self._last_time <= 2 * self.period_s
        reference = self._last if recent or self._measured is None else self._measured
        if reference is None:
            return target
        reference = np.clip(reference, self._low, self._high)     # a reading just past a limit steps from it
        elapsed = now - self._last_time if recent else self.period_s
        dt = min(max(elapsed, 0.0), self.period_s)
        step = np.where(np.isfinite(self._speed), self._speed * dt, np.inf)
        limited = np.clip(target, reference - step, reference + step)
        if not np.array_equal(limited, target):
            self.counts['velocity_limited'] += 1
        return np.clip(limited, self._low, self._high)   # a reference outside the limits: back into them first
