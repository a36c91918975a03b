"""A tiny pi0 on a robot's joints over real DDS (ROS_DOMAIN_ID 94): JointState in, limited joint commands out.

The node process runs a tiny random pi0 whose state and actions are the robot's 7 joints; the synthetic camera
process publishes frames and the instruction; the test process publishes the robot's ``sensor_msgs/JointState``
(shuffled order, an extra joint) and receives the joint commands, which must come in the controller's joint order
(``joint_names``: 6 arm joints, reversed, no gripper) within the position limits and the per-tick step limit.
A JointState that lacks a state joint or carries a NaN makes the node hold (no new joint command).
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels')

from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402

from ros_harness import Probe, start_camera, start_node  # noqa: E402
from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint  # noqa: E402

DOMAIN = 94
CAMERAS = ('base_0_rgb', 'left_wrist_0_rgb')
NAMES = ['shoulder_pan', 'shoulder_lift', 'elbow', 'wrist_1', 'wrist_2', 'wrist_3', 'gripper']
CONTROLLER = ['wrist_3', 'wrist_2', 'wrist_1', 'elbow', 'shoulder_lift', 'shoulder_pan']
STATE = {name: 0.05 * (i + 1) for i, name in enumerate(NAMES)}      # distinct, inside the limits
LIMITED = CONTROLLER[1:]                                             # wrist_3 has no limits
LOW, HIGH, SPEED, RATE_HZ = -0.5, 0.5, 0.3, 10.0
MAX_STEP = SPEED / RATE_HZ
STARTUP_S = 120.0


class JointStatePublisher:
    """Publishes the robot's JointState from the test process at 30 Hz; ``names`` / ``positions`` can change."""

    def __init__(self, probe: Probe, topic: str) -> None:
        self.lock = threading.Lock()
        self.names, self.positions = self.shuffled(STATE)
        self.publisher = probe.node.create_publisher(JointState, topic, 10)
        self.clock = probe.node.get_clock()
        self.timer = probe.node.create_timer(1.0 / 30.0, self.publish)

    @staticmethod
    def shuffled(values: dict) -> tuple[list, list]:
        names = ['gripper', 'elbow', 'head_pan', 'shoulder_pan', 'wrist_3', 'wrist_1', 'shoulder_lift', 'wrist_2']
        return names, [values.get(name, 1.5) for name in names]

    def set(self, names: list, positions: list) -> None:
        with self.lock:
            self.names, self.positions = list(names), [float(p) for p in positions]

    def publish(self) -> None:
        with self.lock:
            message = JointState(name=self.names, position=self.positions)
        message.header.stamp = self.clock.now().to_msg()
        self.publisher.publish(message)


@pytest.fixture(scope='module')
def system(tmp_path_factory):
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp('pi0_robot'), 'pi0', seed=5, state_dim=len(NAMES),
                                      action_dim=len(NAMES))
    config = json.loads((directory / 'config.json').read_text())
    config['action_feature_names'] = NAMES
    (directory / 'config.json').write_text(json.dumps(config))
    topics = [f'camera/{name}/image_raw' for name in CAMERAS]
    limits = {f'joint_limits.{joint}.{field}': value for joint in LIMITED
              for field, value in (('min_position', LOW), ('max_position', HIGH), ('max_velocity', SPEED))}
    node = start_node(DOMAIN, {'model': str(directory), 'method': 'divprune', 'method_config': '{}',
                               'camera_names': ','.join(CAMERAS), 'camera_topics': ','.join(topics),
                               'camera_transports': 'raw,raw'},
                      {'inference_deadline_s': 5.0, 'max_chunk_age_s': 5.0, 'control_rate_hz': RATE_HZ,
                       'proprio_source': 'joint_state', 'joint_state_topic': 'robot/joint_states',
                       'joint_names': CONTROLLER, **limits})
    camera = start_camera(DOMAIN, '--no-state', *[arg for name, topic in zip(CAMERAS, topics)
                                                  for arg in ('--camera', f'{name}={topic}:raw')], size=64)
    probe = Probe(DOMAIN)
    joints: list = []
    probe.node.create_subscription(Float64MultiArray, 'joint_commands', probe._store(joints),
                                   QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
    states = JointStatePublisher(probe, 'robot/joint_states')
    try:
        values = probe.wait_diagnostics(lambda message, v: message == 'active: commanding', STARTUP_S)
        assert values.get('hold reason') == 'none (commanding)', f'node never commanded; log:\n{node.output()[-3000:]}'
        yield {'node': node, 'camera': camera, 'probe': probe, 'joints': joints, 'states': states}
    finally:
        probe.close()
        camera.interrupt()
        node.interrupt()


def test_joint_commands_come_in_the_controller_order_within_the_limits(system):
    probe, joints = system['probe'], system['joints']
    assert probe.wait_for(lambda: len(probe.since(joints, 0.0)) >= 15 and probe.chunks, 30.0), \
        system['node'].output()[-3000:]
    commands = np.array([list(m.data) for m in probe.since(joints, 0.0)])
    assert commands.shape[1] == len(CONTROLLER) and np.isfinite(commands).all()
    chunk = probe.chunks[-1][1]
    assert list(chunk.joint_names) == CONTROLLER and len(chunk.points[0].positions) == len(CONTROLLER)
    # the first command starts from the measured positions, joint by joint in the controller's order
    first = commands[0]
    for k, name in enumerate(CONTROLLER[1:], start=1):
        assert abs(first[k] - STATE[name]) <= MAX_STEP + 1e-9, (name, first[k], STATE[name])
    # position limits always hold; each step is within max_velocity x period of the previous command
    limited = commands[:, 1:]
    assert (limited >= LOW - 1e-12).all() and (limited <= HIGH + 1e-12).all()
    measured = np.array([STATE[name] for name in CONTROLLER[1:]])
    for previous, command in zip(limited[:-1], limited[1:]):   # after a long hold: from the measured positions
        assert (np.abs(command - previous) <= MAX_STEP + 1e-9).all() \
            or (np.abs(command - measured) <= MAX_STEP + 1e-9).all(), (previous, command)
    # the unlimited joint (wrist_3) is the policy's own value: one of the published chunks' steps, column 0

    def published(value):        # a new chunk's first command goes out before the chunk message
        return np.abs(np.array([p.positions[0] for c in probe.since(probe.chunks, 0.0) for p in c.points])
                      - value).min() < 1e-9

    assert probe.wait_for(lambda: all(published(value) for value in commands[-5:, 0]), 5.0)
    values = probe.wait_diagnostics(lambda message, v: int(v.get('safety: position clamped', '0')) > 0, 5.0)
    assert int(values.get('safety: position clamped', '0')) > 0, values
    assert int(values.get('safety: velocity limited', '0')) > 0, values


@pytest.mark.parametrize('poison, fragment', [
    (lambda names, positions: ([n for n in names if n != 'shoulder_lift'],
                               [p for n, p in zip(names, positions) if n != 'shoulder_lift']), 'lacks joints'),
    (lambda names, positions: (names, [float('nan') if n == 'elbow' else p for n, p in zip(names, positions)]),
     'not finite'),
])
def test_bad_joint_states_make_the_node_hold(system, poison, fragment):
    probe, joints, states = system['probe'], system['joints'], system['states']
    good = JointStatePublisher.shuffled(STATE)
    states.set(*good)
    assert probe.wait_diagnostics(lambda message, v: message == 'active: commanding', 30.0).get('hold reason') \
        == 'none (commanding)'
    before = int(probe.latest_diagnostics()[1].get('input errors: state_invalid', '0'))
    states.set(*poison(*good))
    values = probe.wait_diagnostics(lambda message, v: 'holding' in message and fragment in v.get('hold reason', ''),
                                    10.0)
    assert fragment in values.get('hold reason', ''), values
    assert int(values.get('input errors: state_invalid', '0')) > before, values
    quiet = time.monotonic() + 0.3          # commands already on the wire may still arrive
    time.sleep(1.3)
    assert not probe.since(joints, quiet), 'joint commands went out on a bad joint state'
    node = system['node']        # the log line is throttled per source (log_throttle_s 2.0): it may come a bit later
    assert probe.wait_for(lambda: f'{fragment}' in node.output() and 'holding until joint_state is valid again'
                          in node.output(), 5.0), node.output()[-3000:]
    states.set(*good)
    values = probe.wait_diagnostics(lambda message, v: message == 'active: commanding', 30.0)
    assert values.get('hold reason') == 'none (commanding)', values
