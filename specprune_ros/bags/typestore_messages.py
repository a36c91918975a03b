"""Building ``rosbags`` typestore messages (no rclpy) for the topics the simulator bridge publishes."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import cv2
import numpy as np

from specprune_ros.bridge.conversions import down_facing_quaternion, finger_joint_positions, stamp_parts


class TypestoreMessages:
    """Constructors bound to one typestore."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.types = store.types

    def time(self, ns: int):
        sec, nanosec = stamp_parts(ns)
        return self.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec)

    def header(self, ns: int, frame_id: str = ''):
        return self.types['std_msgs/msg/Header'](stamp=self.time(ns), frame_id=frame_id)

    def clock(self, ns: int):
        return self.types['rosgraph_msgs/msg/Clock'](clock=self.time(ns))

    def image(self, rgb: np.ndarray, ns: int, frame_id: str = 'camera'):
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        height, width = rgb.shape[:2]
        return self.types['sensor_msgs/msg/Image'](header=self.header(ns, frame_id), height=height, width=width,
                                                   encoding='rgb8', is_bigendian=0, step=width * 3,
                                                   data=rgb.reshape(-1).copy())

    def compressed_image(self, rgb: np.ndarray, ns: int, frame_id: str = 'camera', quality: int = 95):
        ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError('JPEG encoding failed')
        return self.types['sensor_msgs/msg/CompressedImage'](header=self.header(ns, frame_id), format='jpeg',
                                                             data=encoded.reshape(-1).astype(np.uint8))

    def string(self, text: str):
        return self.types['std_msgs/msg/String'](data=text)

    def float64(self, value: float):
        return self.types['std_msgs/msg/Float64'](data=float(value))

    def pose(self, position: Sequence[float], yaw: float, ns: int, frame_id: str = 'base_link'):
        t = self.types
        x, y, z, w = down_facing_quaternion(yaw)
        pose = t['geometry_msgs/msg/Pose'](
            position=t['geometry_msgs/msg/Point'](x=float(position[0]), y=float(position[1]), z=float(position[2])),
            orientation=t['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w))
        return t['geometry_msgs/msg/PoseStamped'](header=self.header(ns, frame_id), pose=pose)

    def finger_joints(self, gap: float, names: Sequence[str], ns: int, frame_id: str = 'base_link'):
        positions = np.array(finger_joint_positions(gap, len(names)), dtype=np.float64)
        empty = np.zeros(0, dtype=np.float64)
        return self.types['sensor_msgs/msg/JointState'](header=self.header(ns, frame_id), name=list(names),
                                                        position=positions, velocity=empty, effort=empty)

    def twist(self, values: Sequence[float], ns: int, frame_id: str = 'base_link'):
        t = self.types
        v = [float(x) for x in values]
        twist = t['geometry_msgs/msg/Twist'](linear=t['geometry_msgs/msg/Vector3'](x=v[0], y=v[1], z=v[2]),
                                             angular=t['geometry_msgs/msg/Vector3'](x=v[3], y=v[4], z=v[5]))
        return t['geometry_msgs/msg/TwistStamped'](header=self.header(ns, frame_id), twist=twist)

    def trajectory(self, actions: np.ndarray, ns: int, period_s: float, labels: Sequence[str],
                   frame_id: str = 'base_link'):
        t = self.types
        points = []
        for i, row in enumerate(np.asarray(actions, dtype=np.float64)):
            sec, nanosec = stamp_parts(int(round(i * period_s * 1e9)))
            empty = np.zeros(0, dtype=np.float64)
            points.append(t['trajectory_msgs/msg/JointTrajectoryPoint'](
                positions=row.copy(), velocities=empty, accelerations=empty, effort=empty,
                time_from_start=t['builtin_interfaces/msg/Duration'](sec=sec, nanosec=nanosec)))
        return t['trajectory_msgs/msg/JointTrajectory'](header=self.header(ns, frame_id), joint_names=list(labels),
                                                        points=points)

    def key_values(self, values: dict):
        kv = self.types['diagnostic_msgs/msg/KeyValue']
        return [kv(key=str(k), value=str(v)) for k, v in values.items()]

    def status(self, level: int, name: str, message: str, hardware_id: str = '', values: Optional[dict] = None):
        return self.types['diagnostic_msgs/msg/DiagnosticStatus'](
            level=level, name=name, message=message, hardware_id=hardware_id, values=self.key_values(values or {}))
