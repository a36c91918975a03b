"""Joint-space policies in the node logic (no DDS): a tiny pi0 checkpoint's action names and per-tick joint commands."""
import json

import numpy as np
import pytest

from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint
from specprune_ros.control.controller import PolicyController
from specprune_ros.control.joint_command import JointCommandFilter
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.interface import ACTION_LABELS, ActionSpec
from specprune_ros.ros import output_messages as messages

CAMERAS = ('base_0_rgb', 'left_wrist_0_rgb')
NAMES = ['shoulder_pan', 'shoulder_lift', 'elbow', 'wrist_1', 'wrist_2', 'wrist_3', 'finger_left', 'finger_right']


def write_named(directory, names=NAMES, **kwargs):
    """A tiny pi0 checkpoint with 6-D state and one action per name, saved with LeRobot's ``action_feature_names``."""
    write_tiny_checkpoint(directory, 'pi0', seed=3, state_dim=6, action_dim=len(names), **kwargs)
    config = json.loads((directory / 'config.json').read_text())
    config['action_feature_names'] = list(names)
    (directory / 'config.json').write_text(json.dumps(config))
    return directory


@pytest.fixture(scope='module')
def joint_policy(tmp_path_factory):
    return load_policy(str(write_named(tmp_path_factory.mktemp('pi0_joint'))), method='none', device='cpu',
                       dtype='float32')


def make(policy, **overrides):
    params = NodeParameters(**{'camera_names': list(CAMERAS), 'replan_every_steps': 2, 'max_chunk_age_s': 0.6,
                               'inference_deadline_s': 60.0, **overrides})
    controller = PolicyController(params, CAMERAS, policy.action_spec, needs_proprio=True)
    controller.set_active(True)
    return controller


def feed(controller, stamp, size=56):
    rng = np.random.default_rng(int(stamp * 10))
    for camera in CAMERAS:
        controller.put_frame(camera, rng.integers(0, 255, (size, size, 3), dtype=np.uint8), stamp, stamp)
    controller.put_proprio(np.linspace(-0.5, 0.5, 6), stamp)
    controller.put_instruction('pick up the cube')


def infer(controller, policy, now):
    request = controller.next_request(now)
    assert request is not None
    if request.reset_reason:
        policy.reset()
    return controller.accept(request, policy.predict(request.observation), now + 0.02)


def test_pi0_action_spec_names_the_checkpoint_actions(joint_policy, tmp_path):
    spec = joint_policy.action_spec
    assert spec.action_space == 'joint' and spec.action_dim == len(NAMES) and spec.action_names == tuple(NAMES)
    unnamed = load_policy(str(write_tiny_checkpoint(tmp_path / 'plain', 'pi0', state_dim=6, action_dim=5)),
                          method='none', device='cpu', dtype='float32')
    assert unnamed.action_spec.action_names == tuple(f'joint_{i}' for i in range(5))


def test_ee_delta_option_gives_the_twist_labels_and_the_names_must_fit(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / 'ee', 'pi0', state_dim=6, action_dim=7,
                                      options={'action_space': 'ee_delta'})
    spec = load_policy(str(directory), method='none', device='cpu', dtype='float32').action_spec
    assert spec.action_space == 'ee_delta' and spec.action_names == ACTION_LABELS
    with pytest.raises(ValueError, match='action_names'):
        ActionSpec(action_dim=3, action_names=('a', 'b'))
    with pytest.raises(ValueError, match='action_space'):
        ActionSpec(action_space='cartesian')
    with pytest.raises(ValueError, match="'ee_delta' actions are 7-D"):     # 8 actions would hold for ever
        ActionSpec(action_dim=8)
    with pytest.raises(ValueError, match='at least one step'):
        ActionSpec(chunk_size=0)
    # the node's velocities are action * scale / period: no unit may be zero, negative or NaN
    for units, message in [({'control_period_s': 0.0}, r'control_period_s: 0.0 is outside \(0, inf\)'),
                           ({'translation_scale_m': -0.02}, 'translation_scale_m: -0.02 is outside'),
                           ({'rotation_scale_rad': float('nan')}, 'rotation_scale_rad: nan is not finite'),
                           ({'chunk_size': 2.5}, 'chunk_size: expected an integer')]:
        with pytest.raises(ValueError, match=message):
            ActionSpec(**units)


def test_joint_space_ticks_command_the_chunk_steps_and_no_twist(joint_policy):
    controller = make(joint_policy)
    assert controller.joint_space and isinstance(controller.safety, JointCommandFilter)
    feed(controller, 10.0)
    chunk = infer(controller, joint_policy, 10.0)
    assert chunk is not None and chunk.actions.shape == (50, len(NAMES))
    for step in range(3):
        command = controller.tick(10.0 + 0.1 * step + 0.05)
        assert not command.holding, command.hold_reason
        np.testing.assert_allclose(command.joints, chunk.actions[step])
        assert np.array_equal(command.twist, np.zeros(6)) and command.gripper is None
        message = messages.joint_command_message(command.joints)
        assert list(message.data) == pytest.approx(list(chunk.actions[step]))
    trajectory = messages.chunk_message(chunk, 0.1, 'base_link', joint_policy.action_spec.action_names)
    assert list(trajectory.joint_names) == NAMES and len(trajectory.points) == 50
    assert list(trajectory.points[1].positions) == pytest.approx(list(chunk.actions[1]))
    # executed actions handed to the next inference are joint commands of the policy's size
    feed(controller, 10.2)
    request = controller.next_request(10.25)
    assert request.observation.executed_actions.shape[1] == len(NAMES)


def test_joint_space_holds_publish_nothing_new(joint_policy):
    controller = make(joint_policy)
    feed(controller, 10.0)
    chunk = infer(controller, joint_policy, 10.0)
    last = controller.tick(10.05).joints
    stale = controller.tick(11.0)     # the inputs are 1 s old: hold
    assert stale.holding and stale.joints is None and messages.joint_command_message(stale.joints) is None
    np.testing.assert_allclose(stale.executed, last)
    assert controller.stats.events['hold_ticks'] == 1 and chunk is not None
    controller.request_reset('test')
    controller.set_enabled(False)
    assert controller.tick(11.1).joints is None


def test_joint_filter_refuses_malformed_and_non_finite_actions():
    joints = JointCommandFilter(('j0', 'j1', 'j2', 'j3'))
    assert joints.command(np.array([0.1, np.nan, 0.0, 0.0]), 0.0).holding
    assert joints.command(np.zeros(7), 0.0).holding
    assert joints.counts['non_finite_actions'] == 2
    good = joints.command(np.array([0.1, 0.2, 0.3, 0.4]), 0.1)
    assert not good.holding and list(good.joints) == [0.1, 0.2, 0.3, 0.4]
    assert messages.joint_command_message(np.array([1.0, np.inf])) is None


def test_twist_policies_publish_no_joint_commands():
    params = NodeParameters(replan_every_steps=2)
    controller = PolicyController(params, ('agentview', 'wrist'), ActionSpec(), needs_proprio=True)
    assert not controller.joint_space
    command = controller.safety.command(np.full(7, 0.5), 0.0)
    assert command.joints is None and command.twist[0] > 0


def test_joint_command_topic_is_checked():
    assert any('joint_command_topic' in e for e in NodeParameters(joint_command_topic='bad topic').validate())
    assert not NodeParameters(joint_command_topic='').validate()
