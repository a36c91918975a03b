"""An OpenVLA-OFT LIBERO checkpoint (tiny, random, architecture-identical) driving specprune_node over real DDS.

The node builds the checkpoint's 8-D state from ee_pose and gripper_state (``pose_layout: libero``, as
``config/openvla_oft.yaml`` sets it) and commands twists from its 8-step chunks (ROS_DOMAIN_ID 66).
"""
from __future__ import annotations

import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels; the '
                                    'LIBERO state is covered without ROS by test_node_logic_oft_state.py')

from ros_harness import Probe, start_camera, start_node, twist_values  # noqa: E402
from specprune_ros.adapters.tiny import write_tiny_checkpoint  # noqa: E402

DOMAIN = 66
STARTUP_S = 120.0


def test_an_oft_libero_checkpoint_commands_from_its_8d_state(tmp_path):
    oft = write_tiny_checkpoint(tmp_path / 'oft', 'openvla-oft')
    node = start_node(DOMAIN, {'model': str(oft), 'method': 'specprune'},
                      {'proprio_source': 'pose', 'pose_layout': 'libero', 'replan_every_steps': 4})
    camera = start_camera(DOMAIN)
    probe = Probe(DOMAIN)
    try:
        values = probe.wait_diagnostics(lambda message, v: v.get('hold reason') == 'none (commanding)', STARTUP_S)
        assert values.get('hold reason') == 'none (commanding)', f'never commanded; log:\n{node.output()[-3000:]}'
        assert probe.wait_for(lambda: any(any(twist_values(t)) for _, t in probe.twists[-20:]), 10.0)
        assert "with method 'specprune'" in node.output() and 'configure failed' not in node.output()
    finally:
        probe.close()
        camera.interrupt()
        node.interrupt()
