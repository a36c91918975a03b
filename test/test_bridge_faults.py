"""The sim bridge when the policy misbehaves, over real DDS (ROS_DOMAIN_ID 231).

The bridge runs as a process with the real simulator; the policy is a scripted stand-in node in the test process
that answers the bridge's ticks the way specprune_node does, with faults on cue: a clock it answers only when sent
again, a chunk it never publishes, a silence, a node that leaves, a foreign command frame.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels; '
                    'timeouts, interruptions and the summary are covered without ROS in test_bridge_core.py')

import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Float64  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from ros_harness import start_process  # noqa: E402
from specprune_ros.bridge.episodes import markdown_summary  # noqa: E402
from specprune_ros.ros.ros_helpers import BackgroundExecutor  # noqa: E402
from specprune_ros.ros.sim_bridge_node import BridgeAbort, SimBridgeNode  # noqa: E402
from specprune_ros.ros.sim_launch_config import bridge_command, sim_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = 231
NAME = 'scripted_policy'
SEED = 1_000_000
START_NS = 100_000_000_000          # start_time_s 100: tick k of the first episode is stamped START_NS + k * PERIOD
PERIOD_NS = 100_000_000
SPEED = 0.1                         # m/s along x: action 0.5 (0.02 m per 0.1 s at action 1)
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)


def tick(k: int) -> int:
    return START_NS + k * PERIOD_NS


class ScriptedPolicy:
    """A stand-in for specprune_node (real rclpy, real DDS) that answers ticks like the node, faults on cue.

    Each new /clock stamp gets one timer twist (the chunk's next action, or a zero hold when it is used up); each
    pair of camera frames gets a chunk, then its first action. Faults, by stamp: ``ignore_clock_once`` (the clock is
    answered only when sent again), ``withhold_chunk`` (frames answered by a closing-gripper twist, no chunk),
    ``mute_from`` (nothing is answered from then on), ``tool_frame`` (the timer twist labelled tool0).
    """

    def __init__(self, command_frame: str = 'base_link', ignore_clock_once: tuple = (), withhold_chunk: tuple = (),
                 mute_from: Optional[int] = None, tool_frame: tuple = ()) -> None:
        self.ignore_clock_once, self.withhold_chunk = set(ignore_clock_once), set(withhold_chunk)
        self.mute_from, self.tool_frame = mute_from, set(tool_frame)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=DOMAIN)
        self.node = rclpy.create_node(NAME, context=self.context, parameter_overrides=[
            Parameter('use_sim_time', value=True), Parameter('replan_every_steps', value=8),
            Parameter('publish_on_new_chunk', value=True), Parameter('command_frame', value=command_frame),
            Parameter('control_rate_hz', value=10.0), Parameter('gripper_open_value', value=-1.0),
            Parameter('gripper_closed_value', value=1.0), Parameter('method', value='scripted'),
            Parameter('model', value='scripted')],
            automatically_declare_parameters_from_overrides=True)
        node = self.node
        self.twist_pub = node.create_publisher(TwistStamped, 'delta_twist_cmds', RELIABLE)
        self.gripper_pub = node.create_publisher(Float64, 'gripper_command', RELIABLE)
        self.chunk_pub = node.create_publisher(JointTrajectory, '~/action_chunk', RELIABLE)
        self.inference_pub = node.create_publisher(DiagnosticStatus, '~/inference', RELIABLE)
        node.create_subscription(Clock, '/clock', self._on_clock, RELIABLE)
        for camera in ('agentview', 'wrist'):
            node.create_subscription(Image, f'camera/{camera}/image_raw', self._on_frame, RELIABLE)
        node.create_service(Trigger, '~/reset', self._on_reset)
        node.create_service(GetState, '~/get_state', self._on_get_state)
        self.lock = threading.Lock()
        self.clocks: Counter = Counter()       # /clock stamps received (resends counted)
        self.frames: Counter = Counter()       # camera frames received per stamp
        self.muted = threading.Event()         # a clock arrived that is not answered (mute_from)
        self.rows: list = []
        self.last_timer_ns = -1
        self.spinner = BackgroundExecutor(node)

    def close(self) -> None:
        """Leave the ROS graph (as a node that exits does)."""
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def _on_reset(self, request, response):
        with self.lock:
            self.rows = []
        response.success = True
        return response

    def _on_get_state(self, request, response):
        response.current_state.label = 'active'
        return response

    def _twist(self, stamp_ns: int, speed: float, gripper: Optional[float], frame: str = 'base_link') -> None:
        msg = TwistStamped()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = frame
        msg.twist.linear.x = speed
        self.twist_pub.publish(msg)
        if gripper is not None:
            self.gripper_pub.publish(Float64(data=gripper))

    def _on_clock(self, msg: Clock) -> None:
        stamp = msg.clock.sec * 1_000_000_000 + msg.clock.nanosec
        with self.lock:
            self.clocks[stamp] += 1
            if self.mute_from is not None and stamp >= self.mute_from:
                self.muted.set()
                return
            if stamp in self.ignore_clock_once and self.clocks[stamp] == 1:
                return
            if stamp <= self.last_timer_ns:       # the same instant again: a ROS timer does not fire
                return
            self.last_timer_ns = stamp
            moving = bool(self.rows)
            if moving:
                self.rows.pop(0)
        frame = 'tool0' if stamp in self.tool_frame else 'base_link'
        self._twist(stamp, SPEED if moving else 0.0, -1.0 if moving else None, frame)

    def _on_frame(self, msg: Image) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            self.frames[stamp] += 1
            if self.frames[stamp] % 2 or (self.mute_from is not None and stamp >= self.mute_from):
                return
            if stamp in self.withhold_chunk:
                partial = True
            else:
                partial = False
                self.rows = [SPEED] * 7               # the chunk's 8 actions, the first one published now
        if partial:
            self._twist(stamp, 2 * SPEED, 1.0)       # a new command, but its chunk never comes
            return
        chunk = JointTrajectory()
        chunk.header.stamp = msg.header.stamp
        chunk.points = [JointTrajectoryPoint(positions=[0.5, 0, 0, 0, 0, 0, -1.0]) for _ in range(8)]
        self.chunk_pub.publish(chunk)
        self.inference_pub.publish(DiagnosticStatus(name='inference'))
        self._twist(stamp, SPEED, -1.0)


def start_bridge(tmp_path: Path, max_steps: int, families: str = 'pick', **parameters):
    setup = sim_setup({'mode': 'sync', 'families': families, 'episodes_per_family': '1',
                       'max_steps': str(max_steps)})
    values = {'policy_node': f'/{NAME}', 'start_time_s': START_NS * 1e-9, 'episode_gap_s': 0.5, 'image_size': 32,
              'timer_wait_s': 0.3, 'resend_after_s': 0.3, 'sync_timeout_s': 2.0, 'settle_s': 0.3,
              'startup_timeout_s': 60.0, 'save_actions': True, 'summary_path': str(tmp_path / 'summary'),
              **parameters}
    return start_process(bridge_command(setup, values), DOMAIN, 'sim_bridge')


def summary_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / 'summary.json').read_text())['summary']


def compare_script():
    spec = importlib.util.spec_from_file_location('compare_ros_vs_harness', ROOT / 'scripts' /
                                                  'compare_ros_vs_harness.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def faulty_run(tmp_path_factory):
    """10 ticks: tick 3's clock answered only when resent, tick 5's twist in tool0, tick 8's chunk never sent."""
    tmp_path = tmp_path_factory.mktemp('faulty')
    policy = ScriptedPolicy(ignore_clock_once=(tick(3),), withhold_chunk=(tick(8),), tool_frame=(tick(5),))
    bridge = start_bridge(tmp_path, max_steps=10)
    try:
        returncode = bridge.wait(120)
    finally:
        bridge.interrupt()
        policy.close()
    return {'returncode': returncode, 'log': bridge.output(), 'policy': policy, 'dir': tmp_path}


def test_an_unanswered_tick_without_an_inference_is_resent_without_frames(faulty_run):
    """A resent observation of a tick that needs no inference carries the state and the clock, never frames."""
    assert faulty_run['returncode'] == 0, faulty_run['log']
    policy = faulty_run['policy']
    assert policy.clocks[tick(3)] >= 2                     # sent again, and then answered
    assert policy.frames[tick(3)] == 0
    assert policy.frames[tick(0)] >= 2 and policy.frames[tick(9)] >= 2
    (episode,) = summary_of(faulty_run['dir'])['episodes']
    assert episode['steps'] == 10 and episode['resends'] >= 1 and not episode['interrupted']
    actions = np.asarray(episode['actions'])
    np.testing.assert_allclose(actions[3], [0.5, 0, 0, 0, 0, 0, -1.0], atol=1e-9)   # tick 3's command applied


def test_a_timed_out_tick_holds_the_robot_and_marks_its_episode(faulty_run):
    """Tick 8 got a twist but never its chunk: a zero twist with the gripper unchanged, counted as a timeout."""
    summary = summary_of(faulty_run['dir'])
    (episode,) = summary['episodes']
    actions = np.asarray(episode['actions'])
    assert np.all(actions[8, :6] == 0.0) and actions[8, 6] == actions[7, 6] == -1.0
    assert np.any(actions[7, :6] != 0.0) and np.any(actions[9, :6] != 0.0)
    assert episode['timeouts'] == 1 and episode['sync_how'].get('timeout') == 1
    assert episode['status'] == 'failure with 1 ticks timed out'
    assert summary['overall']['timeouts'] == 1 and summary['overall']['episodes_with_timeouts'] == 1
    assert summary['complete'] and summary['completed_episodes'] == summary['planned_episodes'] == 1
    assert summary['sync_counters']['timeouts'] == 1
    table = (faulty_run['dir'] / 'summary.md').read_text()
    assert ' timeouts (episodes) |' in table.splitlines()[0] and table.splitlines()[-1].endswith('| 1 (1) |')
    assert 'applying a zero twist (gripper unchanged)' in faulty_run['log']
    assert 'failure with 1 ticks timed out in 10 steps' in faulty_run['log']


def test_twists_in_another_frame_are_counted_and_reported(faulty_run):
    summary = summary_of(faulty_run['dir'])
    assert summary['foreign_frame_twists'] == 1
    assert "twist in frame 'tool0'" in faulty_run['log']


def test_a_complete_run_is_comparable_with_the_harness_only_on_the_same_episodes(faulty_run):
    problems = compare_script().ros_run_problems
    summary = summary_of(faulty_run['dir'])
    assert problems(0, summary, [('pick', SEED)]) == []
    text = '; '.join(problems(0, summary, [('pick', SEED), ('push', SEED)]))
    assert "1 of 2 harness episodes have no completed ROS episode: [('push', 1000000)]" in text
    assert 'the harness did not run' in '; '.join(problems(0, summary, [('pick', SEED + 1)]))


def test_sigint_during_an_unanswered_tick_stops_at_once_and_leaves_the_episode_out(tmp_path):
    """The bridge waits 60 s before resending; SIGINT ends the wait, the cut episode is not scored."""
    policy = ScriptedPolicy(mute_from=tick(3 + 5 + 1))      # episode 2 (3 ticks + 0.5 s later), its second tick
    bridge = start_bridge(tmp_path, max_steps=3, families='pick,push', resend_after_s=60.0, sync_timeout_s=120.0)
    try:
        assert policy.muted.wait(90), bridge.output()
        bridge.popen.send_signal(signal.SIGINT)
        returncode = bridge.wait(30)
    finally:
        bridge.interrupt()
        policy.close()
    assert returncode == 130, bridge.output()
    summary = summary_of(tmp_path)
    assert [(e['family'], e['interrupted'], e['status']) for e in summary['episodes']] == \
        [('pick', False, 'failure'), ('push', True, 'interrupted')]
    assert (summary['planned_episodes'], summary['completed_episodes'], summary['interrupted_episodes']) == (2, 1, 1)
    assert not summary['complete'] and summary['overall']['episodes'] == 1 and 'push' not in summary['families']
    assert 'INCOMPLETE' in markdown_summary([summary])
    text = '; '.join(compare_script().ros_run_problems(130, summary, [('pick', SEED), ('push', SEED)]))
    assert 'exited with code 130' in text and "interrupted (not scored): [('push', 1000000)]" in text


def test_a_policy_node_that_leaves_stops_the_run_with_an_error(tmp_path):
    """Without a process supervisor (ros2 launch, a bare start) the bridge itself notices the node is gone."""
    policy = ScriptedPolicy(mute_from=tick(3))
    bridge = start_bridge(tmp_path, max_steps=8)
    try:
        assert policy.muted.wait(90), bridge.output()
        policy.close()
        returncode = bridge.wait(60)
    finally:
        bridge.interrupt()
    assert returncode == 2, bridge.output()
    assert 'the policy node is gone' in bridge.output()
    summary = summary_of(tmp_path)
    (episode,) = summary['episodes']
    assert episode['interrupted'] and episode['steps'] == 3
    assert summary['completed_episodes'] == 0 and summary['overall']['episodes'] == 0


def test_a_policy_node_commanding_in_another_frame_is_refused_at_start_up(tmp_path):
    policy = ScriptedPolicy(command_frame='tool0')
    bridge = start_bridge(tmp_path, max_steps=2)
    try:
        returncode = bridge.wait(90)
    finally:
        bridge.interrupt()
        policy.close()
    assert returncode == 2, bridge.output()
    assert f"/{NAME} has command_frame 'tool0', but the simulator applies twists in 'base_link'" in bridge.output()
    assert not (tmp_path / 'summary.json').exists()


def test_bridge_parameters_take_an_integer_for_a_float_and_refuse_a_wrong_type_with_a_message():
    """``--bridge-param startup_timeout_s=30`` (an integer for a float) is 30.0; a word for a count is refused."""
    for overrides, check in ((['startup_timeout_s:=30'], lambda node: node.settings.startup_timeout_s == 30.0),
                             (['episodes_per_family:=many'], None)):
        context = rclpy.Context()
        args = ['--ros-args'] + [part for value in overrides for part in ('-p', value)]
        rclpy.init(context=context, args=args, domain_id=DOMAIN)
        try:
            if check is None:
                with pytest.raises(BridgeAbort, match='episodes_per_family'):
                    SimBridgeNode(context=context)
            else:
                node = SimBridgeNode(context=context)
                assert check(node)
                node.destroy_node()
        finally:
            rclpy.try_shutdown(context=context)
