"""The policy node's parameter schema.

One dataclass holding defaults, descriptions, ranges, choices and configure-time flags, plus the validation that
turns a bad value into a clear message.

The ROS node declares its parameters from this schema (``specprune_ros.ros.parameter_declaration``), the
launch configuration types its overrides with it, and ``config/specprune.yaml`` holds the robot defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from specprune_ros.codecs.proprio import POSE_LAYOUTS
from specprune_ros.control.joint_command import JointOrderError, joint_limits_from_settings, urdf_joint_limits
from specprune_ros.core.dataclass_mapping import UnknownFieldsError, dataclass_from_mapping
from specprune_ros.pruning.budget_knob import BudgetKnob
from specprune_ros.pruning.registry import available_methods, build_method, get_spec, method_config

METHODS = tuple(available_methods())          # the pruning registry is the one source of method names
# methods with a run-time token-budget knob (the latency budget sets it)
BUDGET_METHODS = tuple(name for name in METHODS if issubclass(get_spec(name).factory, BudgetKnob))
METHOD_SETTINGS_PREFIX = 'method_settings.'   # flattened method settings: method_settings.controller.alpha
JOINT_LIMITS_PREFIX = 'joint_limits.'         # ros2_control's joint limits: joint_limits.<joint>.max_velocity
PREFIXED_SETTINGS = (METHOD_SETTINGS_PREFIX, JOINT_LIMITS_PREFIX)
DTYPES = ('float32', 'bfloat16', 'float16')
CHUNK_MODES = ('replace', 'blend')
TRANSPORTS = ('raw', 'compressed')
PROPRIO_SOURCES = ('pose', 'joint_state', 'none')
POSE_LAYOUT_NAMES = tuple(POSE_LAYOUTS)
GRIPPER_STATE_TYPES = ('joint_state', 'float64')
GRIPPER_COMMAND_TYPES = ('float64', 'float64_array')
_DEVICE = re.compile(r'^(cpu|mps|cuda(:\d+)?)$')
_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')

Value = Union[bool, int, float, str, list]


@dataclass(frozen=True)
class ParamInfo:
    """How a parameter is described to ROS tools and checked."""

    description: str
    at_configure: bool = False                   # applied at configure: changeable only while unconfigured
    low: Optional[float] = None                  # inclusive range for numbers
    high: Optional[float] = None
    choices: tuple[str, ...] = ()                # allowed strings (each element, for string lists)


def _param(default: Value, description: str, **info: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={'info': ParamInfo(description, **info)})
    return field(default=default, metadata={'info': ParamInfo(description, **info)})


@dataclass
class NodeParameters:
    """Every parameter of ``specprune_node`` (ROS name = field name)."""

    # --- model -----------------------------------------------------------------------------------------
    model: str = _param('reference', "'reference' (the trained reference VLA), 'tiny-random' (plumbing tests) or "
                        'a local checkpoint directory', at_configure=True)
    device: str = _param('cpu', "torch device: 'cpu', 'cuda', 'cuda:N' or 'mps'", at_configure=True)
    dtype: str = _param('float32', 'model weights dtype', at_configure=True, choices=DTYPES)
    method: str = _param('specprune', 'visual-token pruning method', at_configure=True, choices=METHODS)
    method_config: str = _param('{}', "the pruning method's settings as a YAML/JSON mapping string, e.g. "
                                "'{keep_regions: [[1, 0, 0, 1, 1]]}'; single settings are simpler as "
                                'method_settings.<name> parameters (-p method_settings.keep_ratio:=0.25), which '
                                'take precedence', at_configure=True)
    seed: int = _param(0, 'random seed (random pruning, tiny-random weights)', at_configure=True, low=0, high=2**31 - 1)
    torch_threads: int = _param(0, 'torch intra-op threads (0 = leave the default)', at_configure=True, low=0, high=256)
    warmup_steps: int = _param(1, 'predictions on a blank observation at configure (JIT, allocator warm-up)',
                               at_configure=True, low=0, high=20)
    # --- inputs ----------------------------------------------------------------------------------------
    camera_names: list = _param(['agentview', 'wrist'], "the policy's camera names, in the order of camera_topics",
                                at_configure=True)
    camera_topics: list = _param(['camera/agentview/image_raw', 'camera/wrist/image_raw'],
                                 'image topic of each camera (relative names follow the node namespace)',
                                 at_configure=True)
    camera_transports: list = _param(['raw', 'raw'], "per camera: 'raw' (sensor_msgs/Image) or 'compressed' "
                                     '(sensor_msgs/CompressedImage on the given topic)', at_configure=True,
                                     choices=TRANSPORTS)
    camera_frames: list = _param([''], "expected header.frame_id of each camera's frames, in camera_names order "
                                 "('' = not checked); a mismatch is rejected and the robot holds", at_configure=True)
    min_image_side: int = _param(16, 'frames with a side shorter than this (pixels) are rejected', low=1, high=8192)
    jpeg_scaled_decode: bool = _param(True, 'decode a JPEG frame of at least twice the policy input at 1/2, 1/4 or 1/8 '
                                      "scale (libjpeg's DCT scaling: 1.8-3.3x faster; false: full decode, then "
                                      'area resize)')
    max_instruction_bytes: int = _param(1024, 'longer instructions are rejected (UTF-8 bytes)', low=1, high=1_000_000)
    proprio_source: str = _param('pose', "robot state for the proprio token: 'pose' (ee_pose PoseStamped + "
                                 "gripper_state), 'joint_state' (joint positions from joint_state_topic, e.g. "
                                 "pi0's state) or 'none' (only for policies without proprio)", at_configure=True,
                                 choices=PROPRIO_SOURCES)
    pose_layout: str = _param('reference', "proprio_source pose: how the state is built from ee_pose and the finger "
                              "gap: 'reference' (x, y, z, sin yaw, cos yaw, gap: the reference VLA) or 'libero' (x, "
                              'y, z, axis-angle, gap / 2, -gap / 2: OpenVLA-OFT LIBERO checkpoints)', at_configure=True,
                              choices=POSE_LAYOUT_NAMES)
    joint_state_topic: str = _param('joint_states', "proprio_source joint_state: the sensor_msgs/JointState topic "
                                    '(joints in any order, extra joints ignored); its positions also start the '
                                    'joint commands\' velocity limit', at_configure=True)
    state_joint_names: list = _param([''], "proprio_source joint_state: the JointState joint of each policy state "
                                     "value, in the policy's state order ([''] = the policy's action names, when "
                                     'there are as many as state values)', at_configure=True)
    gripper_state_type: str = _param('joint_state', "gripper_state topic type: 'joint_state' (sum of the finger "
                                     "joints) or 'float64' (finger gap in metres)", at_configure=True,
                                     choices=GRIPPER_STATE_TYPES)
    finger_joint_names: list = _param(['finger_joint1', 'finger_joint2'], 'JointState joints summed into the '
                                      'finger gap')
    ee_pose_frame: str = _param('base_link', "expected header.frame_id of ee_pose ('' = not checked); a pose in "
                                'another frame is rejected and the robot holds')
    # --- timing ----------------------------------------------------------------------------------------
    control_rate_hz: float = _param(10.0, 'rate of the command timer (one TwistStamped + gripper per tick)',
                                    at_configure=True, low=1.0, high=500.0)
    replan_every_steps: int = _param(2, 'start a new inference every N policy steps (1 = as often as possible)',
                                     low=1, high=64)
    chunk_mode: str = _param('replace', 'a new chunk replaces the rest of the old one, or blends with it',
                             choices=CHUNK_MODES)
    blend_old_weight: float = _param(0.5, 'blend: weight of the old chunk at the first step after a new one (at '
                                     'most 0.9: a new chunk always counts)', low=0.0, high=0.9)
    blend_decay: float = _param(0.5, 'blend: factor applied to the old weight at each further step',
                                low=0.0, high=1.0)
    publish_on_new_chunk: bool = _param(True, "publish a new chunk's first action at once and re-phase the timer "
                                        'to it (lowest latency)')
    # --- freshness and deadlines ------------------------------------------------------------------------
    max_image_age_s: float = _param(0.5, 'hold when the newest frame of any camera is older (by header.stamp)',
                                    low=0.001, high=60.0)
    max_camera_skew_s: float = _param(0.1, 'hold when camera stamps are further apart', low=0.0, high=60.0)
    max_future_stamp_s: float = _param(0.1, 'reject stamps this far ahead of the node clock', low=0.0, high=60.0)
    max_state_age_s: float = _param(0.5, 'hold when the robot state is older', low=0.001, high=60.0)
    max_chunk_age_s: float = _param(0.6, 'hold when the observation behind the current chunk (its oldest camera '
                                    'stamp) is older',
                                    low=0.01, high=60.0)
    inference_deadline_s: float = _param(0.5, 'a chunk whose inference took longer is dropped and the robot '
                                         'holds', low=0.001, high=60.0)
    latency_budget_ms: float = _param(0.0, 'model step latency to hold (ms): before every inference the pruning '
                                      "method's budget (keep ratio, SpecPrune's scale of K) is set so that the "
                                      'predicted latency percentile meets it (0 = off: the method runs as configured)',
                                      low=0.0, high=60_000.0)
    latency_budget_percentile: float = _param(90.0, 'the latency percentile the budget holds', low=50.0, high=99.9)
    min_keep_ratio: float = _param(0.1, 'the latency budget never keeps fewer visual tokens than this fraction '
                                   '(SpecPrune: before its layer-level drops)',
                                   low=0.01, high=1.0)
    budget_fallback_method: str = _param('divprune', "method 'none' with a latency budget: the method that takes "
                                         'over while the unpruned model cannot meet the budget', at_configure=True,
                                         choices=BUDGET_METHODS)
    reset_after_gap_s: float = _param(2.0, 'reset the temporal token state when consecutive observations are '
                                      'further apart', low=0.01, high=3600.0)
    # --- commands --------------------------------------------------------------------------------------
    command_frame: str = _param('base_link', 'frame_id of the TwistStamped (the policy acts in the base frame)')
    action_scale: float = _param(1.0, 'multiplies every commanded velocity (slow-down factor)', low=0.0, high=1.0)
    max_linear_speed: float = _param(0.25, 'per-axis linear speed limit (m/s)', low=0.0, high=5.0)
    max_angular_speed: float = _param(2.5, 'per-axis angular speed limit (rad/s)', low=0.0, high=20.0)
    max_linear_accel: float = _param(5.0, 'per-axis linear acceleration limit (m/s^2; rate limiting; at least 0.1: '
                                     'a zero limit would freeze the velocity)', low=0.1, high=1000.0)
    max_angular_accel: float = _param(50.0, 'per-axis angular acceleration limit (rad/s^2; at least 1)', low=1.0,
                                      high=10000.0)
    gripper_binarize: bool = _param(True, 'publish only fully open / fully closed gripper commands')
    gripper_open_value: float = _param(-1.0, 'gripper_command value for open', low=-1000.0, high=1000.0)
    gripper_closed_value: float = _param(1.0, 'gripper_command value for closed', low=-1000.0, high=1000.0)
    gripper_command_type: str = _param('float64', "gripper_command type: 'float64' (std_msgs/Float64) or "
                                       "'float64_array' (std_msgs/Float64MultiArray with one element, what a "
                                       'ros2_control forward_command_controller takes)', at_configure=True,
                                       choices=GRIPPER_COMMAND_TYPES)
    joint_command_topic: str = _param('joint_commands', 'joint-space policies: topic of the per-tick joint command '
                                      '(std_msgs/Float64MultiArray in ~/action_chunk joint_names order, what a '
                                      "ros2_control forward command controller's ~/commands takes; nothing new is "
                                      "published while holding); '' = off. End-effector policies ignore it",
                                      at_configure=True)
    joint_names: list = _param([''], "joint-space policies: the robot controller's joints in its order (its "
                               "'joints' list); joint commands and ~/action_chunk go out in this order, matched by "
                               "name to the policy's action names ([''] = the action names as they are)",
                               at_configure=True)
    robot_description: str = _param('', "joint-space policies: the robot's URDF (XML text); the <limit> of each "
                                    'commanded joint gives its position and velocity limits, joint_limits.<joint>.* '
                                    "override them field by field ('' = none)", at_configure=True)
    servo_command_timeout_s: float = _param(0.1, "the twist consumer's command timeout (MoveIt Servo's "
                                            'incoming_command_timeout); configure warns when the control period '
                                            'leaves less than half of it as margin (0 = no check)', at_configure=True,
                                            low=0.0, high=60.0)
    # --- node ------------------------------------------------------------------------------------------
    autostart: bool = _param(True, 'configure and activate at start-up (no lifecycle manager needed)',
                             at_configure=True)
    enabled: bool = _param(True, 'command the robot when active (also ~/enable); disabled = zero twists')
    dry_run: bool = _param(False, 'run inference and publish the chunk and diagnostics, but no commands')
    publish_debug_image: bool = _param(False, 'publish ~/debug/kept_patches (kept patches over the inputs)')
    debug_image_scale: int = _param(3, 'upscaling of the debug image', low=1, high=16)
    diagnostics_period_s: float = _param(1.0, '/diagnostics publishing period', at_configure=True, low=0.05, high=60.0)
    stats_window: int = _param(100, 'samples in the latency percentile windows', at_configure=True, low=1,
                               high=100_000)
    log_throttle_s: float = _param(2.0, 'minimum time between two log lines about the same bad input',
                                   low=0.0, high=3600.0)

    # not a ROS parameter of its own: the method_settings.* parameters, nested ({'controller': {'alpha': 0.8}})
    method_settings: dict = field(default_factory=dict, metadata={'info': None})
    # not a ROS parameter of its own: ros2_control's joint_limits.<joint>.<field> parameters, nested by joint
    # ({'elbow': {'min_position': -2.0, 'max_position': 2.0, 'max_velocity': 1.5}}); read-only
    joint_limits: dict = field(default_factory=dict, metadata={'info': None})

    # -------------------------------------------------------------------------------------------------
    @classmethod
    def infos(cls) -> dict[str, ParamInfo]:
        """The declared ROS parameters (every field but ``method_settings``)."""
        return {f.name: f.metadata['info'] for f in dataclasses.fields(cls) if f.metadata['info'] is not None}

    @classmethod
    def defaults(cls) -> dict[str, Value]:
        values = dataclasses.asdict(cls())
        return {name: values[name] for name in cls.infos()}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> 'NodeParameters':
        """Parameters from a mapping (unknown names are an error), coercing ints to floats where declared."""
        settings = {name[len(METHOD_SETTINGS_PREFIX):]: value for name, value in values.items()
                    if name.startswith(METHOD_SETTINGS_PREFIX)}
        limits = {name[len(JOINT_LIMITS_PREFIX):]: value for name, value in values.items()
                  if name.startswith(JOINT_LIMITS_PREFIX)}
        declared = {name: value for name, value in values.items() if not name.startswith(PREFIXED_SETTINGS)}
        try:
            return dataclass_from_mapping(cls, {**declared, 'method_settings': nest_settings(settings),
                                                'joint_limits': nest_settings(limits, JOINT_LIMITS_PREFIX)})
        except UnknownFieldsError as error:
            defaults = cls.defaults()
            raise ParameterError([unknown_parameter_message(name, defaults) for name in error.unknown]) from None

    def command_joint_names(self) -> list[str]:
        """``joint_names`` without the empty placeholder ([] = the policy's action names)."""
        return [name for name in self.joint_names if name]

    def state_joints(self) -> list[str]:
        """``state_joint_names`` without the empty placeholder ([] = the policy's action names)."""
        return [name for name in self.state_joint_names if name]

    def method_options(self) -> dict:
        """``method_config`` parsed, with the ``method_settings`` on top (raises ``ParameterError``)."""
        try:
            parsed = yaml.safe_load(self.method_config) if self.method_config.strip() else {}
        except yaml.YAMLError as error:
            raise ParameterError([f'method_config (method {self.method!r}) is not valid YAML: {error}']) from None
        if parsed is None:
            parsed = {}
        if not isinstance(parsed, dict):
            raise ParameterError([f'method_config (method {self.method!r}) must be a mapping, got '
                                  f'{type(parsed).__name__}'])
        return merge_settings(parsed, self.method_settings)

    def validate(self) -> list[str]:
        """Every problem, as a sentence naming the parameter (empty when valid)."""
        errors, type_errors = [], []
        defaults = self.defaults()
        for name, info in self.infos().items():
            value = getattr(self, name)
            expected = type(defaults[name])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                type_errors.append(f'{name}: expected {expected.__name__}, got {type(value).__name__} {value!r}')
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value != value or (info.low is not None and value < info.low) or (
                        info.high is not None and value > info.high):
                    errors.append(f'{name}: {value} is outside [{info.low}, {info.high}]')
            items = value if isinstance(value, list) else [value] if isinstance(value, str) else []
            if info.choices:
                bad = [item for item in items if item not in info.choices]
                if bad:
                    close = difflib.get_close_matches(str(bad[0]), info.choices, n=1, cutoff=0.6)
                    hint = f' (did you mean {close[0]!r}?)' if close else ''
                    errors.append(f'{name}: {bad} not among {list(info.choices)}{hint}')
        if type_errors:
            return type_errors + errors
        if not self.model.strip():
            errors.append("model: empty; use 'reference', 'tiny-random' or a checkpoint directory")
        if not _DEVICE.match(self.device):
            errors.append(f"device: {self.device!r} is not 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.method in METHODS:
            try:
                errors += method_settings_errors(self.method, self.method_options())
            except ParameterError as error:
                errors += error.errors
        if self.latency_budget_ms > 0 and self.method in METHODS and self.method not in BUDGET_METHODS \
                and self.method != 'none':
            errors.append(f'latency_budget_ms: method {self.method!r} has no token-budget knob; use one of '
                          f"{list(BUDGET_METHODS)} or 'none' (with budget_fallback_method), or 0 (off)")
        cams, topics, transports = self.camera_names, self.camera_topics, self.camera_transports
        if not cams:
            errors.append('camera_names: at least one camera is needed')
        if not (len(cams) == len(topics) == len(transports)):
            errors.append(f'camera_names ({len(cams)}), camera_topics ({len(topics)}) and camera_transports '
                          f'({len(transports)}) must have the same length')
        if len(set(cams)) != len(cams):
            errors.append(f'camera_names: duplicates in {cams}')
        if len(set(topics)) != len(topics):
            errors.append(f'camera_topics: duplicates in {topics}')
        errors += [f'camera_topics: {t!r} is not a valid topic name' for t in topics if not _topic_ok(t)]
        frames = self.camera_frames
        if any(frames) and len(frames) != len(cams):
            errors.append(f'camera_frames: {len(frames)} entries for {len(cams)} cameras (one per camera, or '
                          "[''] to check none)")
        if any(frame != frame.strip() or ' ' in frame for frame in [*frames, self.ee_pose_frame]):
            errors.append('camera_frames / ee_pose_frame: frame ids contain no spaces')
        if self.proprio_source == 'pose' and self.gripper_state_type == 'joint_state':
            if not self.finger_joint_names:
                errors.append('finger_joint_names: empty, but gripper_state_type is joint_state')
            elif not all(isinstance(n, str) and n.strip() for n in self.finger_joint_names):
                errors.append(f'finger_joint_names: {self.finger_joint_names} holds an empty name (no JointState '
                              'joint is called that: the robot would hold for ever)')
        if self.joint_command_topic and not _topic_ok(self.joint_command_topic):
            errors.append(f'joint_command_topic: {self.joint_command_topic!r} is not a valid topic name')
        if self.proprio_source == 'joint_state' and not _topic_ok(self.joint_state_topic):
            errors.append(f'joint_state_topic: {self.joint_state_topic!r} is not a valid topic name')
        for name, joints in (('joint_names', self.command_joint_names()), ('state_joint_names', self.state_joints())):
            repeated = sorted({joint for joint in joints if joints.count(joint) > 1})
            if repeated:
                errors.append(f'{name}: {repeated} listed more than once')
        for check in (lambda: joint_limits_from_settings(self.joint_limits),
                      lambda: urdf_joint_limits(self.robot_description)):
            try:
                check()
            except JointOrderError as error:
                errors.append(str(error))
        if not self.command_frame.strip() or any(c.isspace() for c in self.command_frame):
            errors.append(f'command_frame: {self.command_frame!r} is not a valid frame id')
        return errors

    def check(self) -> None:
        """Raise ``ParameterError`` listing every problem."""
        errors = self.validate()
        if errors:
            raise ParameterError(errors)


def unknown_parameter_message(name: str, known: Iterable[str]) -> str:
    """'unknown parameter ...' naming the closest valid parameter, when one is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f'unknown parameter {name!r}' + (f' (did you mean {close[0]!r}?)' if close else '')


def nest_settings(flat: Mapping[str, Any], prefix: str = METHOD_SETTINGS_PREFIX) -> dict:
    """{'controller.alpha': 0.8, 'keep_ratio': 0.25} -> {'controller': {'alpha': 0.8}, 'keep_ratio': 0.25}."""
    nested: dict = {}
    for dotted, value in sorted(flat.items()):
        *parents, leaf = dotted.split('.')
        level = nested
        for part in parents:
            level = level.setdefault(part, {})
            if not isinstance(level, dict):
                raise ParameterError([f'{prefix}{dotted}: {part!r} is not a nested setting'])
        level[leaf] = list(value) if isinstance(value, tuple) else value
    return nested


def merge_settings(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """``base`` with ``top`` merged in recursively (``top`` wins)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def _setting_errors(prefix: str, value: Any, default: Any) -> list[str]:
    """Type and range problems of one method setting against its default (recursing into nested configs)."""
    if dataclasses.is_dataclass(default):
        return [error for f in dataclasses.fields(default)
                for error in _setting_errors(f'{prefix}.{f.name}'.lstrip('.'), getattr(value, f.name),
                                             getattr(default, f.name))]
    name = prefix.rsplit('.', 1)[-1]
    if isinstance(default, bool) or default is None or isinstance(default, (str, tuple, list)):
        return [f'{prefix}: expected true or false, got {value!r}'] if isinstance(default, bool) and not isinstance(
            value, bool) else []
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f'{prefix}: expected a number, got {value!r}']
        if isinstance(default, int) and not isinstance(value, int):
            return [f'{prefix}: expected an integer, got {value!r}']
        if value != value or value in (float('inf'), float('-inf')):
            return [f'{prefix}: {value} is not finite']
        if ('ratio' in name or 'fraction' in name) and not 0.0 <= value <= 1.0:
            return [f'{prefix}: {value} is outside [0, 1] (a fraction of the visual tokens)']
    return []


def method_settings_errors(method: str, settings: Mapping[str, Any]) -> list[str]:
    """Every problem of ``settings`` for ``method``, each naming the method and the setting (none: [])."""
    where = f'method_config / method_settings for method {method!r}'
    try:
        config = method_config(method, dict(settings))
    except (ValueError, TypeError) as error:
        return [f'{where}: {error}']
    errors = [f'{where}: {error}' for error in _setting_errors('', config, method_config(method))]
    if not errors:
        try:
            build_method(method, dict(settings))
        except (ValueError, TypeError) as error:
            errors.append(f'{where}: {error}')
    return errors


class ParameterError(ValueError):
    """One or more invalid parameters; the message lists them all."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__('invalid parameters: ' + '; '.join(errors))
        self.errors = list(errors)


def _topic_ok(topic: str) -> bool:
    body = topic.lstrip('~').lstrip('/')
    return bool(body) and all(_NAME.match(part) for part in body.split('/'))
