"""``specprune_node``: a lifecycle node that runs a VLA policy with visual-token pruning.

Lifecycle: configure validates the parameters, loads the policy and warms it up; activate starts the
control timer (commands); deactivate publishes a zero twist and stops; cleanup frees the policy. With
``autostart`` the node configures and activates itself.

Topics (relative names, remap them; cameras come from ``camera_topics``):
  in : <camera_topics> sensor_msgs/Image or CompressedImage (sensor-data QoS)
       instruction     std_msgs/String (reliable; from volatile and transient-local publishers alike, and the
                       latched instruction of a publisher that started first)
       ee_pose         geometry_msgs/PoseStamped  } proprio, with proprio_source 'pose'
       gripper_state   sensor_msgs/JointState or std_msgs/Float64 (finger gap, m)
       <joint_state_topic>  sensor_msgs/JointState: proprio_source 'joint_state' (the state joints' positions,
                       matched by name, in the policy's state order; extra joints ignored)
  out: delta_twist_cmds  geometry_msgs/TwistStamped, one per control tick (MoveIt Servo input: switch Servo's
                         command type to TWIST first, see config/specprune.yaml); end-effector policies only
       gripper_command   std_msgs/Float64 or Float64MultiArray (gripper_command_type; not published while holding);
                         end-effector policies only
       <joint_command_topic>  std_msgs/Float64MultiArray, the joint targets of each control tick in joint_names
                         order, clamped into joint_limits and velocity-limited per tick; joint-space policies only
                         (nothing new is published while holding: a forward controller keeps the last)
       ~/action_chunk    trajectory_msgs/JointTrajectory per inference (see ``specprune_ros.ros.output_messages``)
       ~/inference       diagnostic_msgs/DiagnosticStatus per inference (latencies, kept ratio, resets)
       /diagnostics      diagnostic_msgs/DiagnosticArray, every diagnostics_period_s
       ~/debug/kept_patches  sensor_msgs/Image (publish_debug_image)
  srv: ~/reset (std_srvs/Trigger: reset the temporal token state), ~/enable (std_srvs/SetBool)

Bad input (an undecodable frame, a NaN pose, missing finger or state joints, a NaN joint position, a stamp more
than max_future_stamp_s ahead, an unexpected frame id) is counted in /diagnostics and logged (throttled per kind
and source); the robot holds (zero twist; joint-space policies: no new joint command) from the next control tick
until that source delivers a valid message again.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseStamped, TwistStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64, Float64MultiArray, String
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory

from specprune_ros.codecs.image_decoding import (DecodedFrame, ImageError, aspect_distortion, check_image_size,
                                                 decode_compressed_frame, fit_to)
from specprune_ros.codecs.instruction import (DuplicateFilter, InstructionError, string_bytes_from_cdr,
                                              validate_instruction)
from specprune_ros.codecs.kept_patches import draw_kept_patches, kept_patch_masks
from specprune_ros.codecs.proprio import POSE_LAYOUTS, PROPRIO_DIM, StateError, finger_gap_from_joints
from specprune_ros.command_line import help_requested, parameters_help
from specprune_ros.control.chunk_scheduler import control_rate_warning
from specprune_ros.control.controller import (AcceptedChunk, InferenceRequest, PolicyController, budget_settings,
                                              joint_command_filter)
from specprune_ros.control.inference_worker import InferenceWorker
from specprune_ros.control.joint_command import JointOrderError
from specprune_ros.control.latency_budget import budget_for_policy, unreachable_message
from specprune_ros.control.parameters import NodeParameters, ParameterError, unknown_parameter_message
from specprune_ros.control.runtime_stats import ERROR, OK, WARN
from specprune_ros.control.safety_filter import FilteredCommand
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.interface import Observation, Policy
from specprune_ros.ros import output_messages as messages
from specprune_ros.ros.image_conversion import RawImageConverter
from specprune_ros.ros.parameter_declaration import (declare_method_settings, declare_node_parameters,
                                                     read_node_parameters)

NODE_NAME = 'specprune_node'
# Two instruction subscriptions: transient-local receives the latched instruction of a publisher that started
# before the node; volatile matches every publisher, volatile ones included. Duplicates are dropped.
INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
INSTRUCTION_VOLATILE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
ASPECT_WARNING = 1.1          # warn when resizing changes a camera's aspect ratio by more than this factor
WORKER_STOP_TIMEOUT_S = 10.0  # how long cleanup and shutdown wait for an inference step to end
WORKER_STOPPED = 'the inference thread has stopped: no new action chunks until cleanup and configure'
COMMAND_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)
STATE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)


def load_policy_from(params: NodeParameters) -> Policy:
    """The policy named by the parameters (imported late: torch and the model are heavy)."""
    return load_policy(params.model, method=params.method, method_config=params.method_options(),
                       device=params.device, dtype=params.dtype, seed=params.seed)


def blank_observation(policy: Policy, instruction: str = 'pick up the red cube') -> Observation:
    """Black frames, a resting state and a task instruction every shipped model reads: the warm-up steps' input."""
    height, width = policy.image_size
    proprio = None
    if policy.proprio_dim:
        proprio = np.zeros(policy.proprio_dim, dtype=np.float32)
        if policy.proprio_dim == PROPRIO_DIM:
            proprio[4] = 1.0  # cos(yaw) of a zero yaw
    return Observation(images={name: np.zeros((height, width, 3), dtype=np.uint8) for name in policy.camera_names},
                       instruction=instruction, proprio=proprio)


def state_joint_names(params: NodeParameters, policy: Policy) -> list[str]:
    """The JointState joints of the policy's state vector: ``state_joint_names``, else the action names."""
    return params.state_joints() or list(policy.action_spec.action_names)


def check_policy_fits(params: NodeParameters, policy: Policy) -> list[str]:
    """Parameters that contradict the loaded policy (camera names, proprio, joint order and limits)."""
    errors = []
    if sorted(params.camera_names) != sorted(policy.camera_names):
        errors.append(f'camera_names {params.camera_names} do not match the policy cameras '
                      f'{list(policy.camera_names)}')
    joint_state_hint = (f'a policy whose state is joint positions (pi0 / pi0.5) needs proprio_source joint_state: '
                        f'the positions of joint_state_topic ({params.joint_state_topic!r}, sensor_msgs/JointState), '
                        "in the policy's state order given by state_joint_names")
    layouts = ', '.join(f'{name} {len(fields)}' for name, fields in POSE_LAYOUTS.items())
    if policy.proprio_dim and params.proprio_source == 'none':
        errors.append(f'the policy needs a {policy.proprio_dim}-D state: set proprio_source to pose (end-effector '
                      f'pose and finger gap; pose_layout {layouts} values) or joint_state; {joint_state_hint}')
    built = len(POSE_LAYOUTS[params.pose_layout])
    if params.proprio_source == 'pose' and policy.proprio_dim != built:
        errors.append(f'proprio_source pose with pose_layout {params.pose_layout} builds {built} values, the policy '
                      f'expects {policy.proprio_dim} (pose_layout {layouts}); ' + joint_state_hint)
    if params.proprio_source == 'joint_state' and not policy.proprio_dim:
        errors.append('proprio_source joint_state, but the policy takes no state: set proprio_source to none')
    elif params.proprio_source == 'joint_state':
        joints = state_joint_names(params, policy)
        if len(joints) != policy.proprio_dim:
            source = 'state_joint_names' if params.state_joints() else "the policy's action names (state_joint_names " \
                'is empty)'
            errors.append(f'proprio_source joint_state: {source} give {len(joints)} joints {joints[:12]}, the policy '
                          f'expects a {policy.proprio_dim}-D state: set state_joint_names to its {policy.proprio_dim} '
                          'joints in its state order')
    if policy.action_spec.action_space == 'joint':
        try:
            joint_command_filter(params, policy.action_spec)
        except JointOrderError as error:
            errors.append(str(error))
    elif params.command_joint_names() or params.joint_limits:
        errors.append('joint_names / joint_limits are set, but the policy commands end-effector deltas '
                      f'(action_space {policy.action_spec.action_space!r}): they apply to joint-space policies only')
    return errors


class SpecPruneNode(LifecycleNode):
    """See the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._declare_errors = declare_node_parameters(self)
        self._declare_errors.update(declare_method_settings(self))
        self.params = self._read_parameters_or_defaults()
        self.policy: Optional[Policy] = None
        self.controller: Optional[PolicyController] = None
        self.worker: Optional[InferenceWorker] = None
        self._previous_worker: Optional[InferenceWorker] = None    # released while still inside a step
        self.configure_error = ''
        self._input_subscriptions: list = []     # (rclpy's Node owns _subscriptions / _publishers)
        self._camera_subscriptions: dict = {}    # camera name -> its image subscription
        self._output_publishers: list = []
        self._control_timer = None
        self._publish_lock = threading.Lock()
        self._log_times: dict[str, float] = {}
        self._instruction_duplicates = DuplicateFilter()
        self._use_sim_time = bool(self.get_parameter('use_sim_time').value)
        self._aspect_warned: dict[str, set[tuple]] = {}    # camera -> frame sizes already warned about
        self._to_rgb = RawImageConverter()
        self._twist_pub = self._gripper_pub = self._chunk_pub = self._inference_pub = self._debug_pub = None
        self._joint_pub = None
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(self.params.diagnostics_period_s, self._publish_diagnostics)
        self.create_service(Trigger, '~/reset', self._on_reset)
        self.create_service(SetBool, '~/enable', self._on_enable)
        self.add_on_set_parameters_callback(self._check_parameter_change)
        self.add_post_set_parameters_callback(self._apply_parameter_change)
        for error in self._declare_errors.values():
            self.get_logger().error(f'parameter rejected at start-up: {error}')

    # --- helpers -------------------------------------------------------------------------------------------
    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def steady_now(self) -> float:
        """Arrival clock of the inputs.

        Monotonic on wall-clock time; under use_sim_time the sim clock (that is what a step-synchronous simulator or a
        paused bag holds still).
        """
        return self.now() if self._use_sim_time else time.monotonic()

    def lifecycle_state(self) -> str:
        """Label of the current lifecycle state (rclpy keeps it on its internal state machine)."""
        return self._state_machine.current_state[1]

    def _read_parameters_or_defaults(self) -> NodeParameters:
        try:
            return read_node_parameters(self)
        except ParameterError as error:
            self._declare_errors.update({f'schema {i}': e for i, e in enumerate(error.errors)})
            return NodeParameters()

    def _throttled(self, key: str) -> bool:
        """True when a log line under ``key`` may go out now (at most one per log_throttle_s)."""
        now = time.monotonic()
        if now - self._log_times.get(key, -np.inf) >= self.params.log_throttle_s:
            self._log_times[key] = now
            return True
        return False

    def _warn_throttled(self, key: str, message: str) -> None:
        if self._throttled(key):
            self.get_logger().warning(message)

    def _bad_input(self, kind: str, message: str, source: str = '') -> None:
        """Count a rejected message; with a ``source`` the robot holds until that source is valid again."""
        if self.controller is not None:
            if source:
                self.controller.reject(source, kind, message)
            else:
                self.controller.count_input_error(kind, message)
        self._log_rejected(message, source, kind)

    def _log_rejected(self, message: str, source: str = '', kind: str = '') -> None:
        """Warn about a rejected message, at most once per log_throttle_s for each kind and source."""
        self._warn_throttled(f'{kind}:{source}', 'ignored bad input' + (f' ({kind})' if kind else '') + f': {message}'
                             + (f'; holding until {source} is valid again' if source else ''))

    # --- lifecycle -----------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            return self._configure()
        except Exception as error:  # a transition callback must never raise (rclpy would hide the reason)
            self._fail_configure(f'{type(error).__name__}: {error}')
            self._release()
            return TransitionCallbackReturn.FAILURE

    def _fail_configure(self, message: str) -> TransitionCallbackReturn:
        self.configure_error = message
        self.get_logger().error(f'configure failed: {message}')
        return TransitionCallbackReturn.FAILURE

    def _configure(self) -> TransitionCallbackReturn:
        self.configure_error = ''
        previous = self._previous_worker
        if previous is not None and previous.running:   # its step still uses the released policy
            return self._fail_configure(f'the previous policy is still inside {previous.busy_with or "a step"}: '
                                        'a second model is not loaded beside it; configure again once it has ended')
        self._previous_worker = None
        errors = list(self._declare_errors.values())
        try:
            params = read_node_parameters(self)
            errors += params.validate()
        except ParameterError as error:
            errors += error.errors
        errors += self._unknown_overrides()
        if errors:
            return self._fail_configure('invalid parameters: ' + '; '.join(errors))
        self.params = params
        self._use_sim_time = bool(self.get_parameter('use_sim_time').value)
        self._start_diagnostics_timer(params.diagnostics_period_s)
        self._check_command_timeout(params)
        if params.torch_threads:
            import torch
            torch.set_num_threads(params.torch_threads)
        started = time.perf_counter()
        policy = load_policy_from(params)
        errors = check_policy_fits(params, policy)
        if errors:
            return self._fail_configure('; '.join(errors))
        for _ in range(params.warmup_steps):
            policy.predict(blank_observation(policy))
        policy.reset()
        self.policy = policy
        self.get_logger().info(f'loaded {params.model!r} with method {params.method!r} and warmed it up in '
                               f'{time.perf_counter() - started:.2f} s')
        slow_ticks = control_rate_warning(params.control_rate_hz, policy.action_spec.control_period_s)
        if slow_ticks:
            self.get_logger().warning(slow_ticks)
        budget = budget_for_policy(budget_settings(params), params.method, policy, params.budget_fallback_method,
                                   seed=params.seed, device=params.device)
        state_joints = state_joint_names(params, policy) if params.proprio_source == 'joint_state' else ()
        self.controller = PolicyController(params, tuple(policy.camera_names), policy.action_spec,
                                           needs_proprio=params.proprio_source != 'none', clock=self.steady_now,
                                           budget=budget, state_joints=state_joints)
        self._log_joint_setup(self.controller)
        self._create_subscriptions(params)
        self._create_publishers(self.controller.joint_space)
        self.worker = InferenceWorker(self.controller, policy, self.now, self._on_chunk,
                                      self._on_inference_failure, poll_s=0.5)
        self.worker.start()
        return TransitionCallbackReturn.SUCCESS

    def _start_diagnostics_timer(self, period_s: float) -> None:
        """Publish /diagnostics every ``period_s`` from now on (the timer is re-created when the period changed)."""
        if self._diagnostics_timer.timer_period_ns == round(period_s * 1e9):
            return
        self.destroy_timer(self._diagnostics_timer)
        self._diagnostics_timer = self.create_timer(period_s, self._publish_diagnostics)

    def _log_joint_setup(self, controller: PolicyController) -> None:
        if controller.state_joints:
            self.get_logger().info(f'robot state: positions of {list(controller.state_joints)} from '
                                   f'{self.params.joint_state_topic!r}')
        dropped = [name for name in controller.spec.action_names if name not in controller.safety.joint_names] \
            if controller.joint_space else []
        if dropped:
            self.get_logger().info(f'policy actions {dropped} are not in joint_names: not commanded on '
                                   f'{self.params.joint_command_topic!r}')
        if controller.joint_space and controller.safety.unlimited:
            self.get_logger().warning(f'joint commands of {controller.safety.unlimited} have no joint_limits: they '
                                      'go out as the policy gives them (set joint_limits.<joint>.min_position, '
                                      'max_position and max_velocity)')

    def _unknown_overrides(self) -> list[str]:
        """Overrides (params file, -p) that name no parameter of this node: a typo must not pass silently."""
        declared = set(self.list_parameters([], 0).names)
        # rclpy keeps a node's overrides only here; there is no public accessor
        return [unknown_parameter_message(name, declared) for name in sorted(self._parameter_overrides)
                if name not in declared]

    def _check_command_timeout(self, params: NodeParameters) -> None:
        period, timeout = 1.0 / params.control_rate_hz, params.servo_command_timeout_s
        if timeout and period > timeout / 2:
            self.get_logger().warning(
                f'commands go out every {period:.3f} s, more than half of servo_command_timeout_s {timeout} (the '
                f"twist consumer's timeout, MoveIt Servo's incoming_command_timeout): one late command stops the "
                f'arm. Raise the consumer timeout to >= {2 * period:.2f} s and servo_command_timeout_s with it, or '
                f'control_rate_hz to >= {2 / timeout:.0f}')

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.controller is None:
            return TransitionCallbackReturn.FAILURE
        result = super().on_activate(state)  # enables the lifecycle publishers
        self.controller.set_active(True)
        self._control_timer = self.create_timer(1.0 / self.params.control_rate_hz, self._on_tick)
        joints = self.controller.safety.joint_names if self.controller.joint_space else ()
        outputs = (f'joint commands on {self.params.joint_command_topic!r} ({", ".join(joints)})'
                   if self.params.joint_command_topic else 'no joint commands (joint_command_topic is empty)') \
            if self.controller.joint_space else 'twist and gripper commands'
        self.get_logger().info(f'active: {outputs} at {self.params.control_rate_hz} Hz'
                               + (' (dry run: no commands published)' if self.params.dry_run else ''))
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_commanding('deactivated')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._control_timer is not None:
            self._stop_commanding('shutting down')
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f'error processing from state {state.label}: releasing the policy')
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_commanding(self, why: str) -> None:
        """Stop the timer and send one zero twist while the publishers are still enabled."""
        if self._control_timer is not None:
            self.destroy_timer(self._control_timer)
            self._control_timer = None
        if self.controller is not None:
            with self._publish_lock:   # a tick being published finishes first; later ones find the node inactive
                self.controller.set_active(False)
                # a stop is always safe to send, even in dry run
                self._publish_locked(self.controller.safety.hold(why, self.now()))
            if self._twist_pub is not None:  # reliable: make sure the stop reaches the robot before we go
                self._twist_pub.wait_for_all_acked(Duration(seconds=0.5))

    def _release(self) -> None:
        worker = self.worker
        if worker is not None and not worker.stop(WORKER_STOP_TIMEOUT_S):
            self._previous_worker = worker
            self.get_logger().warning(
                f'the inference thread is still inside {worker.busy_with or "a step"} after waiting '
                f'{WORKER_STOP_TIMEOUT_S:g} s: the policy stays in memory until that step ends (its result is '
                'discarded), and configure is refused until then')
        self.worker = None
        if self._control_timer is not None:
            self.destroy_timer(self._control_timer)
            self._control_timer = None
        for subscription in self._input_subscriptions:
            self.destroy_subscription(subscription)
        with self._publish_lock:        # a command being published finishes first; none starts after
            self._twist_pub = self._gripper_pub = self._chunk_pub = self._inference_pub = self._debug_pub = None
            self._joint_pub = None
        for publisher in self._output_publishers:
            self.destroy_lifecycle_publisher(publisher)
        self._input_subscriptions, self._output_publishers, self._camera_subscriptions = [], [], {}
        self.controller = None
        self.policy = None
        # the next configure's subscription gets the latched instruction again, with the same sample identity
        self._instruction_duplicates = DuplicateFilter()

    # --- wiring --------------------------------------------------------------------------------------------
    def _create_subscriptions(self, params: NodeParameters) -> None:
        subs = self._input_subscriptions
        for name, topic, transport in zip(params.camera_names, params.camera_topics, params.camera_transports):
            if transport == 'compressed':
                subs.append(self.create_subscription(
                    CompressedImage, topic, lambda msg, cam=name: self._on_compressed_image(cam, msg),
                    qos_profile_sensor_data))
            else:
                subs.append(self.create_subscription(
                    Image, topic, lambda msg, cam=name: self._on_image(cam, msg), qos_profile_sensor_data))
            self._camera_subscriptions[name] = subs[-1]
        # the latched subscription cannot match volatile publishers; the volatile one covers them, so the
        # incompatible-QoS warning of the latched one would only mislead
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)
        subs.append(self.create_subscription(String, 'instruction', self._on_instruction, INSTRUCTION_QOS, raw=True,
                                             event_callbacks=quiet))
        subs.append(self.create_subscription(String, 'instruction', self._on_instruction, INSTRUCTION_VOLATILE_QOS,
                                             raw=True))
        if params.proprio_source == 'joint_state':
            subs.append(self.create_subscription(JointState, params.joint_state_topic, self._on_robot_joints,
                                                 STATE_QOS))
        if params.proprio_source == 'pose':
            subs.append(self.create_subscription(PoseStamped, 'ee_pose', self._on_pose, STATE_QOS))
            if params.gripper_state_type == 'joint_state':
                subs.append(self.create_subscription(JointState, 'gripper_state', self._on_joint_state, STATE_QOS))
            else:
                subs.append(self.create_subscription(Float64, 'gripper_state', self._on_finger_gap, STATE_QOS))

    def _create_publishers(self, joint_space: bool) -> None:
        """Twist and gripper commands for end-effector policies, joint commands for joint-space ones."""
        if joint_space:
            if self.params.joint_command_topic:
                self._joint_pub = self.create_lifecycle_publisher(Float64MultiArray, self.params.joint_command_topic,
                                                                  COMMAND_QOS)
                self._output_publishers.append(self._joint_pub)
        else:
            self._twist_pub = self.create_lifecycle_publisher(TwistStamped, 'delta_twist_cmds', COMMAND_QOS)
            gripper_type = Float64MultiArray if self.params.gripper_command_type == 'float64_array' else Float64
            self._gripper_pub = self.create_lifecycle_publisher(gripper_type, 'gripper_command', COMMAND_QOS)
            self._output_publishers += [self._twist_pub, self._gripper_pub]
        self._chunk_pub = self.create_lifecycle_publisher(JointTrajectory, '~/action_chunk', 10)
        self._inference_pub = self.create_lifecycle_publisher(DiagnosticStatus, '~/inference', 10)
        self._debug_pub = self.create_lifecycle_publisher(Image, '~/debug/kept_patches', qos_profile_sensor_data)
        self._output_publishers += [self._chunk_pub, self._inference_pub, self._debug_pub]

    # --- subscription callbacks: validate and store, nothing else ------------------------------------------
    def _store_frame(self, camera: str, header: Any, decode: Callable[[], DecodedFrame]) -> None:
        controller, policy = self.controller, self.policy
        if controller is None or policy is None:
            return
        try:
            stamp = messages.stamp_seconds(header.stamp)
            if stamp <= 0.0:
                raise ImageError('image_stamp', 'header.stamp is zero: frames must be stamped')
            frame = decode()
            check_image_size(frame.full_size, self.params.min_image_side)
            fit = getattr(policy, 'image_fit', 'stretch')
            rgb = fit_to(frame.pixels, policy.image_size, fit)
        except ImageError as error:
            self._bad_input(error.kind, f'camera {camera!r}: {error}', source=camera)
            return
        if fit == 'stretch':
            self._warn_if_squashed(camera, frame.full_size, tuple(policy.image_size))
        error = controller.put_frame(camera, rgb, stamp, self.now(), header.frame_id)
        if error:
            self._log_rejected(error, camera, error.kind)
            return
        if self.worker is not None:
            self.worker.wake()

    def _warn_if_squashed(self, camera: str, shape: tuple, size: tuple) -> None:
        """One warning per camera and frame size when resizing distorts the picture noticeably."""
        warned, key = self._aspect_warned.setdefault(camera, set()), tuple(shape)
        if key in warned:
            return
        warned.add(key)
        factor = aspect_distortion(shape, size)
        if factor > ASPECT_WARNING:
            self.get_logger().warning(
                f'camera {camera!r}: {shape[1]}x{shape[0]} frames are squashed to the policy input {size[1]}x{size[0]} '
                f'(aspect ratio changes by a factor {factor:.2f}); crop them to the aspect ratio the policy was '
                'trained on')

    def _on_image(self, camera: str, msg: Image) -> None:
        def decode() -> DecodedFrame:
            rgb = self._to_rgb(msg)
            return DecodedFrame(rgb, rgb.shape[:2])
        self._store_frame(camera, msg.header, decode)

    def _on_compressed_image(self, camera: str, msg: CompressedImage) -> None:
        at_least = tuple(self.policy.image_size) if self.params.jpeg_scaled_decode and self.policy else None
        self._store_frame(camera, msg.header, lambda: decode_compressed_frame(msg.data, msg.format, at_least))

    def _on_instruction(self, serialized: bytes, info: dict) -> None:
        if self.controller is None:
            return
        key = (str(info.get('publisher_gid')), info.get('publication_sequence_number'), info.get('source_timestamp'))
        if self._instruction_duplicates.seen(key):
            return                                   # the same message through the other subscription
        try:
            text = validate_instruction(string_bytes_from_cdr(serialized), self.params.max_instruction_bytes)
            check = getattr(self.policy, 'check_instruction', None)
            if check is not None:
                check(text)                          # words the model cannot read: not acted on, not retried
        except InstructionError as error:
            text = str(error) if str(error).startswith('instruction') else f'instruction: {error}'
            self._bad_input(error.kind, text, source='instruction')     # the robot holds: not the old task either
            return
        if self.controller.put_instruction(text) and self._throttled('instruction changed'):
            self.get_logger().info(f'instruction changed: {text!r} (temporal token state reset; further changes '
                                   f'within log_throttle_s are not logged)')
        if self.worker is not None:
            self.worker.wake()

    def _on_pose(self, msg: PoseStamped) -> None:
        if self.controller is None:
            return
        p, q = msg.pose.position, msg.pose.orientation
        error = self.controller.put_pose((p.x, p.y, p.z), (q.x, q.y, q.z, q.w),
                                         messages.stamp_seconds(msg.header.stamp), self.now(), msg.header.frame_id)
        if error:
            self._log_rejected(error, 'ee_pose', error.kind)

    def _on_joint_state(self, msg: JointState) -> None:
        if self.controller is None:
            return
        try:
            gap = finger_gap_from_joints(msg.name, msg.position, self.params.finger_joint_names)
        except StateError as error:
            self._bad_input('state_invalid', f'gripper_state: {error}', source='gripper_state')
            return
        self._put_gripper(gap, messages.stamp_seconds(msg.header.stamp))

    def _on_robot_joints(self, msg: JointState) -> None:
        if self.controller is None:
            return
        error = self.controller.put_joint_state(list(msg.name), list(msg.position),
                                                messages.stamp_seconds(msg.header.stamp), self.now())
        if error:
            self._log_rejected(error, 'joint_state', error.kind)

    def _on_finger_gap(self, msg: Float64) -> None:
        if self.controller is not None:
            self._put_gripper(msg.data, self.now())  # Float64 has no stamp: judged by arrival

    def _put_gripper(self, gap: float, stamp: float) -> None:
        error = self.controller.put_gripper(gap, stamp, self.now())
        if error:
            self._log_rejected(error, 'gripper_state', error.kind)

    # --- control timer and inference results ---------------------------------------------------------------
    def _on_tick(self) -> None:
        """One control tick (timer, or the worker on a new chunk), decided and published under the publish lock.

        A stop (deactivate, shutdown) takes the same lock, so no command decided before it goes out after its zero
        twist.
        """
        controller = self.controller
        if controller is None:
            return
        with self._publish_lock:
            now = self.now()
            command = controller.tick(now)
            stopped = self._worker_stopped()
            if stopped:
                with controller.lock:
                    command = command if command.holding else controller.safety.hold(WORKER_STOPPED, now)
                    controller.stats.hold_reason = command.hold_reason
            if not self.params.dry_run:
                self._publish_locked(command)
        if stopped and self._throttled('inference thread'):
            self.get_logger().error(f'holding: {WORKER_STOPPED}')
        if command.holding and controller.stats.waiting_for:
            self._warn_throttled('waiting for input', f'holding (zero commands): {controller.stats.waiting_for}'
                                 + self._topic_of(controller.stats.waiting_for))

    def _worker_stopped(self) -> bool:
        """Configured, but the inference thread is not running (it ended on an error it could not survive)."""
        worker = self.worker
        return self.controller is not None and (worker is None or not worker.running)

    def _topic_of(self, reason: str) -> str:
        """' (topic ...)' for a hold reason that names a camera, as the node resolved its topic; else ''."""
        for name, subscription in self._camera_subscriptions.items():
            if f'camera {name!r}' in reason:
                return f' (topic {subscription.topic_name})'
        return ''

    def _publish_locked(self, command: FilteredCommand) -> None:
        """Publish ``command`` (the caller holds ``_publish_lock``)."""
        if self._joint_pub is not None:
            joints = messages.joint_command_message(command.joints)
            if joints is not None:  # a hold publishes nothing: the forward controller keeps the last command
                self._joint_pub.publish(joints)
            return
        if self._twist_pub is None:
            return
        stamp = self.get_clock().now().to_msg()
        self._twist_pub.publish(messages.twist_message(command.twist, stamp, self.params.command_frame))
        if command.gripper is not None:
            gripper = messages.gripper_message(command.gripper, self.params.gripper_command_type)
            if gripper is not None:
                self._gripper_pub.publish(gripper)

    def _on_chunk(self, chunk: AcceptedChunk) -> None:
        """Worker thread.

        Command the chunk's first due action at once (and re-phase the timer to it), then publish the chunk, its
        inference record and the debug image.
        """
        params, policy = self.params, self.policy
        if self._chunk_pub is None or policy is None:
            return
        timer, controller = self._control_timer, self.controller
        if params.publish_on_new_chunk and timer is not None and controller is not None:
            self._on_tick()  # the command first: it is what latency is about
            try:
                timer.reset()  # the next tick comes one period after this command
            except Exception:  # the timer was destroyed by a concurrent deactivate
                pass
        period = policy.action_spec.control_period_s
        if controller is not None and controller.joint_space:   # the controller's joints, in its order
            names, columns = controller.safety.joint_names, controller.safety.columns
        else:
            names, columns = policy.action_spec.action_names, None
        self._chunk_pub.publish(messages.chunk_message(chunk, period, params.command_frame, names, columns))
        self._inference_pub.publish(messages.inference_message(chunk, self.get_fully_qualified_name(),
                                                               params.model, params.method))
        if chunk.reset_reason:
            self.get_logger().info(f'temporal token state reset: {chunk.reset_reason}')
        if chunk.budget is not None and chunk.budget.unreachable:
            self._warn_throttled('latency_budget', unreachable_message(chunk.budget, params.min_keep_ratio,
                                                                       chunk.model_latency_s))
        if params.publish_debug_image and chunk.record is not None:
            self._publish_debug_image(chunk, policy)

    def _publish_debug_image(self, chunk: AcceptedChunk, policy: Policy) -> None:
        try:
            masks = kept_patch_masks(chunk.record)
            picture = draw_kept_patches([chunk.images[name] for name in policy.camera_names], masks,
                                        self.params.debug_image_scale)
        except (AttributeError, IndexError, KeyError, ValueError) as error:
            self._warn_throttled('debug_image', f'cannot draw the kept patches: {error}')
            return
        self._debug_pub.publish(messages.rgb_image_message(picture, messages.to_stamp(chunk.source_stamp)))

    def _on_inference_failure(self, request: InferenceRequest, error: BaseException) -> None:
        """Worker thread: log a failed step (the controller has counted it and holds), naming where it raised."""
        frames = traceback.extract_tb(error.__traceback__)[-1:]
        where = ''.join(f' (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})' for f in frames)
        self._warn_throttled('inference', f'inference failed, holding: {type(error).__name__}: {error}{where}')

    # --- services ------------------------------------------------------------------------------------------
    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.controller is None:
            response.success, response.message = False, 'not configured'
            return response
        self.controller.request_reset('~/reset service')
        if self.worker is not None:
            self.worker.wake()
        response.success, response.message = True, 'temporal token state resets before the next inference'
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        result = self.set_parameters([Parameter('enabled', value=bool(request.data))])[0]
        response.success = result.successful
        holding = 'holding the last joint command' if self.controller is not None and self.controller.joint_space \
            else 'publishing zero twists'
        response.message = ('enabled' if request.data else f'disabled: {holding}') \
            if result.successful else result.reason
        return response

    # --- parameters at run time ----------------------------------------------------------------------------
    def _check_parameter_change(self, changes: list[Parameter]) -> SetParametersResult:
        """Refuse a change that makes a parameter invalid, or of a configure-time parameter once configured.

        Errors the parameters had before the change do not count: with two invalid values each can be fixed on
        its own (configure checks them all).
        """
        infos, state = NodeParameters.infos(), self.lifecycle_state()
        frozen = [p.name for p in changes if p.name in infos and infos[p.name].at_configure]
        if frozen and state != 'unconfigured':
            return SetParametersResult(successful=False, reason=f'{", ".join(frozen)} apply at configure: the node '
                                       f'is {state}; deactivate and clean it up, set them, then configure')
        try:
            candidate = read_node_parameters(self, {p.name: p.value for p in changes})
        except ParameterError as error:
            return SetParametersResult(successful=False, reason=str(error))
        try:
            before = set(read_node_parameters(self).validate())
        except ParameterError:
            before = set()
        errors = [error for error in candidate.validate() if error not in before]
        return SetParametersResult(successful=not errors, reason='; '.join(errors))

    def _apply_parameter_change(self, changes: list[Parameter]) -> None:
        for change in changes:  # a valid value replaces a rejected start-up override
            self._declare_errors.pop(change.name, None)
        try:
            params = read_node_parameters(self)
        except ParameterError:
            return
        dry_run_starts = params.dry_run and not self.params.dry_run
        self.params = params
        controller = self.controller
        if controller is not None:
            controller.update_parameters(params)
            controller.set_enabled(params.enabled)
            if dry_run_starts and self._control_timer is not None:
                with self._publish_lock:   # commands stop going out: the last one must be a stop
                    self._publish_locked(controller.safety.hold('dry run', self.now()))

    # --- diagnostics ---------------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        state = self.lifecycle_state()
        controller = self.controller
        if controller is None:
            level = ERROR if self.configure_error else WARN
            message = f'{state}: {self.configure_error}' if self.configure_error else state
            rows = [('lifecycle state', state), ('configure error', self.configure_error or 'none')]
        else:
            level, rows = controller.diagnostics()
            hold = controller.stats.hold_reason
            message = f'{state}: ' + (f'holding: {hold}' if hold else 'commanding')
            if self.params.dry_run:
                message += ' (dry run)'
            rows = [('lifecycle state', state), ('dry run', str(self.params.dry_run).lower()),
                    ('method', self.params.method)] + rows
            if state != 'active':
                level = max(level, WARN) if level != OK else WARN
            stopped = self._worker_stopped()
            rows.append(('inference thread', 'stopped' if stopped else 'running'))
            if stopped:
                level, message = ERROR, f'{state}: holding: {WORKER_STOPPED}'
        self._diagnostics_pub.publish(messages.diagnostics_message(
            level, f'{self.get_fully_qualified_name()}: policy', message, self.params.model, rows,
            self.get_clock().now().to_msg()))


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``specprune_node``: spin until SIGINT/SIGTERM, then stop the robot and exit."""
    if help_requested(args):
        print(parameters_help(NODE_NAME, 'The pruning VLA policy node (lifecycle; autostart configures and activates '
                              'it). Method settings: -p method_settings.<name>:=VALUE (README, "Pruning methods").',
                              NodeParameters), end='')
        return
    sys.setswitchinterval(0.0005)  # hand the GIL over quickly: frame callback -> inference worker -> command
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except RuntimeError as error:  # rcl's RCLError: most often a -p value that is a YAML mapping
        if 'parameter override rule' not in str(error):
            raise
        sys.exit(f'{NODE_NAME}: a -p override could not be parsed ({error}).\nA -p value that is a YAML mapping is '
                 'not a ROS parameter: give method settings one by one, e.g. -p method_settings.keep_ratio:=0.25 '
                 "-p method_settings.controller.alpha:=0.8, or quote the mapping: -p 'method_config:=\"{keep_ratio: "
                 "0.25}\"'")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    node = SpecPruneNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if node.params.autostart and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        while rclpy.ok() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    finally:
        if node.lifecycle_state() in ('active', 'inactive', 'unconfigured'):
            node.trigger_shutdown()  # active: a zero twist goes out first
        executor.remove_node(node)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
