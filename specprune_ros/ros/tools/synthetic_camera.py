r"""Publish synthetic camera frames, an instruction and the robot state, as a robot would.

    python -m specprune_ros.ros.tools.synthetic_camera --rate 30 --size 96 \
        --camera agentview=camera/agentview/image_raw:raw --camera wrist=camera/wrist/image_raw:compressed \
        --instruction "pick up the red cube" --duration 10

Frames show a coloured square that moves a little every frame (so temporal pruning sees motion), are
stamped with the current time, and go out with sensor-data QoS. The end-effector pose (PoseStamped on
``ee_pose``) and finger joints (JointState on ``gripper_state``) are published at the same rate.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import cv2
import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from specprune_ros.codecs.image_decoding import encode_raw_image
from specprune_ros.command_line import HelpFormatter

INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
STATE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)


def synthetic_frame(index: int, size: int, camera: int = 0) -> np.ndarray:
    """(size, size, 3) RGB: a gradient background and a square that drifts with ``index``."""
    ramp = np.linspace(40, 200, size, dtype=np.float32)
    frame = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 90.0)], -1)
    side = max(2, size // 6)
    x = int((size - side) * (0.5 + 0.4 * np.sin(index * 0.05 + camera)))
    y = int((size - side) * (0.5 + 0.4 * np.cos(index * 0.03 + camera)))
    frame[y:y + side, x:x + side] = (220, 30, 30)
    return frame.astype(np.uint8)


def raw_image_message(rgb: np.ndarray, stamp, encoding: str = 'rgb8', frame_id: str = 'camera') -> Image:
    height, width, step, data = encode_raw_image(rgb, encoding)
    message = Image(height=height, width=width, encoding=encoding, is_bigendian=0, step=step)
    message.header.stamp, message.header.frame_id = stamp, frame_id
    message.data = data
    return message


def compressed_image_message(rgb: np.ndarray, stamp, frame_id: str = 'camera') -> CompressedImage:
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    message = CompressedImage(format='jpeg')
    message.header.stamp, message.header.frame_id = stamp, frame_id
    message.data = encoded.tobytes()
    return message


def parse_camera(text: str) -> tuple[str, str, str]:
    """'name=topic[:raw|compressed]' -> (name, topic, transport)."""
    name, _, rest = text.partition('=')
    topic, _, transport = rest.partition(':')
    transport = transport or 'raw'
    if not name or not topic or transport not in ('raw', 'compressed'):
        raise argparse.ArgumentTypeError(f'expected name=topic[:raw|compressed], got {text!r}')
    return name, topic, transport


class SyntheticCamera(Node):
    """Publishes frames (and state) from a timer; ``instruction`` once, transient-local."""

    def __init__(self, cameras: list[tuple[str, str, str]], rate_hz: float, size: int, instruction: str,
                 finger_joints: tuple[str, ...] = ('finger_joint1', 'finger_joint2'),
                 publish_state: bool = True, stamp_offset_s: float = 0.0) -> None:
        super().__init__('synthetic_camera')
        self.size, self.index, self.stamp_offset_s = size, 0, stamp_offset_s
        self.finger_joints = finger_joints
        self.cameras = []
        for number, (name, topic, transport) in enumerate(cameras):
            kind = CompressedImage if transport == 'compressed' else Image
            self.cameras.append((number, name, transport, self.create_publisher(kind, topic, qos_profile_sensor_data)))
        self.instruction_pub = self.create_publisher(String, 'instruction', INSTRUCTION_QOS)
        if instruction:
            self.instruction_pub.publish(String(data=instruction))
        self.pose_pub = self.create_publisher(PoseStamped, 'ee_pose', STATE_QOS) if publish_state else None
        self.joint_pub = self.create_publisher(JointState, 'gripper_state', STATE_QOS) if publish_state else None
        self.published = 0
        self.create_timer(1.0 / rate_hz, self.publish_once)

    def stamp(self):
        now = self.get_clock().now()
        return (now - Duration(nanoseconds=int(self.stamp_offset_s * 1e9))).to_msg() \
            if self.stamp_offset_s else now.to_msg()

    def publish_once(self) -> None:
        stamp = self.stamp()
        for number, name, transport, publisher in self.cameras:
            rgb = synthetic_frame(self.index, self.size, number)
            if transport == 'compressed':
                publisher.publish(compressed_image_message(rgb, stamp, name))
            else:
                publisher.publish(raw_image_message(rgb, stamp, frame_id=name))
        if self.pose_pub is not None:
            pose = PoseStamped()
            pose.header.stamp, pose.header.frame_id = stamp, 'base_link'
            pose.pose.position.x, pose.pose.position.z = 0.05 * np.sin(self.index * 0.02), 0.15
            pose.pose.orientation.w = 1.0
            self.pose_pub.publish(pose)
            joints = JointState(name=list(self.finger_joints), position=[0.02] * len(self.finger_joints))
            joints.header.stamp = stamp
            self.joint_pub.publish(joints)
        self.index += 1
        self.published += 1


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--camera', action='append', type=parse_camera, dest='cameras',
                        help='name=topic[:raw|compressed] (repeatable)')
    parser.add_argument('--rate', type=float, default=30.0, help='frames per second')
    parser.add_argument('--size', type=int, default=96, help='square frame side in pixels')
    parser.add_argument('--instruction', default='pick up the red cube',
                        help='instruction published (latched) on /instruction')
    parser.add_argument('--duration', type=float, default=0.0, help='seconds to run (0 = until interrupted)')
    parser.add_argument('--no-state', action='store_true', help='do not publish ee_pose / gripper_state')
    parser.add_argument('--stamp-offset', type=float, default=0.0, help='stamp frames this many seconds in the past')
    args, ros_args = parser.parse_known_args(argv)
    cameras = args.cameras or [('agentview', 'camera/agentview/image_raw', 'raw'),
                               ('wrist', 'camera/wrist/image_raw', 'raw')]
    rclpy.init(args=ros_args)
    node = SyntheticCamera(cameras, args.rate, args.size, args.instruction, publish_state=not args.no_state,
                           stamp_offset_s=args.stamp_offset)
    deadline = time.monotonic() + args.duration if args.duration > 0 else float('inf')
    try:
        while rclpy.ok() and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
