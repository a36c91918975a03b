"""specprune_node with a joint-space pi0 checkpoint over real DDS (ROS_DOMAIN_ID 93).

A tiny random pi0 checkpoint with named actions runs in the node process; the test process receives the
``~/action_chunk`` JointTrajectory with the checkpoint's action names and one ``std_msgs/Float64MultiArray`` joint
command per control tick, and no twists.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels')

from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402

from ros_harness import Probe, start_camera, start_node  # noqa: E402
from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint  # noqa: E402

DOMAIN = 93
CAMERAS = ('base_0_rgb', 'left_wrist_0_rgb')
NAMES = ['shoulder_pan', 'shoulder_lift', 'elbow', 'wrist_1', 'wrist_2', 'wrist_3', 'finger_left', 'finger_right']
STARTUP_S = 120.0


@pytest.fixture(scope='module')
def system(tmp_path_factory):
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp('pi0_joint'), 'pi0', seed=3, state_dim=6,
                                      action_dim=len(NAMES))
    config = json.loads((directory / 'config.json').read_text())
    config['action_feature_names'] = NAMES
    (directory / 'config.json').write_text(json.dumps(config))
    topics = [f'camera/{name}/image_raw' for name in CAMERAS]
    node = start_node(DOMAIN, {'model': str(directory), 'method': 'divprune', 'method_config': '{}',
                               'camera_names': ','.join(CAMERAS), 'camera_topics': ','.join(topics),
                               'camera_transports': 'raw,raw'},
                      {'inference_deadline_s': 5.0, 'max_chunk_age_s': 5.0})
    camera = start_camera(DOMAIN, *[arg for name, topic in zip(CAMERAS, topics)
                                    for arg in ('--camera', f'{name}={topic}:raw')], size=64)
    probe = Probe(DOMAIN)
    joints: list = []
    probe.node.create_subscription(Float64MultiArray, 'joint_commands', probe._store(joints),
                                   QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    try:
        values = probe.wait_diagnostics(lambda message, v: message == 'active: commanding', STARTUP_S)
        assert values.get('hold reason') == 'none (commanding)', f'node never commanded; log:\n{node.output()[-3000:]}'
        yield {'node': node, 'camera': camera, 'probe': probe, 'joints': joints}
    finally:
        probe.close()
        camera.interrupt()
        node.interrupt()


def test_chunk_names_the_checkpoint_actions_and_joint_commands_follow_it(system):
    probe, joints = system['probe'], system['joints']
    start = time.monotonic()
    assert probe.wait_for(lambda: len(probe.since(joints, start)) >= 10 and probe.since(probe.chunks, start), 20.0), \
        system['node'].output()[-3000:]
    chunk = probe.since(probe.chunks, start)[-1]
    assert list(chunk.joint_names) == NAMES and len(chunk.points) == 50
    assert all(len(p.positions) == len(NAMES) for p in chunk.points)
    commands = np.array([list(m.data) for m in probe.since(joints, start)])
    assert commands.shape[1] == len(NAMES) and np.isfinite(commands).all()

    # every command is one step of a chunk the node published (a new chunk's first command goes out before the chunk)
    def published(command):
        steps = np.array([list(p.positions) for c in probe.since(probe.chunks, 0.0) for p in c.points])
        return np.abs(steps - command).max(axis=1).min() < 1e-9

    assert probe.wait_for(lambda: all(published(command) for command in commands[-5:]), 5.0)
    assert not probe.twists and not probe.grippers    # no twists or gripper commands from joint actions


def test_stale_input_publishes_no_new_joint_command(system):
    probe, joints = system['probe'], system['joints']
    system['camera'].interrupt()
    values = probe.wait_diagnostics(lambda message, v: 'holding' in message, 10.0)
    assert values.get('hold reason', 'none (commanding)') != 'none (commanding)', values
    assert int(values.get('hold ticks', '0')) > 0, values
    quiet = time.monotonic()
    time.sleep(1.0)
    assert not probe.since(joints, quiet), 'joint commands went out while holding'
