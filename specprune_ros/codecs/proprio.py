"""The proprio vector from the robot state the node receives: the reference VLA's pose layout, or joint positions.

Pose layouts (``POSE_LAYOUTS``), from the end-effector ``geometry_msgs/PoseStamped`` (position in metres in the
base frame) and ``finger_gap`` in metres (the sum of the finger joint positions of a ``sensor_msgs/JointState``, or
a ``std_msgs/Float64``):

* ``reference`` (the simulator's ``PROPRIO_LAYOUT``, the reference VLA): ``(tcp_x, tcp_y, tcp_z, sin(yaw),
  cos(yaw), finger_gap)``, yaw the heading of the tool x axis on the table plane;
* ``libero`` (OpenVLA-OFT's LIBERO checkpoints: robosuite's ``eef_pos``, ``quat2axisangle(eef_quat)``,
  ``gripper_qpos``): ``(x, y, z, axis-angle 3, finger_gap / 2, -finger_gap / 2)``, the Panda gripper's two finger
  joints as robosuite reports them.

Joint-position states (pi0 / pi0.5): the positions of the named joints of a ``sensor_msgs/JointState``, in the
policy's state order, matched by name (``joint_positions_by_name``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

PROPRIO_LAYOUT: tuple[str, ...] = ('tcp_x', 'tcp_y', 'tcp_z', 'sin_yaw', 'cos_yaw', 'finger_gap')
PROPRIO_DIM = len(PROPRIO_LAYOUT)
LIBERO_LAYOUT: tuple[str, ...] = ('x', 'y', 'z', 'axis_angle_x', 'axis_angle_y', 'axis_angle_z', 'finger_1', 'finger_2')
POSE_LAYOUTS: dict[str, tuple[str, ...]] = {'reference': PROPRIO_LAYOUT, 'libero': LIBERO_LAYOUT}


class StateError(ValueError):
    """A robot-state message that cannot be used."""


def yaw_from_quaternion(x: float, y: float, z: float, w: float) -> float:
    """Heading of the body x axis projected on the xy plane (radians)."""
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def axis_angle_from_quaternion(x: float, y: float, z: float, w: float) -> np.ndarray:
    """The rotation as axis * angle, exactly as robosuite's ``quat2axisangle`` gives it (what LIBERO policies saw).

    The angle is ``2 acos(w)`` in [0, 2 pi]: q and -q (the same rotation) give different vectors, as in robosuite.
    """
    quaternion = np.array([x, y, z, w], dtype=np.float64)
    quaternion /= np.linalg.norm(quaternion)
    w = min(max(quaternion[3], -1.0), 1.0)
    half_sin = math.sqrt(max(1.0 - w * w, 0.0))
    if half_sin < 1e-9:
        return np.zeros(3)
    return quaternion[:3] * 2.0 * math.acos(w) / half_sin


def proprio_vector(position: Sequence[float], quaternion_xyzw: Sequence[float], finger_gap: float,
                   layout: str = 'reference') -> np.ndarray:
    """The float32 proprio of ``layout`` (see the module docstring).

    Raises ``StateError`` on non-finite input or a zero quaternion.
    """
    values = np.asarray([*position, *quaternion_xyzw, finger_gap], dtype=np.float64)
    if values.shape != (8,) or not np.isfinite(values).all():
        raise StateError('robot state must be finite (position 3, quaternion 4, finger gap 1)')
    if np.linalg.norm(values[3:7]) < 1e-6:
        raise StateError('end-effector orientation is a zero quaternion')
    if layout == 'libero':
        gap = values[7]
        return np.array([*values[0:3], *axis_angle_from_quaternion(*values[3:7]), gap / 2, -gap / 2],
                        dtype=np.float32)
    if layout != 'reference':
        raise ValueError(f'pose layout must be one of {sorted(POSE_LAYOUTS)}, got {layout!r}')
    yaw = yaw_from_quaternion(*values[3:7])
    return np.array([*values[0:3], math.sin(yaw), math.cos(yaw), values[7]], dtype=np.float32)


def check_pose(position: Sequence[float], quaternion_xyzw: Sequence[float]) -> None:
    """Raise ``StateError`` for a non-finite end-effector pose or a zero quaternion."""
    values = np.asarray([*position, *quaternion_xyzw], dtype=np.float64)
    if values.shape != (7,) or not np.isfinite(values).all():
        raise StateError('end-effector pose must be finite (position 3, quaternion 4)')
    if np.linalg.norm(values[3:7]) < 1e-6:
        raise StateError('end-effector orientation is a zero quaternion')


def finger_gap_from_joints(names: Sequence[str], positions: Sequence[float], finger_joints: Sequence[str]) -> float:
    """Sum of the finger joint positions named ``finger_joints`` in a JointState."""
    if len(names) != len(positions):
        raise StateError(f'JointState has {len(names)} names but {len(positions)} positions')
    index = {name: i for i, name in enumerate(names)}
    missing = [joint for joint in finger_joints if joint not in index]
    if missing:
        raise StateError(f'JointState lacks finger joints {missing} (have {list(names)[:8]})')
    gap = float(sum(positions[index[joint]] for joint in finger_joints))
    if not math.isfinite(gap):
        raise StateError('finger joint positions are not finite')
    return gap


class ProprioAssembler:
    """Joins the newest end-effector pose with the newest gripper state; stamp (and arrival) = the older one."""

    def __init__(self, layout: str = 'reference') -> None:
        self.layout = layout
        self._pose: Optional[tuple[tuple[float, ...], tuple[float, ...], float]] = None
        self._gripper: Optional[tuple[float, float]] = None
        self._arrivals = {'pose': 0.0, 'gripper': 0.0}

    def put_pose(self, position: Sequence[float], quaternion_xyzw: Sequence[float], stamp: float,
                 arrived: float = 0.0) -> None:
        self._pose = (tuple(position), tuple(quaternion_xyzw), stamp)
        self._arrivals['pose'] = arrived

    def put_gripper(self, finger_gap: float, stamp: float, arrived: float = 0.0) -> None:
        self._gripper = (float(finger_gap), stamp)
        self._arrivals['gripper'] = arrived

    def arrived(self) -> float:
        """Arrival time (steady clock) of the older part: a part that stopped coming ages the whole state."""
        return min(self._arrivals.values())

    def latest(self) -> Optional[tuple[np.ndarray, float]]:
        """(proprio, stamp) once both parts arrived; raises ``StateError`` for unusable values."""
        if self._pose is None or self._gripper is None:
            return None
        position, quaternion, pose_stamp = self._pose
        gap, gripper_stamp = self._gripper
        return proprio_vector(position, quaternion, gap, self.layout), min(pose_stamp, gripper_stamp)


def joint_positions_by_name(names: Sequence[str], positions: Sequence[float],
                            wanted: Sequence[str]) -> np.ndarray:
    """The positions of the ``wanted`` joints, in that order, from a JointState's ``name`` / ``position``.

    The message may list its joints in any order and carry others; raises ``StateError`` when the lengths differ, a
    name repeats, a wanted joint is missing or a wanted position is not finite.
    """
    if len(names) != len(positions):
        raise StateError(f'JointState has {len(names)} names but {len(positions)} positions')
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        repeated = sorted({name for name in names if list(names).count(name) > 1})
        raise StateError(f'JointState names joints {repeated} more than once')
    missing = [joint for joint in wanted if joint not in index]
    if missing:
        raise StateError(f'JointState lacks joints {missing} (has {list(names)[:12]})')
    values = np.array([positions[index[joint]] for joint in wanted], dtype=np.float64)
    bad = [joint for joint, value in zip(wanted, values) if not math.isfinite(value)]
    if bad:
        raise StateError(f'JointState positions of {bad} are not finite')
    return values
