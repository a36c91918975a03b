"""Joint-space policies on a robot, without DDS: JointState proprio by joint name, controller order, joint limits.

The controller, the joint command filter and the node's configure checks with a tiny pi0 checkpoint whose state is
joint positions (the node wiring over real DDS is covered by test_ros_joint_robot.py).
"""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint
from specprune_ros.codecs.proprio import StateError, joint_positions_by_name
from specprune_ros.control.controller import PolicyController, joint_command_filter
from specprune_ros.control.joint_command import (JointCommandFilter, JointLimit, JointOrderError, joint_limit,
                                                 urdf_joint_limits)
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.interface import ActionSpec, PolicyOutput
from specprune_ros.ros import launch_config
from specprune_ros.ros import output_messages as messages
from specprune_ros.ros.policy_node import check_policy_fits, state_joint_names

CAMERAS = ('base_0_rgb', 'left_wrist_0_rgb')
NAMES = ('shoulder_pan', 'shoulder_lift', 'elbow', 'wrist_1', 'wrist_2', 'wrist_3', 'gripper')
CONTROLLER = ('wrist_3', 'wrist_2', 'wrist_1', 'elbow', 'shoulder_lift', 'shoulder_pan')   # no gripper, reversed
SPEC = ActionSpec(chunk_size=10, action_dim=len(NAMES), action_space='joint', action_names=NAMES)
FRAME = np.zeros((8, 8, 3), np.uint8)
STATE = {name: 0.1 * (i + 1) for i, name in enumerate(NAMES)}


class SteadyClock:
    """The controller's arrival clock, moved by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value


def joint_state(values=STATE, extra=True, order=None):
    """(names, positions) of a JointState listing ``values`` shuffled, plus an extra joint the policy does not use."""
    names = list(order or reversed(list(values)))
    positions = [values[name] for name in names]
    if extra:
        names.insert(2, 'head_pan')
        positions.insert(2, float('nan'))      # an unused joint may be anything
    return names, positions


def make(clock=None, **overrides):
    params = NodeParameters(**{'camera_names': list(CAMERAS), 'proprio_source': 'joint_state',
                               'max_state_age_s': 0.5, 'max_future_stamp_s': 0.1, 'inference_deadline_s': 5.0,
                               **overrides})
    controller = PolicyController(params, CAMERAS, SPEC, needs_proprio=True, clock=clock or SteadyClock(),
                                  state_joints=NAMES)
    controller.set_active(True)
    controller.put_instruction('pick up the cube')
    return controller


def feed(controller, stamp, state=STATE):
    for camera in CAMERAS:
        assert controller.put_frame(camera, FRAME, stamp, stamp) == ''
    assert controller.put_joint_state(*joint_state(state), stamp, stamp) == ''


def run_chunk(controller, now, actions):
    request = controller.next_request(now)
    assert request is not None
    chunk = controller.accept(request, PolicyOutput(actions=np.asarray(actions, np.float32), latency_s=0.01),
                              now + 0.01)
    assert chunk is not None
    return request, chunk


# --- JointState -> state vector -------------------------------------------------------------------------------------
def test_joint_positions_come_in_the_state_order_by_name_whatever_the_message_order():
    names, positions = joint_state()
    assert names[0] == 'gripper' and 'head_pan' in names
    np.testing.assert_allclose(joint_positions_by_name(names, positions, NAMES), [STATE[n] for n in NAMES])


@pytest.mark.parametrize('names, positions, fragment', [
    (['elbow', 'wrist_1'], [0.1], 'has 2 names but 1 positions'),
    (list(NAMES[:-1]), [0.0] * 6, "lacks joints ['gripper']"),
    ([*NAMES, 'elbow'], [0.0] * 8, "names joints ['elbow'] more than once"),
    (list(NAMES), [0.0, math.inf, 0, 0, 0, 0, 0], "positions of ['shoulder_lift'] are not finite"),
])
def test_unusable_joint_states_are_named(names, positions, fragment):
    with pytest.raises(StateError, match=fragment.replace('[', r'\[').replace(']', r'\]')):
        joint_positions_by_name(names, positions, NAMES)


def test_the_observation_state_is_the_joint_positions_in_state_order():
    controller = make()
    feed(controller, 10.0)
    request = controller.next_request(10.0)
    assert request is not None
    np.testing.assert_allclose(request.observation.proprio, [STATE[n] for n in NAMES], rtol=1e-6)


@pytest.mark.parametrize('poison, kind, fragment', [
    (lambda n, p: (n[:-1], p[:-1]), 'state_invalid', 'lacks joints'),
    (lambda n, p: (n, p[:-1]), 'state_invalid', 'names but'),
    (lambda n, p: (n, [math.nan if name == 'elbow' else v for name, v in zip(n, p)]), 'state_invalid', 'not finite'),
    (lambda n, p: ([name for name in n if name != 'gripper'], [v for name, v in zip(n, p) if name != 'gripper']),
     'state_invalid', "['gripper']"),
])
def test_bad_joint_states_are_counted_and_hold_from_the_next_tick(poison, kind, fragment):
    controller = make()
    feed(controller, 10.0)
    run_chunk(controller, 10.0, np.zeros((10, len(NAMES))))
    assert controller.tick(10.05).joints is not None
    names, positions = poison(*joint_state())
    error = controller.put_joint_state(names, positions, 10.06, 10.06)
    assert fragment in error
    assert controller.stats.input_errors[kind] == 1 and fragment in controller.stats.last_input_error
    held = controller.tick(10.1)
    assert held.holding and held.joints is None and 'joint_state' in held.hold_reason
    for camera in CAMERAS:
        controller.put_frame(camera, FRAME, 10.12, 10.12)
    assert controller.next_request(10.3) is None         # no inference on garbage
    controller.put_joint_state(*joint_state(), 10.13, 10.13)   # a valid message lifts the hold
    assert not controller.faults and controller.next_request(10.3) is not None


def test_future_and_zero_stamps_are_refused_and_old_or_silent_states_go_stale():
    clock = SteadyClock()
    controller = make(clock)
    feed(controller, 10.0)
    assert 'ahead of the node clock' in controller.put_joint_state(*joint_state(), 12.0, 10.0)
    assert controller.stats.input_errors['state_future_stamp'] == 1
    assert 'stamp is zero' in controller.put_joint_state(*joint_state(), 0.0, 10.0)
    assert controller.tick(10.01).holding
    feed(controller, 10.0)
    assert controller.sync.staleness(10.2) == ''
    for camera in CAMERAS:                                        # new frames, a 0.7 s old joint state (by stamp)
        controller.put_frame(camera, FRAME, 10.7, 10.7)
    assert 'robot state stale: 0.700 s old' in controller.sync.staleness(10.7)
    assert controller.put_joint_state(*joint_state(), 10.75, 10.75) == ''
    clock.value += 0.8                                            # no joint state arrived for 0.8 s: by arrival
    for camera in CAMERAS:
        controller.put_frame(camera, FRAME, 10.8, 10.8)
    assert 'robot state stale: 0.800 s old' in controller.sync.staleness(10.8)
    command = controller.tick(10.8)
    assert command.holding and command.joints is None and 'robot state stale' in command.hold_reason


# --- joint order and limits -----------------------------------------------------------------------------------------
def test_commands_go_out_in_the_controller_order_by_name():
    controller = make(joint_names=list(CONTROLLER))
    feed(controller, 10.0)
    actions = np.tile(np.arange(len(NAMES), dtype=np.float64) * 0.01, (10, 1))
    _, chunk = run_chunk(controller, 10.0, actions)
    command = controller.tick(10.05)
    expected = [actions[0][NAMES.index(name)] for name in CONTROLLER]
    np.testing.assert_allclose(command.joints, expected, rtol=1e-6)
    assert list(messages.joint_command_message(command.joints).data) == pytest.approx(expected)
    safety = controller.safety
    trajectory = messages.chunk_message(chunk, 0.1, 'base_link', safety.joint_names, safety.columns)
    assert tuple(trajectory.joint_names) == CONTROLLER
    assert list(trajectory.points[3].positions) == pytest.approx([actions[3][NAMES.index(n)] for n in CONTROLLER])
    assert command.executed.shape == (len(NAMES),)   # executed actions stay in the policy's order


def test_a_controller_joint_the_policy_does_not_output_is_refused():
    with pytest.raises(JointOrderError, match=r"controller joints \['finger_joint1'\] are not among"):
        JointCommandFilter(NAMES, [*CONTROLLER, 'finger_joint1'])
    with pytest.raises(JointOrderError, match='listed more than once'):
        JointCommandFilter(NAMES, ['elbow', 'elbow'])
    with pytest.raises(JointOrderError, match=r"joint_limits name joints \['gripper'\] that are not commanded"):
        JointCommandFilter(NAMES, CONTROLLER, {'gripper': JointLimit(0.0, 1.0)})


def test_positions_are_clamped_and_steps_limited_per_tick():
    limits = {'elbow': JointLimit(-1.0, 1.0, max_velocity=2.0), 'wrist_1': JointLimit(-0.5, 0.5)}
    joints = JointCommandFilter(NAMES, ['elbow', 'wrist_1'], limits, period_s=0.1)
    assert joints.unlimited == []
    first = joints.command(np.array([0, 0, 3.0, -0.9, 0, 0, 0]), 0.0)   # no reference yet: clamped only
    assert list(first.joints) == [1.0, -0.5] and joints.counts['position_clamped'] == 1
    assert joints.counts['velocity_limited'] == 0
    step = joints.command(np.array([0, 0, -1.0, 0.0, 0, 0, 0]), 0.1)     # elbow: at most 2.0 rad/s x 0.1 s
    assert step.joints == pytest.approx([0.8, 0.0]) and joints.counts['velocity_limited'] == 1
    quick = joints.command(np.array([0, 0, -1.0, 0.0, 0, 0, 0]), 0.125)  # 25 ms later: 0.05 rad
    assert quick.joints == pytest.approx([0.75, 0.0])
    executed = quick.executed
    assert executed[2] == pytest.approx(0.75) and executed[0] == 0.0


def test_nan_actions_hold_and_the_first_command_starts_from_the_measured_positions():
    limits = {name: JointLimit(-3.0, 3.0, max_velocity=1.0) for name in NAMES}
    joints = JointCommandFilter(NAMES, (), limits, period_s=0.1)
    nan = joints.command(np.array([0, math.nan, 0, 0, 0, 0, 0]), 0.0)
    assert nan.holding and nan.joints is None and joints.counts['non_finite_actions'] == 1
    joints.set_measured({**STATE, 'head_pan': 5.0})
    first = joints.command(np.full(len(NAMES), 2.0), 0.1)
    np.testing.assert_allclose(first.joints, [STATE[n] + 0.1 for n in NAMES])
    # after a long pause the measured positions are the reference again
    joints.set_measured(dict(zip(NAMES, np.zeros(len(NAMES)))))
    later = joints.command(np.full(len(NAMES), 2.0), 5.0)
    np.testing.assert_allclose(later.joints, np.full(len(NAMES), 0.1))


def test_the_controller_feeds_measured_joint_positions_into_the_velocity_limit():
    limits = {f'joint_limits.{name}.max_velocity': 0.5 for name in NAMES}
    params = NodeParameters.from_mapping({'camera_names': list(CAMERAS), 'proprio_source': 'joint_state',
                                          'inference_deadline_s': 5.0, **limits})
    assert params.validate() == []
    controller = PolicyController(params, CAMERAS, SPEC, needs_proprio=True, clock=SteadyClock(),
                                  state_joints=NAMES)
    controller.set_active(True)
    controller.put_instruction('pick up the cube')
    feed(controller, 10.0)
    run_chunk(controller, 10.0, np.full((10, len(NAMES)), 3.0))
    command = controller.tick(10.05)
    np.testing.assert_allclose(command.joints, [STATE[n] + 0.05 for n in NAMES], rtol=1e-6)
    assert controller.safety.counts['velocity_limited'] == 1
    rows = dict(controller.diagnostics()[1])
    assert rows['safety: velocity limited'] == '1' and rows['safety: position clamped'] == '0'


def limited(**limits):
    """A joint-space controller with ``joint_limits.<joint>.<field>`` settings (a steady arrival clock)."""
    params = NodeParameters.from_mapping({'camera_names': list(CAMERAS), 'proprio_source': 'joint_state',
                                          'inference_deadline_s': 5.0, 'max_state_age_s': 0.5,
                                          'max_future_stamp_s': 0.1, **limits})
    assert params.validate() == []
    controller = PolicyController(params, CAMERAS, SPEC, needs_proprio=True, clock=SteadyClock(), state_joints=NAMES)
    controller.set_active(True)
    controller.put_instruction('pick up the cube')
    return controller


def test_after_the_clock_jumps_back_the_joint_commands_start_from_the_measured_positions():
    """A simulator reset puts the arm home: the first command steps from there, not from the old last command."""
    controller = limited(**{f'joint_limits.{name}.max_velocity': 0.5 for name in NAMES})
    feed(controller, 100.0)
    run_chunk(controller, 100.0, np.full((10, len(NAMES)), 3.0))
    for now in (100.05, 100.1, 100.2):
        assert not controller.tick(now).holding
    assert controller.tick(1.0).holding                           # the clock jumped back: start over
    home = {name: 0.0 for name in NAMES}
    feed(controller, 1.05, home)
    run_chunk(controller, 1.05, np.full((10, len(NAMES)), 3.0))
    command = controller.tick(1.1)
    np.testing.assert_allclose(command.joints, np.full(len(NAMES), 0.05), atol=1e-9)   # 0.5 rad/s x one period


def test_a_joint_state_far_beyond_the_limits_is_refused_and_one_just_past_steps_from_the_limit():
    controller = limited(**{'joint_limits.elbow.min_position': -1.0, 'joint_limits.elbow.max_position': 1.0,
                            'joint_limits.elbow.max_velocity': 0.5})
    feed(controller, 10.0)
    reason = controller.put_joint_state(*joint_state({**STATE, 'elbow': 50.0}), 10.05, 10.05)
    assert "joint 'elbow' measured at 50, beyond its position limits [-1, 1]" in reason
    assert controller.stats.input_errors['state_invalid'] == 1
    assert controller.tick(10.06).holding
    feed(controller, 10.1, {**STATE, 'elbow': 1.1})               # past the limit by less than 10 % of the range
    run_chunk(controller, 10.1, np.full((10, len(NAMES)), -3.0))
    command = controller.tick(10.15)
    elbow = controller.safety.joint_names.index('elbow')
    assert command.joints[elbow] == pytest.approx(1.0 - 0.05)      # one step from the limit, not a jump to it


def test_robot_states_stale_on_arrival_or_stamped_back_are_refused_and_slightly_older_ones_ignored():
    controller = limited()
    feed(controller, 10.0)
    assert 'stamp is 6.050 s old on arrival' in controller.put_joint_state(*joint_state(), 4.0, 10.05)
    assert controller.stats.input_errors['state_stale_stamp'] == 1 and controller.tick(10.06).holding
    feed(controller, 10.2)
    assert controller.put_joint_state(*joint_state({**STATE, 'elbow': 0.9}), 10.15, 10.25) == ''   # reordered
    assert controller.sync.proprio_stamp == 10.2 and controller.stats.input_errors.get('state_stamp_backwards', 0) == 0
    assert 'stamp went back by 0.200 s' in controller.put_joint_state(*joint_state(), 10.0, 10.3)
    assert controller.stats.input_errors['state_stamp_backwards'] == 1


def test_joint_limit_parameters_follow_ros2_control_and_are_checked():
    params = NodeParameters.from_mapping({'joint_limits.elbow.min_position': -1.0,
                                          'joint_limits.elbow.max_position': 1.0,
                                          'joint_limits.elbow.max_velocity': 2.0,
                                          'joint_limits.elbow.max_effort': 80.0,
                                          'joint_limits.wrist_1.has_position_limits': False,
                                          'joint_limits.wrist_1.min_position': 5.0})
    assert params.joint_limits['elbow']['max_velocity'] == 2.0 and params.validate() == []
    assert joint_limit('wrist_1', params.joint_limits['wrist_1']) == JointLimit()
    for fields, fragment in [({'min_position': 1.0, 'max_position': -1.0}, 'is above max_position'),
                             ({'max_velocity': 0.0}, 'must be positive'),
                             ({'max_positon': 1.0}, "unknown field(s) ['max_positon']"),
                             ({'min_position': 'low'}, 'expected a finite number'),
                             ({'has_velocity_limits': 'yes'}, 'expected true or false')]:
        flat = {f'joint_limits.elbow.{key}': value for key, value in fields.items()}
        errors = NodeParameters.from_mapping(flat).validate()
        assert any(fragment in error and 'joint_limits.elbow' in error for error in errors), (fields, errors)
    assert any('joint_names' in e for e in NodeParameters(joint_names=['a', 'a']).validate())
    assert any('joint_state_topic' in e for e in NodeParameters(proprio_source='joint_state',
                                                                joint_state_topic='bad topic').validate())


# --- configure checks with a real tiny pi0 --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pi0_joint_state(tmp_path_factory):
    """A tiny pi0 whose 7-D state and actions are the robot's joints (named in ``action_feature_names``)."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp('pi0_robot'), 'pi0', seed=4, state_dim=len(NAMES),
                                      action_dim=len(NAMES))
    config = json.loads((directory / 'config.json').read_text())
    config['action_feature_names'] = list(NAMES)
    (directory / 'config.json').write_text(json.dumps(config))
    return load_policy(str(directory), method='none', device='cpu', dtype='float32')


def test_a_pi0_whose_state_is_joint_positions_configures_only_with_a_joint_state_source(pi0_joint_state):
    base = {'camera_names': list(CAMERAS), 'camera_topics': ['a', 'b'], 'camera_transports': ['raw', 'raw']}
    refused = check_policy_fits(NodeParameters(**base), pi0_joint_state)
    assert len(refused) == 1
    assert 'proprio_source pose with pose_layout reference builds 6 values, the policy expects 7' in refused[0]
    assert 'proprio_source joint_state' in refused[0] and 'joint_state_topic' in refused[0]
    assert 'set proprio_source to pose' in check_policy_fits(NodeParameters(**base, proprio_source='none'),
                                                             pi0_joint_state)[0]
    params = NodeParameters(**base, proprio_source='joint_state', joint_names=list(CONTROLLER))
    assert check_policy_fits(params, pi0_joint_state) == []
    assert state_joint_names(params, pi0_joint_state) == list(NAMES)
    short = NodeParameters(**base, proprio_source='joint_state', state_joint_names=['elbow'])
    assert 'set state_joint_names to its 7 joints' in check_policy_fits(short, pi0_joint_state)[0]
    wrong = NodeParameters(**base, proprio_source='joint_state', joint_names=['elbow', 'finger_joint1'])
    assert "controller joints ['finger_joint1'] are not among" in check_policy_fits(wrong, pi0_joint_state)[0]
    limits = NodeParameters.from_mapping({**base, 'proprio_source': 'joint_state', 'joint_names': list(CONTROLLER),
                                          'joint_limits.gripper.max_position': 1.0})
    assert "joint_limits name joints ['gripper']" in check_policy_fits(limits, pi0_joint_state)[0]


def test_joint_settings_on_an_end_effector_policy_are_refused():
    policy = SimpleNamespace(camera_names=CAMERAS, proprio_dim=6, action_spec=ActionSpec())
    params = NodeParameters(camera_names=list(CAMERAS), joint_names=['elbow'])
    assert 'apply to joint-space policies only' in check_policy_fits(params, policy)[0]
    stateless = SimpleNamespace(camera_names=CAMERAS, proprio_dim=0, action_spec=SPEC)
    params = NodeParameters(camera_names=list(CAMERAS), proprio_source='joint_state')
    assert check_policy_fits(params, stateless) == ['proprio_source joint_state, but the policy takes no state: set '
                                                    'proprio_source to none']


def test_a_params_file_takes_ros2_control_joint_limits_nested_by_joint(tmp_path):
    params_file = tmp_path / 'robot.yaml'
    params_file.write_text('specprune_node:\n  ros__parameters:\n    proprio_source: joint_state\n'
                           '    joint_names: [elbow, wrist_1]\n    joint_limits:\n'
                           '      elbow: {has_position_limits: true, min_position: -2.5, max_position: 2.5,\n'
                           '              has_velocity_limits: true, max_velocity: 1.0, max_effort: 80.0}\n')
    params = launch_config.check_overrides(str(params_file), {})
    assert params.joint_limits == {'elbow': {'has_position_limits': True, 'min_position': -2.5, 'max_position': 2.5,
                                             'has_velocity_limits': True, 'max_velocity': 1.0, 'max_effort': 80.0}}
    assert params.command_joint_names() == ['elbow', 'wrist_1']
    params_file.write_text(params_file.read_text().replace('max_velocity: 1.0', 'max_velocity: -1.0'))
    with pytest.raises(ValueError, match='joint_limits.elbow.max_velocity: -1.0 must be positive'):
        launch_config.check_overrides(str(params_file), {})


URDF = """<?xml version="1.0"?>
<robot name="arm">
  <link name="base"/><link name="l1"/><link name="l2"/><link name="l3"/><link name="cam"/>
  <joint name="elbow" type="revolute"><parent link="base"/><child link="l1"/>
    <limit lower="-2.0" upper="2.0" velocity="1.5" effort="80"/></joint>
  <joint name="wrist_1" type="continuous"><parent link="l1"/><child link="l2"/>
    <limit velocity="3.0" effort="20"/></joint>
  <joint name="shoulder_pan" type="prismatic"><parent link="l2"/><child link="l3"/>
    <limit lower="0.0" upper="0.3" velocity="0.2" effort="100"/></joint>
  <joint name="camera_mount" type="fixed"><parent link="l3"/><child link="cam"/></joint>
  <joint name="head_pan" type="revolute"><parent link="base"/><child link="cam"/>
    <limit lower="-1" upper="1" velocity="1" effort="1"/></joint>
</robot>"""


def test_a_urdf_gives_the_commanded_joints_limits_and_joint_limits_override_them():
    assert urdf_joint_limits(URDF) == {
        'elbow': {'min_position': -2.0, 'max_position': 2.0, 'max_velocity': 1.5},
        'wrist_1': {'max_velocity': 3.0},
        'shoulder_pan': {'min_position': 0.0, 'max_position': 0.3, 'max_velocity': 0.2},
        'head_pan': {'min_position': -1.0, 'max_position': 1.0, 'max_velocity': 1.0}}
    params = NodeParameters.from_mapping({'robot_description': URDF, 'joint_names': ['elbow', 'wrist_1'],
                                          'joint_limits.elbow.max_velocity': 0.5})
    assert params.validate() == []
    joints = joint_command_filter(params, SPEC)       # head_pan is in the URDF but not commanded: ignored
    assert joints.unlimited == []
    command = joints.command(np.array([0, 0, 5.0, 9.0, 0, 0, 0]), 0.0)
    assert list(command.joints) == [2.0, 9.0]         # elbow clamped by the URDF, wrist_1 continuous
    command = joints.command(np.array([0, 0, -5.0, 0.0, 0, 0, 0]), 0.1)
    assert command.joints == pytest.approx([2.0 - 0.05, 9.0 - 0.3])   # elbow 0.5 rad/s (override), wrist_1 3.0
    broken = NodeParameters(robot_description='<robot><joint name="a"')
    assert any(error.startswith('robot_description: not valid URDF XML') for error in broken.validate())
