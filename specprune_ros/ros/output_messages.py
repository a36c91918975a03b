"""Building the node's output messages (and reading stamps) from plain values.

Chunk message (``~/action_chunk``, ``trajectory_msgs/JointTrajectory``), one per inference:
  * ``header.stamp``: stamp of the newest camera frame the chunk was computed from;
    ``header.frame_id``: the command frame (the policy acts in the robot base frame);
  * ``joint_names``: the policy's ``action_spec.action_names``: for end-effector policies the labels
    ``dx, dy, dz, droll, dpitch, dyaw, gripper``, for joint-space policies the controller's joints (the node's
    ``joint_names``, default: the checkpoint's action names) with each point's positions picked by name;
  * ``points[i].positions``: step i; end-effector policies in normalised units ([-1, 1]; x ``translation_scale_m``
    metres, x ``rotation_scale_rad`` radians; gripper -1 open / +1 close), joint-space policies in the checkpoint's
    units; ``time_from_start`` = i * policy period.
Joint command (joint-space policies, ``std_msgs/Float64MultiArray``), one per control tick while commanding: the
  current step's joint targets in the controller's ``joint_names`` order, within the joint limits (what a
  ros2_control forward command controller takes). The chunk's points are the policy's plan, not limited.
Inference record (``~/inference``, ``diagnostic_msgs/DiagnosticStatus``), one per inference, same order:
  keys ``source_stamp`` (sec.nanosec of the chunk header), ``chunk_id``, ``observation_time`` (node clock when
  the observation was taken: the time of step 0), ``accepted_time`` (when the chunk became the plan; with
  publish_on_new_chunk its first command is stamped right after), ``model_latency_ms``,
  ``inference_latency_ms``, ``skipped_steps``, ``kept_ratio``, ``controller_mode``, ``steps_since_reset``,
  ``policy_step_index``, ``reset_reason``; with a latency budget also ``budget_method`` (the method that ran),
  ``budget_knob`` (its keep ratio or SpecPrune's K scale; n/a while the method runs its own setting),
  ``predicted_latency_ms`` (the predicted percentile latency) and ``latency_budget_ms``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from sensor_msgs.msg import Image
from std_msgs.msg import Float64, Float64MultiArray
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from specprune_ros.control.controller import AcceptedChunk
from specprune_ros.policy.interface import ACTION_LABELS


def stamp_seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def to_stamp(seconds: float) -> Time:
    nanoseconds = int(round(seconds * 1e9))
    return Time(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


def stamp_text(stamp: Time) -> str:
    """'sec.nanosec' with nine digits: exact, and what tests and benchmarks match on."""
    return f'{stamp.sec}.{stamp.nanosec:09d}'


def twist_message(twist: np.ndarray, stamp: Time, frame_id: str) -> TwistStamped:
    """The TwistStamped of (vx, vy, vz, wx, wy, wz); anything non-finite becomes a zero twist."""
    values = np.asarray(twist, dtype=np.float64)
    if values.shape != (6,) or not np.isfinite(values).all():
        values = np.zeros(6)
    message = TwistStamped()
    message.header.stamp = stamp
    message.header.frame_id = frame_id
    linear, angular = message.twist.linear, message.twist.angular
    linear.x, linear.y, linear.z, angular.x, angular.y, angular.z = (float(v) for v in values)
    return message


def gripper_message(value: float, command_type: str = 'float64') -> Optional[Union[Float64, Float64MultiArray]]:
    """The gripper command as ``std_msgs/Float64`` or ``std_msgs/Float64MultiArray``; None if not finite.

    With ``'float64_array'`` a one-element ``std_msgs/Float64MultiArray``, as a ros2_control
    forward_command_controller's ``~/commands`` takes.
    """
    if not math.isfinite(value):
        return None
    if command_type == 'float64_array':
        return Float64MultiArray(data=[float(value)])
    return Float64(data=float(value))


def joint_command_message(joints: Optional[np.ndarray]) -> Optional[Float64MultiArray]:
    """The joint targets as a ``std_msgs/Float64MultiArray``; None when there are none or any is not finite."""
    if joints is None:
        return None
    values = np.asarray(joints, dtype=np.float64).reshape(-1)
    if not values.size or not np.isfinite(values).all():
        return None
    return Float64MultiArray(data=[float(v) for v in values])


def chunk_message(chunk: AcceptedChunk, period_s: float, frame_id: str, names: Sequence[str] = ACTION_LABELS,
                  columns: Optional[Sequence[int]] = None) -> JointTrajectory:
    """The chunk as a JointTrajectory named by ``names`` (see the module docstring).

    ``columns``: the action column of each name (default: all, in order).
    """
    message = JointTrajectory()
    message.header.stamp = to_stamp(chunk.source_stamp)
    message.header.frame_id = frame_id
    message.joint_names = list(names)
    actions = chunk.actions if columns is None else np.asarray(chunk.actions)[:, list(columns)]
    for i, action in enumerate(actions):
        nanoseconds = int(round(i * period_s * 1e9))
        point = JointTrajectoryPoint(positions=[float(v) for v in action])
        point.time_from_start = Duration(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)
        message.points.append(point)
    return message


def inference_message(chunk: AcceptedChunk, node_name: str, model: str, method: str) -> DiagnosticStatus:
    values = {
        'source_stamp': stamp_text(to_stamp(chunk.source_stamp)),
        'chunk_id': str(chunk.chunk_id),
        'observation_time': stamp_text(to_stamp(chunk.observed)),
        'request_time': stamp_text(to_stamp(chunk.started)),
        'accepted_time': stamp_text(to_stamp(chunk.started + chunk.inference_latency_s)),
        'model_latency_ms': f'{chunk.model_latency_s * 1e3:.3f}',
        'inference_latency_ms': f'{chunk.inference_latency_s * 1e3:.3f}',
        'skipped_steps': str(chunk.skipped_steps),
        'kept_ratio': 'n/a' if chunk.kept_ratio is None else f'{chunk.kept_ratio:.4f}',
        'controller_mode': chunk.controller_mode,
        'steps_since_reset': str(chunk.steps_since_reset),
        'policy_step_index': str(chunk.policy_info.get('step_index', 'n/a')),
        'reset_reason': chunk.reset_reason or 'none',
    }
    budget = chunk.budget
    if budget is not None:
        values.update({'budget_method': budget.method,
                       'budget_knob': 'n/a' if budget.knob is None else f'{budget.knob:.4f}',
                       'predicted_latency_ms': 'n/a' if budget.predicted_s is None
                       else f'{budget.predicted_s * 1e3:.3f}',
                       'latency_budget_ms': f'{budget.budget_s * 1e3:.3f}'})
    return DiagnosticStatus(level=DiagnosticStatus.OK, name=node_name, message=method, hardware_id=model,
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])


def diagnostics_message(level: int, name: str, message: str, hardware_id: str,
                        rows: Sequence[tuple[str, str]], stamp: Time) -> DiagnosticArray:
    status = DiagnosticStatus(level=bytes([level]), name=name, message=message[:500], hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=str(v)) for k, v in rows])
    array = DiagnosticArray(status=[status])
    array.header.stamp = stamp
    return array


def rgb_image_message(rgb: np.ndarray, stamp: Time, frame_id: str = '') -> Image:
    message = Image(height=int(rgb.shape[0]), width=int(rgb.shape[1]), encoding='rgb8', is_bigendian=0,
                    step=int(rgb.shape[1] * 3))
    message.header.stamp = stamp
    message.header.frame_id = frame_id
    message.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return message


def values_of(status: DiagnosticStatus) -> dict[str, str]:
    """The KeyValues of a DiagnosticStatus as a dict (tests, benchmarks)."""
    return {kv.key: kv.value for kv in status.values}
