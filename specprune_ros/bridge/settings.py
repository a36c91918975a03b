"""Parameters of the simulation bridge node (``sim_bridge``), with descriptions and validation, ROS-free.

``config/sim_bridge.yaml`` sets them (``/sim_bridge: ros__parameters``) next to the policy node's simulation
overrides; ``specprune_ros.ros.sim_bridge_node`` declares each one as a ROS parameter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from specprune_ros.core.dataclass_mapping import dataclass_from_mapping

MODES = ('sync', 'realtime')
GRIPPER_STATE_TYPES = ('joint_state', 'float64')
# the simulator's TASK_FAMILIES and CAMERA_NAMES (kept equal by a test; importing the simulator here would
# pull MuJoCo into every launch file that validates the bridge parameters)
TASK_FAMILIES = ('pick', 'place', 'push')
CAMERA_NAMES = ('agentview', 'wrist')


def _p(default: Any, description: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={'description': description})
    return field(default=default, metadata={'description': description})


@dataclass
class BridgeSettings:
    # --- what to run ------------------------------------------------------------------------------------
    mode: str = _p('sync', "'sync': the simulator waits for the policy's command every tick (scores the policy); "
                   "'realtime': it steps every control period of wall-clock time (exposes latency)")
    families: list = _p(['pick', 'place', 'push'], 'task families to run')
    episodes_per_family: int = _p(1, 'episodes of each family (seeds seed_start, seed_start+1, ...)')
    seed_start: int = _p(1_000_000, 'first episode seed (1000000 = the held-out evaluation seeds)')
    max_steps: int = _p(0, 'stop an episode after this many control periods (0: the task limit)')
    image_size: int = _p(96, 'camera image side (pixels)')
    label: str = _p('', 'name of this run in the summary (empty: the policy method)')
    summary_path: str = _p('', 'write <path>.json and <path>.md with every episode outcome (empty: none)')
    exit_when_done: bool = _p(True, 'shut the bridge down after the last episode (ends the launch)')
    save_actions: bool = _p(False, 'put every applied action into the summary JSON (comparisons with the harness)')
    # --- topics (relative names follow the bridge namespace; remap them as usual) ------------------------
    camera_names: list = _p(['agentview', 'wrist'], 'simulator cameras to publish')
    camera_topics: list = _p(['camera/agentview/image_raw', 'camera/wrist/image_raw'], 'image topic per camera')
    base_frame: str = _p('base_link', 'frame of the end-effector pose')
    instruction_topic: str = _p('instruction', 'std_msgs/String, reliable + transient local')
    ee_pose_topic: str = _p('ee_pose', 'geometry_msgs/PoseStamped of the tool-centre point')
    gripper_state_topic: str = _p('gripper_state', 'JointState of the finger joints, or Float64 finger gap')
    gripper_state_type: str = _p('joint_state', "'joint_state' or 'float64'")
    finger_joint_names: list = _p(['finger_joint1', 'finger_joint2'], 'finger joints (the gap is split evenly)')
    twist_topic: str = _p('delta_twist_cmds', 'geometry_msgs/TwistStamped commands in')
    gripper_topic: str = _p('gripper_command', 'std_msgs/Float64 gripper commands in')
    policy_node: str = _p('/specprune_node', "the policy node (its ~/action_chunk, ~/inference, ~/reset, "
                          "parameters and lifecycle state); empty: none of those (realtime mode only: sync mode "
                          "needs the chunks to know when a tick is answered)")
    # --- protocol ---------------------------------------------------------------------------------------
    replan_every_steps: int = _p(8, "the policy node's replan_every_steps (read from the node when it answers)")
    start_time_s: float = _p(0.0, 'sim time of the first tick (0: wall-clock seconds modulo 1e6, rounded to the '
                             'period: small, and still increasing when the bridge restarts)')
    episode_gap_s: float = _p(5.0, 'sim time between episodes (longer than the node reset_after_gap_s)')
    settle_s: float = _p(1.0, 'sync: a tick whose expected messages did not all come is answered after this '
                         'much quiet (wall seconds)')
    timer_wait_s: float = _p(2.0, "sync: wait this long for the node timer's answer to a clock advance before "
                             'publishing the frames anyway (wall seconds)')
    resend_after_s: float = _p(5.0, 'sync: publish the observation again when unanswered this long (wall s)')
    sync_timeout_s: float = _p(60.0, 'sync: give up on a tick (apply a zero twist) after this long (wall s)')
    clock_lead_s: float = _p(0.003, 'pause between /clock and the camera frames when not waiting for the node '
                             "timer's answer (re-sent observations, the start of a real-time episode; wall s)")
    command_timeout_s: float = _p(0.15, 'realtime: a command older than this stops the robot (sim s)')
    clock_rate_hz: float = _p(100.0, 'realtime: /clock publishing rate')
    startup_timeout_s: float = _p(300.0, 'wait this long for the policy node to come up (wall s)')
    min_camera_subscribers: int = _p(1, 'start once this many subscribers listen to every camera (the policy node; '
                                        '2 when a bag recorder records the run from its first frame)')
    min_command_subscribers: int = _p(1, 'start once this many subscribers listen to each topic the policy node '
                                         'answers on (commands, action chunks, inference reports; 1 = this '
                                         'bridge, 2 when a bag recorder records them from the first chunk)')
    gripper_open_value: float = _p(-1.0, 'gripper_command value meaning open (read from the policy node)')
    gripper_closed_value: float = _p(1.0, 'gripper_command value meaning closed (read from the policy node)')

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        return {f.name: f.metadata['description'] for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls())

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> 'BridgeSettings':
        return dataclass_from_mapping(cls, values, what='sim_bridge parameters')

    def validate(self) -> list[str]:
        errors = []
        if self.mode not in MODES:
            errors.append(f'mode: {self.mode!r} is not one of {list(MODES)}')
        bad = [f for f in self.families if f not in TASK_FAMILIES]
        if bad or not self.families:
            errors.append(f'families: {bad or "empty"}; expected a subset of {list(TASK_FAMILIES)}')
        if self.min_camera_subscribers < 1:
            errors.append('min_camera_subscribers must be >= 1')
        if self.min_command_subscribers < 1:
            errors.append('min_command_subscribers must be >= 1')
        if self.episodes_per_family < 1:
            errors.append(f'episodes_per_family must be >= 1, got {self.episodes_per_family}')
        if self.seed_start < 0 or self.max_steps < 0:
            errors.append('seed_start and max_steps must be >= 0')
        if not 16 <= self.image_size <= 1024:
            errors.append(f'image_size: {self.image_size} outside [16, 1024]')
        bad = [c for c in self.camera_names if c not in CAMERA_NAMES]
        if bad or not self.camera_names:
            errors.append(f'camera_names: {bad or "empty"}; expected a subset of {list(CAMERA_NAMES)}')
        if len(self.camera_names) != len(self.camera_topics):
            errors.append('camera_names and camera_topics must have the same length')
        if self.gripper_state_type not in GRIPPER_STATE_TYPES:
            errors.append(f'gripper_state_type: {self.gripper_state_type!r} not in {list(GRIPPER_STATE_TYPES)}')
        if self.gripper_state_type == 'joint_state' and not self.finger_joint_names:
            errors.append('finger_joint_names: empty')
        if self.replan_every_steps < 1:
            errors.append('replan_every_steps must be >= 1')
        for name in ('settle_s', 'timer_wait_s', 'resend_after_s', 'sync_timeout_s', 'command_timeout_s',
                     'clock_rate_hz', 'startup_timeout_s'):
            if getattr(self, name) <= 0:
                errors.append(f'{name} must be > 0')
        if self.clock_lead_s < 0 or self.episode_gap_s < 0 or self.start_time_s < 0:
            errors.append('clock_lead_s, episode_gap_s and start_time_s must be >= 0')
        if self.mode == 'sync' and not self.policy_node.strip():
            errors.append("policy_node: empty, but sync mode follows <policy_node>/action_chunk to know when a tick "
                          "is answered (name the policy node, e.g. /specprune_node, or use mode realtime)")
        if self.gripper_open_value == self.gripper_closed_value:
            errors.append('gripper_open_value and gripper_closed_value must differ')
        return errors
