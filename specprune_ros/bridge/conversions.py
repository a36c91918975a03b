"""Robot-side units <-> the simulator's normalised 7-D action, and the robot state the bridge publishes.

The policy node commands ``TwistStamped`` velocities ``v = action * scale / period`` (see
``specprune_ros.control.safety_filter``) and a ``Float64`` gripper value mapped linearly from the normalised
gripper action (-1 open .. +1 close) onto ``[gripper_open_value, gripper_closed_value]``. The bridge inverts
both: ``action = v * period / scale`` and the gripper value back onto [-1, 1].

End-effector pose: the tool-centre point in the base frame with the gripper pointing straight down
(rotation of pi about x after the heading ``yaw`` about z), so the node's ``yaw_from_quaternion`` reads the
simulator's hand yaw back. Finger joints: the finger gap split evenly over the finger joints (the node sums them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ACTION_DIM = 7


@dataclass(frozen=True)
class CommandUnits:
    """What |action| = 1 means on the wire (defaults: the simulator's and the reference VLA's units)."""

    translation_scale_m: float = 0.02
    rotation_scale_rad: float = 0.2
    period_s: float = 0.1
    gripper_open_value: float = -1.0
    gripper_closed_value: float = 1.0

    def check(self) -> None:
        if self.translation_scale_m <= 0 or self.rotation_scale_rad <= 0 or self.period_s <= 0:
            raise ValueError(f'scales and period must be positive: {self}')
        if self.gripper_open_value == self.gripper_closed_value:
            raise ValueError('gripper_open_value and gripper_closed_value must differ')


def twist_to_action(twist: Sequence[float], units: CommandUnits = CommandUnits()) -> np.ndarray:
    """(vx, vy, vz, wx, wy, wz) in m/s and rad/s -> normalised (dx, dy, dz, droll, dpitch, dyaw).

    Non-finite values become 0 (a robot never moves on NaN); nothing is clipped here (the simulator clips).
    """
    values = np.asarray(twist, dtype=np.float64).reshape(-1)
    if values.shape != (6,):
        raise ValueError(f'a twist has 6 values, got shape {values.shape}')
    values = np.where(np.isfinite(values), values, 0.0)
    out = np.empty(6)
    out[0:3] = values[0:3] * units.period_s / units.translation_scale_m
    out[3:6] = values[3:6] * units.period_s / units.rotation_scale_rad
    return out


def action_to_twist(action: Sequence[float], units: CommandUnits = CommandUnits()) -> np.ndarray:
    """Inverse of ``twist_to_action`` on the first six values of a normalised action."""
    values = np.asarray(action, dtype=np.float64).reshape(-1)[:6]
    out = np.empty(6)
    out[0:3] = values[0:3] * units.translation_scale_m / units.period_s
    out[3:6] = values[3:6] * units.rotation_scale_rad / units.period_s
    return out


def gripper_value_to_action(value: float, units: CommandUnits = CommandUnits()) -> float:
    """A ``gripper_command`` value -> the normalised gripper action in [-1, 1] (non-finite: -1, open)."""
    if not math.isfinite(value):
        return -1.0
    span = units.gripper_closed_value - units.gripper_open_value
    return float(np.clip(-1.0 + 2.0 * (value - units.gripper_open_value) / span, -1.0, 1.0))


def gripper_action_to_value(action: float, units: CommandUnits = CommandUnits()) -> float:
    """Inverse of ``gripper_value_to_action``."""
    span = units.gripper_closed_value - units.gripper_open_value
    return float(units.gripper_open_value + (float(action) + 1.0) / 2.0 * span)


def command_to_action(twist: Sequence[float], gripper_action: float,
                      units: CommandUnits = CommandUnits()) -> np.ndarray:
    """The 7-D simulator action for a twist and a normalised gripper action, at float32 precision.

    Policies emit float32 actions; the unit conversions there and back leave float64 rounding (~1e-16) that
    rounding to float32 removes, so the simulator applies exactly what the policy emitted. Without it, the
    ~1e-16 difference moves a rendered pixel edge now and then and the closed loop over ROS parts ways with
    the ROS-free harness (measured: action differences up to 0.46 in 2 of 12 episodes).
    """
    action = np.concatenate([twist_to_action(twist, units), [float(gripper_action)]])
    return action.astype(np.float32).astype(np.float64)


def down_facing_quaternion(yaw: float) -> tuple[float, float, float, float]:
    """(x, y, z, w) of heading ``yaw`` about z followed by pi about x (tool z axis pointing down)."""
    half = 0.5 * float(yaw)
    return (math.cos(half), math.sin(half), 0.0, 0.0)


def finger_joint_positions(finger_gap: float, joints: int = 2) -> list[float]:
    """The finger gap split over ``joints`` prismatic finger joints."""
    if joints < 1:
        raise ValueError('at least one finger joint is needed')
    return [float(finger_gap) / joints] * joints


# --- simulation time: integer nanoseconds, so 0.1 s steps never accumulate rounding -------------------------
NANOSECONDS = 1_000_000_000


def seconds_to_ns(seconds: float) -> int:
    return int(round(seconds * NANOSECONDS))


def aligned_start_ns(wall_ns: int, period_ns: int) -> int:
    """``wall_ns`` rounded down to a multiple of the control period (keeps ROS timers in phase)."""
    return (int(wall_ns) // period_ns) * period_ns


def stamp_parts(ns: int) -> tuple[int, int]:
    """(sec, nanosec) of a non-negative time in nanoseconds."""
    return int(ns) // NANOSECONDS, int(ns) % NANOSECONDS
