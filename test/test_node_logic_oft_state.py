"""The node's robot state for OpenVLA-OFT LIBERO checkpoints (pose_layout libero), without a ROS graph."""
import math
from pathlib import Path

import numpy as np
import pytest

from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.codecs.proprio import axis_angle_from_quaternion, proprio_vector
from specprune_ros.control.controller import PolicyController
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.models.loading import load_policy
from specprune_ros.ros import launch_config

ROOT = Path(__file__).resolve().parents[1]
S = math.sqrt(0.5)


@pytest.mark.parametrize('quaternion, expected', [
    ((0, 0, 0, 1), (0, 0, 0)),                        # no rotation
    ((0, 0, S, S), (0, 0, math.pi / 2)),              # 90 degrees about z
    ((0, 0, -S, -S), (0, 0, -3 * math.pi / 2)),       # the same rotation, the other sign: robosuite keeps it
    ((1, 0, 0, 0), (math.pi, 0, 0)),                  # gripper pointing down: 180 degrees about x
    ((0, 0, 2 * S, 2 * S), (0, 0, math.pi / 2)),      # not normalised
])
def test_axis_angle_is_robosuites(quaternion, expected):
    np.testing.assert_allclose(axis_angle_from_quaternion(*quaternion), expected, atol=1e-9)


def test_the_libero_layout_is_position_axis_angle_and_two_fingers():
    state = proprio_vector((0.1, -0.2, 0.3), (1, 0, 0, 0), 0.08, 'libero')
    np.testing.assert_allclose(state, [0.1, -0.2, 0.3, math.pi, 0, 0, 0.04, -0.04], rtol=1e-6)
    assert proprio_vector((0.1, -0.2, 0.3), (1, 0, 0, 0), 0.08).shape == (6,)      # the reference layout
    with pytest.raises(ValueError, match='pose layout'):
        proprio_vector((0, 0, 0), (0, 0, 0, 1), 0.0, 'robosuite')


@pytest.fixture(scope='module')
def oft_policy(tmp_path_factory):
    return load_policy(str(write_tiny_checkpoint(tmp_path_factory.mktemp('oft') / 'oft', 'openvla-oft')))


def test_the_shipped_openvla_oft_overrides_fit_an_oft_checkpoint_with_its_8d_state(oft_policy):
    pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: check_policy_fits lives in the node module; '
                                        'the state the node builds is covered by the other tests of this file')
    from specprune_ros.ros.policy_node import check_policy_fits   # the node module: rclpy
    base = launch_config.params_file_values(str(ROOT / 'config' / 'specprune.yaml'))
    overrides = launch_config.params_file_values(str(ROOT / 'config' / 'openvla_oft.yaml'))
    params = NodeParameters.from_mapping({**base, **overrides, 'device': 'cpu', 'dtype': 'float32'})
    assert oft_policy.proprio_dim == 8 and check_policy_fits(params, oft_policy) == []
    reference = NodeParameters.from_mapping({**base, **overrides, 'pose_layout': 'reference'})
    assert 'pose_layout reference builds 6 values, the policy expects 8' in check_policy_fits(reference,
                                                                                              oft_policy)[0]


def test_the_controller_hands_the_policy_the_libero_state(oft_policy):
    params = NodeParameters(pose_layout='libero')
    controller = PolicyController(params, oft_policy.camera_names, oft_policy.action_spec, needs_proprio=True)
    controller.set_active(True)
    frame = np.zeros((*oft_policy.image_size, 3), np.uint8)
    for camera in oft_policy.camera_names:
        controller.put_frame(camera, frame, 10.0, 10.0)
    controller.put_pose((0.4, 0.0, 0.2), (0, 0, S, S), 10.0, 10.0)
    controller.put_gripper(0.06, 10.0, 10.0)
    controller.put_instruction('pick up the black bowl')
    request = controller.next_request(10.0)
    np.testing.assert_allclose(request.observation.proprio, [0.4, 0, 0.2, 0, 0, math.pi / 2, 0.03, -0.03], atol=1e-6)
    assert np.isfinite(oft_policy.predict(request.observation).actions).all()
