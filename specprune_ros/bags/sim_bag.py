"""Record simulated episodes straight into a bag, without DDS.

The topics and stamps the sim bridge publishes, plus the commands an actor (the scripted expert, or a policy run as the
ROS-free harness runs it) executed.

Layout per control tick ``t`` (sim time, ``start_ns + k * 0.1 s``): ``/ee_pose`` and ``/gripper_state``
stamped ``t``, ``/clock = t``, the camera frames stamped ``t`` (raw ``Image`` or JPEG ``CompressedImage``),
then the executed command as ``/delta_twist_cmds`` (``TwistStamped`` stamped ``t``) and ``/gripper_command``;
``/instruction`` once at the start. With a policy actor, every chunk also goes to
``/specprune_node/action_chunk`` stamped with its observation, as the policy node publishes it.
Bag time = sim time (what ``ros2 bag record --use-sim-time`` would write).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from specprune_ros.bags.io import BagWriter, make_qos
from specprune_ros.bags.typestore_messages import TypestoreMessages
from specprune_ros.bridge.conversions import CommandUnits, action_to_twist, gripper_action_to_value, seconds_to_ns
from specprune_ros.policy.interface import Observation
from specprune_ros.sim import CONTROL_PERIOD_S, ROTATION_SCALE_RAD, TRANSLATION_SCALE_M, ScriptedExpert, TabletopEnv

ACTION_LABELS = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')


@dataclass
class SimBagOptions:
    families: Sequence[str] = ('pick',)
    seeds: Sequence[int] = (1_000_000,)
    actor: str = 'expert'                  # 'expert', or 'policy' (then give ``policy``)
    max_steps: int = 0                     # 0: the task limit
    image_size: int = 96
    compressed: bool = False               # JPEG CompressedImage on <topic>/compressed instead of raw Image
    storage: str = 'mcap'
    start_s: float = 100.0
    episode_gap_s: float = 5.0
    camera_topics: dict = field(default_factory=lambda: {'agentview': '/camera/agentview/image_raw',
                                                         'wrist': '/camera/wrist/image_raw'})
    finger_joints: Sequence[str] = ('finger_joint1', 'finger_joint2')
    chunk_topic: str = '/specprune_node/action_chunk'
    inference_topic: str = '/specprune_node/inference'   # policy actor: one record per inference, as the node's
    method: str = ''                       # policy actor: names written to the inference records
    model: str = ''
    execute_steps: int = 0                 # policy actor: actions executed per chunk (0: all)


@dataclass
class SimBagResult:
    path: Path
    episodes: list                          # (family, seed, success, steps)
    counts: dict


def inference_status(build: TypestoreMessages, output, options: SimBagOptions, ns: int):
    """The node's ``~/inference`` record for one chunk: method as the message, model as the hardware id."""
    record = output.record
    kept = 'n/a'
    if record is not None and record.layout.num_visual:
        kept = f'{record.mean_visual_kept / record.layout.num_visual:.4f}'
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    values = {'source_stamp': f'{sec}.{nanosec:09d}', 'model_latency_ms': f'{output.latency_s * 1e3:.3f}',
              'kept_ratio': kept}
    return build.status(0, '/specprune_node', options.method or 'unknown', options.model or 'unknown', values)


def record_sim_bag(path: str | Path, options: SimBagOptions = SimBagOptions(), policy=None,
                   progress: bool = False) -> SimBagResult:
    """Run the episodes and write them to a new bag at ``path``."""
    if options.actor not in ('expert', 'policy'):
        raise ValueError(f"actor must be 'expert' or 'policy', got {options.actor!r}")
    if options.actor == 'policy' and policy is None:
        raise ValueError('the policy actor needs a policy')
    units = CommandUnits(TRANSLATION_SCALE_M, ROTATION_SCALE_RAD, CONTROL_PERIOD_S)
    period_ns = seconds_to_ns(CONTROL_PERIOD_S)
    cameras = tuple(options.camera_topics)
    env = TabletopEnv(image_size=options.image_size, cameras=cameras)
    expert = ScriptedExpert(env) if options.actor == 'expert' else None
    episodes = []
    latched = [make_qos(reliable=True, transient_local=True, depth=1)]
    with BagWriter(path, storage=options.storage) as bag:
        build = TypestoreMessages(bag.typestore)
        image_topics = {}
        for name, topic in options.camera_topics.items():
            if options.compressed:
                image_topics[name] = topic.rstrip('/') + '/compressed'
                bag.add_topic(image_topics[name], 'sensor_msgs/msg/CompressedImage')
            else:
                image_topics[name] = topic
                bag.add_topic(topic, 'sensor_msgs/msg/Image')
        bag.add_topic('/clock', 'rosgraph_msgs/msg/Clock')
        bag.add_topic('/ee_pose', 'geometry_msgs/msg/PoseStamped')
        bag.add_topic('/gripper_state', 'sensor_msgs/msg/JointState')
        bag.add_topic('/instruction', 'std_msgs/msg/String', qos=latched)
        bag.add_topic('/delta_twist_cmds', 'geometry_msgs/msg/TwistStamped')
        bag.add_topic('/gripper_command', 'std_msgs/msg/Float64')
        if options.actor == 'policy':
            bag.add_topic(options.chunk_topic, 'trajectory_msgs/msg/JointTrajectory')
            bag.add_topic(options.inference_topic, 'diagnostic_msgs/msg/DiagnosticStatus')
        t = seconds_to_ns(options.start_s)
        jobs = [(f, s) for s in options.seeds for f in options.families]
        for family, seed in jobs:
            obs = env.reset(seed=seed, family=family, render=True)
            if expert is not None:
                expert.reset()
            if policy is not None:
                policy.reset()
            bag.write('/instruction', t, build.string(obs.instruction))
            limit = min(env.max_steps, options.max_steps) if options.max_steps else env.max_steps
            plan: list = []
            executed: list = []
            success, steps = env.success(), 0
            for _ in range(limit):
                bag.write('/ee_pose', t, build.pose(env.tcp_pos(), env.hand_yaw(), t))
                bag.write('/gripper_state', t, build.finger_joints(env.finger_gap(), options.finger_joints, t))
                bag.write('/clock', t, build.clock(t))
                for name in cameras:
                    frame = obs.images[name]
                    message = (build.compressed_image(frame, t, f'{name}_optical_frame') if options.compressed
                               else build.image(frame, t, f'{name}_optical_frame'))
                    bag.write(image_topics[name], t, message)
                if expert is not None:
                    action = np.asarray(expert.act(obs), dtype=np.float64)
                else:
                    if not plan:
                        output = policy.predict(Observation(images=obs.images, instruction=obs.instruction,
                                                            proprio=obs.proprio,
                                                            executed_actions=np.asarray(executed, dtype=np.float32)
                                                            if executed else None))
                        chunk = np.asarray(output.actions, dtype=np.float64)
                        bag.write(options.chunk_topic, t, build.trajectory(chunk, t, CONTROL_PERIOD_S, ACTION_LABELS))
                        bag.write(options.inference_topic, t, inference_status(build, output, options, t))
                        plan = list(chunk[:options.execute_steps or len(chunk)])
                        executed = []
                    action = plan.pop(0)
                    executed.append(action)
                action = np.clip(action, -1.0, 1.0)
                bag.write('/delta_twist_cmds', t, build.twist(action_to_twist(action, units), t))
                bag.write('/gripper_command', t, build.float64(gripper_action_to_value(action[6], units)))
                obs, done, success = env.step(action, render=True)
                steps += 1
                t += period_ns
                if done:
                    break
            episodes.append((family, int(seed), bool(success), steps))
            t += seconds_to_ns(options.episode_gap_s)
        counts = dict(bag.counts)
    env.close()
    return SimBagResult(path=Path(path), episodes=episodes, counts=counts)
