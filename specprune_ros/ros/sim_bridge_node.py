"""The ``sim_bridge`` node (console script ``specprune_sim_bridge``).

Runs the simulated tabletop tasks and looks like a robot to the policy node.

Publishes (names relative, remap as usual):
  /clock                               rosgraph_msgs/Clock: sim time (the policy node runs with use_sim_time)
  <camera_topics>                      sensor_msgs/Image rgb8, header.stamp = sim time of the frame
  ee_pose                              geometry_msgs/PoseStamped: tool-centre point in base_link, gripper down
  gripper_state                        sensor_msgs/JointState (finger joints) or std_msgs/Float64 (finger gap)
  instruction                          std_msgs/String, reliable + transient local, once per episode
  ~/episode                            diagnostic_msgs/DiagnosticStatus per finished episode (outcome values)
Subscribes:
  delta_twist_cmds                     geometry_msgs/TwistStamped -> action = v * 0.1 s / scale
  gripper_command                      std_msgs/Float64 -> gripper action in [-1, 1]
  <policy_node>/action_chunk, /inference   (sync bookkeeping, latency and kept-token statistics)

Modes: ``sync`` waits for the policy's command every tick (protocol: ``specprune_ros.bridge.sync_gate``);
``realtime`` steps every 0.1 s of wall-clock time and applies the commands in effect
(``specprune_ros.bridge.realtime``). At the end a summary (JSON + markdown) is written to ``summary_path``.

Twists are applied in ``base_frame`` axes: a policy node whose ``command_frame`` differs is refused at start-up,
and twists labelled with another frame are counted (``foreign_frame_twists`` in the summary). A sync tick nobody
answers within ``sync_timeout_s`` is applied as a zero twist with the gripper unchanged and counted in its
episode; if the policy node has left the ROS graph by then, the run stops with exit code 2. Episodes cut short
(policy node gone, SIGINT) are marked interrupted and left out of the success statistics.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Optional

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, TwistStamped
from lifecycle_msgs.srv import GetState
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from specprune_ros.bridge.conversions import (CommandUnits, aligned_start_ns, command_to_action,
                                              down_facing_quaternion, finger_joint_positions,
                                              gripper_value_to_action, seconds_to_ns, stamp_parts)
from specprune_ros.bridge.episodes import (EpisodeLog, EpisodeOutcome, EpisodeSpec, episode_plan,
                                           markdown_summary, summarize_outcomes, write_summary)
from specprune_ros.bridge.realtime import CommandTimeline
from specprune_ros.bridge.settings import BridgeSettings
from specprune_ros.bridge.sync_gate import TickGate
from specprune_ros.command_line import help_requested, parameters_help
from specprune_ros.ros import output_messages as messages
from specprune_ros.ros.parameter_declaration import normalise_overrides
from specprune_ros.ros.ros_helpers import BackgroundExecutor, call_service, remote_parameters
from specprune_ros.sim import CONTROL_PERIOD_S, ROTATION_SCALE_RAD, TRANSLATION_SCALE_M, TabletopEnv

NODE_NAME = 'sim_bridge'
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
COMMANDS_IN = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
OUTCOMES = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
POLICY_PARAMETERS = ('use_sim_time', 'replan_every_steps', 'publish_on_new_chunk', 'control_rate_hz',
                     'gripper_open_value', 'gripper_closed_value', 'method', 'model', 'command_frame')


SIM_EPOCH_MODULO_NS = 1_000_000 * 1_000_000_000
SIM_EPOCH_FLOOR_NS = 10 * 1_000_000_000


class BridgeAbort(RuntimeError):
    """The run cannot go on (no policy node, wrong configuration); the message says why."""


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def to_time(ns: int):
    sec, nanosec = stamp_parts(ns)
    return Time(sec=sec, nanosec=nanosec)


class SimBridgeNode(Node):
    """See the module docstring; ``run()`` (caller's thread) runs every episode, callbacks run elsewhere."""

    def __init__(self, node_name: str = NODE_NAME, overrides: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        descriptions = BridgeSettings.descriptions()
        errors, empty = normalise_overrides(self, BridgeSettings.defaults())     # e.g. an int for a float
        errors.update({name: f'{name}: empty' for name in empty})
        for name, default in BridgeSettings.defaults().items():
            value = (overrides or {}).get(name, default)
            try:
                self.declare_parameter(name, value, ParameterDescriptor(description=descriptions[name]))
            except (InvalidParameterTypeException, InvalidParameterValueException) as error:
                errors[name] = f'{name}: {str(error).split("Reason: ", 1)[-1]}'
                self.declare_parameter(name, value, ParameterDescriptor(description=descriptions[name]),
                                       ignore_override=True)
        if errors:
            raise BridgeAbort('invalid sim_bridge parameters: ' + '; '.join(errors.values()))
        values = {name: self.get_parameter(name).value for name in BridgeSettings.defaults()}
        self.settings = BridgeSettings.from_mapping(values)
        errors = self.settings.validate()
        if errors:
            raise BridgeAbort('invalid sim_bridge parameters: ' + '; '.join(errors))
        s = self.settings
        self.period_ns = seconds_to_ns(CONTROL_PERIOD_S)
        self.units = CommandUnits(TRANSLATION_SCALE_M, ROTATION_SCALE_RAD, CONTROL_PERIOD_S,
                                  s.gripper_open_value, s.gripper_closed_value)
        self.stop_event = threading.Event()
        self.outcomes: list[EpisodeOutcome] = []
        self.policy_info: dict = {}
        self.foreign_frame_twists = 0           # twists whose header.frame_id is neither empty nor base_frame
        self._abort: Optional[BridgeAbort] = None
        self.planned_episodes: Optional[int] = None
        self._log: Optional[EpisodeLog] = None
        self._log_lock = threading.Lock()
        self.gate = TickGate(s.replan_every_steps, self.period_ns, s.settle_s)
        self.timeline = CommandTimeline(seconds_to_ns(s.command_timeout_s))
        self._sim_base: Optional[tuple[int, int]] = None     # realtime: (sim ns, monotonic ns) at episode start
        # publishers
        self.clock_pub = self.create_publisher(Clock, '/clock', RELIABLE)
        self.image_pubs = [self.create_publisher(Image, topic, RELIABLE) for topic in s.camera_topics]
        self.pose_pub = self.create_publisher(PoseStamped, s.ee_pose_topic, RELIABLE)
        state_type = JointState if s.gripper_state_type == 'joint_state' else Float64
        self.gripper_state_pub = self.create_publisher(state_type, s.gripper_state_topic, RELIABLE)
        self.instruction_pub = self.create_publisher(String, s.instruction_topic, LATCHED)
        self.episode_pub = self.create_publisher(DiagnosticStatus, '~/episode', OUTCOMES)
        # subscriptions
        self.twist_sub = self.create_subscription(TwistStamped, s.twist_topic, self._on_twist, COMMANDS_IN)
        self.gripper_sub = self.create_subscription(Float64, s.gripper_topic, self._on_gripper, COMMANDS_IN)
        if s.policy_node:
            self.create_subscription(JointTrajectory, f'{s.policy_node}/action_chunk', self._on_chunk, COMMANDS_IN)
            self.create_subscription(DiagnosticStatus, f'{s.policy_node}/inference', self._on_inference,
                                     COMMANDS_IN)
        self.env = None

    # --- time ----------------------------------------------------------------------------------------------
    def sim_now_ns(self) -> int:
        """Sim time now in real-time mode (it runs with the wall clock, except while the simulator steps).

        Not used in sync mode.
        """
        base = self._sim_base
        if base is None:
            return 0
        return base[0] + max(time.monotonic_ns() - base[1], 0)

    def publish_clock(self, ns: int) -> None:
        self.clock_pub.publish(Clock(clock=to_time(ns)))

    def stop(self) -> None:
        """Interrupt the run (SIGINT / SIGTERM): every wait returns now, the current episode is marked interrupted."""
        self.stop_event.set()
        self.gate.stop()

    # --- callbacks -----------------------------------------------------------------------------------------
    def _on_twist(self, msg: TwistStamped) -> None:
        frame = msg.header.frame_id.lstrip('/')
        if frame and frame != self.settings.base_frame.lstrip('/'):
            self.foreign_frame_twists += 1
            if self.foreign_frame_twists == 1:
                self.get_logger().warning(
                    f'twist in frame {msg.header.frame_id!r}: the simulator applies twists in '
                    f'{self.settings.base_frame!r} axes (counted as foreign_frame_twists in the summary)')
        t = msg.twist
        values = (t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z)
        if self.settings.mode == 'sync':
            self.gate.on_twist(stamp_ns(msg.header.stamp), values, time.monotonic())
        else:
            self.timeline.put_twist(self.sim_now_ns(), values)

    def _on_gripper(self, msg: Float64) -> None:
        if self.settings.mode == 'sync':
            self.gate.on_gripper(msg.data, time.monotonic())
        else:
            self.timeline.put_gripper(msg.data)

    def _on_chunk(self, msg: JointTrajectory) -> None:
        if self.settings.mode == 'sync':
            self.gate.on_chunk(stamp_ns(msg.header.stamp), time.monotonic())

    def _on_inference(self, msg: DiagnosticStatus) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.add_inference(messages.values_of(msg))

    # --- publishing the robot ------------------------------------------------------------------------------
    def publish_state(self, ns: int) -> None:
        env, s = self.env, self.settings
        stamp = to_time(ns)
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, s.base_frame
        p = env.tcp_pos()
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = (float(v) for v in p)
        q = down_facing_quaternion(env.hand_yaw())
        o = pose.pose.orientation
        o.x, o.y, o.z, o.w = q
        self.pose_pub.publish(pose)
        gap = env.finger_gap()
        if s.gripper_state_type == 'joint_state':
            joints = JointState(name=list(s.finger_joint_names),
                                position=finger_joint_positions(gap, len(s.finger_joint_names)))
            joints.header.stamp, joints.header.frame_id = stamp, s.base_frame
            self.gripper_state_pub.publish(joints)
        else:
            self.gripper_state_pub.publish(Float64(data=float(gap)))

    def publish_images(self, images: dict, ns: int) -> None:
        stamp = to_time(ns)
        for name, publisher in zip(self.settings.camera_names, self.image_pubs):
            publisher.publish(messages.rgb_image_message(images[name], stamp, f'{name}_optical_frame'))

    def publish_observation(self, images: Optional[dict], ns: int, wait_for_timer: bool = False) -> None:
        """State first, then the clock, then the frames (the node starts inference on new frames).

        ``images`` None: no frames this tick.

        ``wait_for_timer`` (sync mode): the frames go out once the node's timer answered the clock advance.
        """
        self.publish_state(ns)
        self.publish_clock(ns)
        if wait_for_timer:
            if not self.gate.wait_first_twist(self.settings.timer_wait_s):
                self.gate.counters.timer_waits_expired += 1
        elif self.settings.clock_lead_s:
            time.sleep(self.settings.clock_lead_s)
        if images is not None:
            self.publish_images(images, ns)

    def publish_outcome(self, outcome: EpisodeOutcome) -> None:
        values = outcome.as_values()
        clean = outcome.success and not outcome.timeouts and not outcome.interrupted
        status = DiagnosticStatus(level=DiagnosticStatus.OK if clean else DiagnosticStatus.WARN,
                                  name=f'{self.get_fully_qualified_name()}: episode',
                                  message=outcome.status,
                                  hardware_id=f'{outcome.family}:{outcome.seed}',
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        self.episode_pub.publish(status)

    # --- start-up ------------------------------------------------------------------------------------------
    def wait_for_policy(self) -> None:
        """Until the policy node listens to the cameras and commands the robot (and is active)."""
        s = self.settings
        deadline = time.monotonic() + s.startup_timeout_s
        logged = False
        while not self.stop_event.is_set():
            listening = all(self.count_subscribers(p.topic_name) >= s.min_camera_subscribers for p in self.image_pubs)
            commanding = self.count_publishers(self.twist_sub.topic_name) > 0
            answers_heard = all(self.count_subscribers(topic) >= s.min_command_subscribers
                                for topic in self._policy_answer_topics())
            if listening and commanding and answers_heard and (not s.policy_node or self._policy_node_present()):
                break
            if time.monotonic() > deadline:
                raise BridgeAbort(f'no policy node after {s.startup_timeout_s:.0f} s: nobody subscribes to '
                                  f'{[p.topic_name for p in self.image_pubs]} and publishes '
                                  f'{self.twist_sub.topic_name} (is specprune_node running, on this '
                                  'ROS_DOMAIN_ID, with matching topic names?)')
            if not logged:
                self.get_logger().info('waiting for the policy node (camera subscribers and a twist publisher)')
                logged = True
            time.sleep(0.1)
        if s.policy_node:
            self._read_policy_parameters()
            self._wait_policy_active(deadline)

    def _policy_answer_topics(self) -> list[str]:
        """The topics the policy node answers on, each of which this bridge subscribes to."""
        topics = [self.twist_sub.topic_name, self.gripper_sub.topic_name]
        if self.settings.policy_node:
            topics += [f'{self.settings.policy_node}/action_chunk', f'{self.settings.policy_node}/inference']
        return topics

    def _policy_node_present(self) -> bool:
        wanted = self.settings.policy_node.rstrip('/')
        return any(f"{namespace.rstrip('/')}/{name}" == wanted
                   for name, namespace in self.get_node_names_and_namespaces())

    def _policy_gone(self) -> str:
        """Why the policy node is no longer there ('' while it is: it may only be slow)."""
        s = self.settings
        if s.policy_node and not self._policy_node_present():
            return f'{s.policy_node} has left the ROS graph'
        if self.count_publishers(self.twist_sub.topic_name) == 0:
            return f'nobody publishes {self.twist_sub.topic_name} any more'
        return ''

    def _read_policy_parameters(self) -> None:
        s = self.settings
        values = remote_parameters(self, s.policy_node, POLICY_PARAMETERS, timeout_s=10.0)
        if values is None:
            self.get_logger().warning(f'{s.policy_node} does not answer get_parameters: assuming '
                                      f'replan_every_steps {s.replan_every_steps} and a sim-time clock')
            return
        self.policy_info = {k: v for k, v in values.items() if v is not None}
        if s.mode == 'sync' and values.get('use_sim_time') is False:
            raise BridgeAbort(f'{s.policy_node} runs on wall-clock time: step-synchronous mode needs '
                              'use_sim_time:=true on the policy node (config/sim_bridge.yaml sets it)')
        frame = values.get('command_frame')
        if isinstance(frame, str) and frame.lstrip('/') != s.base_frame.lstrip('/'):
            raise BridgeAbort(f'{s.policy_node} has command_frame {frame!r}, but the simulator applies twists in '
                              f'{s.base_frame!r} (base_frame): a servo would read these twists in {frame!r} axes; '
                              f'set command_frame:={s.base_frame} on the policy node')
        if isinstance(values.get('replan_every_steps'), int):
            self.gate.replan_every_steps = values['replan_every_steps']
        if values.get('publish_on_new_chunk') is False and s.mode == 'sync':
            self.get_logger().warning('publish_on_new_chunk is false on the policy node: in sync mode every '
                                      "chunk's first action is lost and each inference tick waits settle_s")
        rate = values.get('control_rate_hz')
        if isinstance(rate, float) and rate * self.units.period_s < 1.0 - 1e-9:
            self.get_logger().warning(f'policy control_rate_hz {rate} is below the simulator rate 10 Hz')
        opened, closed = values.get('gripper_open_value'), values.get('gripper_closed_value')
        if isinstance(opened, float) and isinstance(closed, float) and opened != closed:
            self.units = CommandUnits(self.units.translation_scale_m, self.units.rotation_scale_rad,
                                      self.units.period_s, opened, closed)
        self.get_logger().info(f'policy node {s.policy_node}: {self.policy_info}')

    def _wait_policy_active(self, deadline: float) -> None:
        s = self.settings
        while not self.stop_event.is_set():
            reply = call_service(self, GetState, f'{s.policy_node}/get_state', GetState.Request(), timeout_s=2.0)
            if reply is None:
                self.get_logger().warning(f'{s.policy_node}/get_state unavailable: not waiting for activation')
                return
            if reply.current_state.label == 'active':
                return
            if time.monotonic() > deadline:
                raise BridgeAbort(f'{s.policy_node} is {reply.current_state.label!r}, not active, after '
                                  f'{s.startup_timeout_s:.0f} s (configure failed? see its log and /diagnostics)')
            time.sleep(0.2)

    # --- episodes ------------------------------------------------------------------------------------------
    def run(self) -> list[EpisodeOutcome]:
        """Every planned episode; returns the outcomes (also written to summary_path)."""
        s = self.settings
        plan = episode_plan(s.families, s.episodes_per_family, s.seed_start)
        self.env = TabletopEnv(family=plan[0].family if plan else s.families[0], image_size=s.image_size,
                               cameras=tuple(s.camera_names))
        self.wait_for_policy()
        # default: wall-clock seconds modulo 10^6. Small numbers keep float-second arithmetic exact at the 0.1 s
        # ticks (at epoch magnitudes, 1.8e9 s, doubles resolve only ~0.24 us), and a restarted bridge still moves
        # time forward (except at the wrap, every 11.6 days)
        start = seconds_to_ns(s.start_time_s) if s.start_time_s > 0 else \
            SIM_EPOCH_FLOOR_NS + time.time_ns() % SIM_EPOCH_MODULO_NS
        t = aligned_start_ns(start, self.period_ns)
        gap = aligned_start_ns(seconds_to_ns(s.episode_gap_s), self.period_ns)
        self.get_logger().info(f'{s.mode} mode: {len(plan)} episodes of {s.families}, seeds from {s.seed_start}')
        self.planned_episodes = len(plan)
        for index, spec in enumerate(plan):
            if self.stop_event.is_set():
                break
            run = self._run_sync if s.mode == 'sync' else self._run_realtime
            log, t_end = run(spec, t)
            outcome = log.outcome((t_end - t) * 1e-9, save_actions=s.save_actions)
            self.outcomes.append(outcome)
            self.publish_outcome(outcome)
            self.get_logger().info(
                f'episode {index + 1}/{len(plan)} {spec.family} seed {spec.seed}: '
                f'{outcome.status} in {outcome.steps} steps '
                f'({outcome.wall_time_s:.1f} s wall, {outcome.inferences} inferences, '
                f'model {outcome.model_latency_ms_median:.1f} ms, '
                f'jerk {outcome.mean_abs_jerk:.2f} m/s^3, holds {outcome.hold_fraction * 100:.0f}%)')
            if self._abort is not None:
                break
            t = t_end + gap
        self.env.close()
        if self._abort is not None:
            raise self._abort
        return self.outcomes

    def _begin_episode(self, spec: EpisodeSpec, t_ns: int) -> tuple[Any, EpisodeLog]:
        obs = self.env.reset(seed=spec.seed, family=spec.family, render=True)
        # Move sim time to one period before the first tick first: the previous episode's last frames are then
        # stale for the node, so neither the instruction change nor the reset starts an inference on them.
        self.publish_clock(t_ns - self.period_ns)
        time.sleep(0.05)
        self.instruction_pub.publish(String(data=obs.instruction))
        s = self.settings
        if s.policy_node:
            call_service(self, Trigger, f'{s.policy_node}/reset', Trigger.Request(), timeout_s=2.0)
        time.sleep(0.05)  # the instruction and the reset reach the node before the first frames
        log = EpisodeLog(spec=spec, instruction=obs.instruction, start_stamp_ns=t_ns, period_s=self.units.period_s)
        with self._log_lock:
            self._log = log
        return obs, log

    def _end_episode(self) -> None:
        with self._log_lock:
            self._log = None

    def _max_steps(self) -> int:
        limit = self.env.max_steps
        return min(limit, self.settings.max_steps) if self.settings.max_steps else limit

    def _apply(self, log: EpisodeLog, twist: np.ndarray, gripper: Optional[float], stale: float = 0.0,
               how: str = '', render: bool = True, keep_gripper: bool = False) -> tuple[Any, bool]:
        """Step the simulator with one command; ``keep_gripper``: the previous period's gripper action."""
        if keep_gripper:
            gripper_action = float(log.actions[-1][6]) if log.actions else -1.0
        else:
            gripper_action = -1.0 if gripper is None else gripper_value_to_action(gripper, self.units)
        action = command_to_action(twist, gripper_action, self.units)
        log.add_period(action, twist, stale, how)
        obs, done, success = self.env.step(action, render=render)
        log.success = bool(success)
        return obs, done

    def _run_sync(self, spec: EpisodeSpec, t: int) -> tuple[EpisodeLog, int]:
        s = self.settings
        obs, log = self._begin_episode(spec, t)
        self.gate.begin_episode()
        self.gate.reset_gripper(None)
        try:
            for _ in range(self._max_steps()):
                if self.stop_event.is_set():
                    log.interrupted = True
                    break
                # Frames only when the node will look (it re-plans every replan_every_steps ticks): unused frames
                # of a previous tick could otherwise start an inference from the worker's periodic poll between
                # the clock advance and this tick's frames. The state goes out every tick.
                expected = self.gate.begin_tick(t, time.monotonic())
                # frames of a tick without an inference were not rendered (and are never sent, resends included)
                frames = (obs.images or self.env.render()) if expected else None
                self.publish_observation(frames, t, wait_for_timer=True)
                started = time.monotonic()
                status = self.gate.wait(s.resend_after_s)
                while status == 'waiting' and not self.stop_event.is_set():
                    if time.monotonic() - started >= s.sync_timeout_s:
                        break
                    log.resends += 1   # lost frames or clock, or a dropped chunk: show the observation again
                    self.publish_observation(frames, t)
                    status = self.gate.wait(s.resend_after_s)
                if status == 'waiting' and self.stop_event.is_set():
                    log.interrupted = True
                    break
                if status == 'waiting':
                    gone = self._policy_gone()
                    if gone:
                        self._abort = BridgeAbort(f'no answer for sim time {t * 1e-9:.1f} s and {gone}: the policy '
                                                  'node is gone, stopping the run')
                        log.interrupted = True
                        break
                    self.get_logger().warning(f'no answer for sim time {t * 1e-9:.1f} s after '
                                              f'{s.sync_timeout_s:g} s: applying a zero twist (gripper unchanged)')
                answer = self.gate.answer(status if status != 'waiting' else 'timeout')
                render = self.gate.inference_due(t + self.period_ns)
                obs, done = self._apply(log, answer.twist, answer.gripper, how=answer.how, render=render,
                                        keep_gripper=answer.how == 'timeout')
                t += self.period_ns
                if done:
                    break
        finally:
            self._end_episode()
        return log, t

    def _run_realtime(self, spec: EpisodeSpec, t: int) -> tuple[EpisodeLog, int]:
        s = self.settings
        obs, log = self._begin_episode(spec, t)
        self.timeline.clear(gripper=None)
        self._sim_base = (t, time.monotonic_ns())
        clock_step = 1.0 / s.clock_rate_hz
        try:
            self.publish_observation(obs.images, t)
            for _ in range(self._max_steps()):
                if self.stop_event.is_set():
                    log.interrupted = True
                    break
                t_next = t + self.period_ns
                while not self.stop_event.is_set():
                    now = self.sim_now_ns()
                    if now >= t_next:
                        break
                    self.publish_clock(now)
                    time.sleep(min(clock_step, (t_next - now) * 1e-9))
                if self.stop_event.is_set():
                    log.interrupted = True
                    break
                # sim time stands still while the simulator computes the step (an infinitely fast simulator:
                # every millisecond the policy needs is charged, none of the bridge's own); it resumes at t_next
                self._sim_base = (t_next, 1 << 62)
                command = self.timeline.period_command(t, t_next)
                obs, done = self._apply(log, command.twist, command.gripper, command.stale_fraction)
                t = t_next
                self.publish_state(t)
                self.publish_clock(t)
                self._sim_base = (t, time.monotonic_ns())
                self.publish_images(obs.images, t)
                if done:
                    break
        finally:
            self._sim_base = None
            self._end_episode()
        return log, t

    # --- summary -------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        s = self.settings
        label = s.label or str(self.policy_info.get('method', '')) or 'policy'
        return summarize_outcomes(self.outcomes, label=label, mode=s.mode, planned=self.planned_episodes)

    def finish(self) -> Optional[dict]:
        if not self.outcomes:
            return None
        s = self.settings
        summary = self.summary()
        extra = {'policy': self.policy_info, 'bridge': {k: v for k, v in vars(s).items()},
                 'sync_counters': vars(self.gate.counters)}
        summary['sync_counters'] = vars(self.gate.counters)
        summary['foreign_frame_twists'] = self.foreign_frame_twists
        if s.summary_path:
            json_path, md_path = write_summary(summary, s.summary_path, extra)
            self.get_logger().info(f'summary written to {json_path} and {md_path}')
        self.get_logger().info('\n' + markdown_summary([summary]))
        return summary


def main(args: Optional[list[str]] = None) -> int:
    """Entry point of ``sim_bridge``: run the episodes, write the summary, exit (0 = all episodes ran).

    Exit code 2: the run could not start or go on (no policy node, a wrong configuration, the policy node gone
    mid-run); 130: interrupted.
    """
    if help_requested(args):
        print(parameters_help(NODE_NAME, 'The MuJoCo tabletop simulator as a ROS node: it runs the episodes against '
                              'the policy node and writes the summary (docs: README, "Simulation testing").',
                              BridgeSettings), end='')
        return 0
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = SimBridgeNode()
    except BridgeAbort as error:
        print(f'sim_bridge: {error}', file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: node.stop())
    spinner = BackgroundExecutor(node)
    code = 0
    try:
        node.run()
        if node.stop_event.is_set():
            code = 130
    except BridgeAbort as error:
        node.get_logger().error(str(error))
        code = 2
    finally:
        node.finish()
        if code == 0 and not node.settings.exit_when_done:
            node.stop_event.wait()   # keep the node (and its latched outcomes) up until interrupted
        spinner.stop()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == '__main__':
    sys.exit(main())
