"""Observation streams out of a bag.

Synchronized camera frames with the instruction, the robot state and, when the bag has them, the commands that were
executed and the chunks the policy node computed.

Frames are paired by ``header.stamp``: every frame of the first camera, with the nearest-stamped frame of
each other camera (within ``max_camera_skew_s``; a frame re-sent with the same stamp counts once). The
proprio comes from the newest ``ee_pose`` and gripper state stamped at or before the frame (the Float64
gripper state has no header: its bag time is used), the instruction from the newest one recorded before the
frame (bag time). Commands: of the ``TwistStamped`` sharing a header stamp, the last one received, converted
back to normalised units, with the newest gripper command recorded before the next commanded instant (bag
time). The recorded action of an observation stamped ``t`` is the last command stamped in ``[t, t + period)``;
its recorded chunk is the ``~/action_chunk`` whose header stamp equals ``t``. The policy node's ``~/inference``
records, when the bag has them, say which method and model recorded it.

Raw frames in the encodings the node takes are decoded as the node does; other encodings (16-bit, Bayer, YUV
4:2:2, ...) go through ``rosbags-image``.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from rosbags.image import ImageError as ConversionError
from rosbags.image import message_to_cvimage
from rosbags.image.image import to_cvtype

from specprune_ros.bags.io import BagError, BagReader, check_types_known, normalize_topic
from specprune_ros.bridge.conversions import CommandUnits, command_to_action, gripper_value_to_action
from specprune_ros.codecs.image_decoding import (MAX_SIDE, RAW_ENCODINGS, ImageError, decode_compressed_image,
                                                 decode_raw_image, resize_to)
from specprune_ros.codecs.proprio import StateError, finger_gap_from_joints, proprio_vector

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
STRING = 'std_msgs/msg/String'
POSE = 'geometry_msgs/msg/PoseStamped'
JOINT_STATE = 'sensor_msgs/msg/JointState'
FLOAT64 = 'std_msgs/msg/Float64'
TWIST = 'geometry_msgs/msg/TwistStamped'
TRAJECTORY = 'trajectory_msgs/msg/JointTrajectory'
STATUS = 'diagnostic_msgs/msg/DiagnosticStatus'


@dataclass
class StreamTopics:
    """Which topics hold what (names are made absolute). Empty optional names switch that stream off."""

    cameras: dict = field(default_factory=lambda: {'agentview': '/camera/agentview/image_raw',
                                                   'wrist': '/camera/wrist/image_raw'})
    instruction: str = '/instruction'
    ee_pose: str = '/ee_pose'
    gripper_state: str = '/gripper_state'
    commands: str = '/delta_twist_cmds'
    gripper_command: str = '/gripper_command'
    chunks: str = '/specprune_node/action_chunk'
    inference: str = '/specprune_node/inference'
    finger_joints: tuple = ('finger_joint1', 'finger_joint2')

    def normalized(self) -> 'StreamTopics':
        def norm(topic: str) -> str:
            return normalize_topic(topic) if topic else ''
        return StreamTopics(cameras={k: norm(v) for k, v in self.cameras.items()},
                            instruction=norm(self.instruction), ee_pose=norm(self.ee_pose),
                            gripper_state=norm(self.gripper_state), commands=norm(self.commands),
                            gripper_command=norm(self.gripper_command), chunks=norm(self.chunks),
                            inference=norm(self.inference), finger_joints=tuple(self.finger_joints))


@dataclass
class BagObservation:
    stamp_ns: int                              # header stamp of the first camera's frame
    bag_time_ns: int
    images: dict                               # camera -> (H, W, 3) uint8 RGB at the requested size
    instruction: str
    proprio: Optional[np.ndarray]
    recorded_action: Optional[np.ndarray] = None    # (7,) normalised, what the robot executed at this tick
    recorded_chunk: Optional[np.ndarray] = None     # (steps, 7) the chunk the node computed from this frame


@dataclass
class BagStreams:
    path: str
    topics: StreamTopics
    observations: list
    camera_sizes: dict                          # camera -> (H, W) as recorded
    camera_types: dict                          # camera -> message type
    notes: list = field(default_factory=list)   # what was skipped or guessed, for the report
    has_state: bool = False
    has_commands: bool = False
    has_chunks: bool = False
    commands: list = field(default_factory=list)   # (stamp ns, 7-D action) per commanded instant
    recorded_by: list = field(default_factory=list)   # (method, model, inferences) from ~/inference, most first


def _stamp(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _decode(msg, msgtype: str) -> np.ndarray:
    if msgtype == COMPRESSED:
        return decode_compressed_image(msg.data, msg.format)
    if msg.encoding in RAW_ENCODINGS:
        return decode_raw_image(msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data)
    return decode_other_encoding(msg)


def decode_other_encoding(msg) -> np.ndarray:
    """RGB uint8 from a ``sensor_msgs/Image`` in an encoding the node does not take, with ``rosbags-image``.

    16-bit scaled to 8, Bayer demosaiced, YUV converted; sizes are checked and row padding removed first.
    """
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    try:
        _, _, typestr, channels = to_cvtype(msg.encoding)
    except (ConversionError, KeyError, ValueError):
        raise ImageError('image_encoding', f'unsupported encoding {msg.encoding!r}') from None
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise ImageError('image_size', f'image {width}x{height}: each side must be 1 to {MAX_SIDE} pixels')
    row_bytes = width * channels * np.dtype(typestr).itemsize
    if step < row_bytes or len(msg.data) != step * height:
        raise ImageError('image_truncated' if len(msg.data) < step * height else 'image_size',
                         f'{msg.encoding} {width}x{height}: data holds {len(msg.data)} bytes with step {step}, '
                         f'expected {row_bytes} bytes per row')
    if step != row_bytes:
        rows = np.asarray(msg.data, dtype=np.uint8).reshape(height, step)[:, :row_bytes]
        msg = dataclasses.replace(msg, step=row_bytes, data=np.ascontiguousarray(rows).reshape(-1))
    try:
        rgb = message_to_cvimage(msg, 'rgb8')
    except (ConversionError, ValueError) as error:
        raise ImageError('image_encoding', f'cannot convert {msg.encoding} to RGB: {error}') from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def load_streams(path: str | Path, topics: Optional[StreamTopics] = None, image_size: Optional[tuple] = (96, 96),
                 max_camera_skew_s: float = 0.05, period_s: float = 0.1, units: CommandUnits = CommandUnits(),
                 instruction: str = '', max_observations: int = 0) -> BagStreams:
    """Read and pair everything (see the module docstring); ``BagError`` names whatever is wrong."""
    topics = (topics or StreamTopics()).normalized()
    if not topics.cameras:
        raise BagError('at least one camera topic is needed')
    with BagReader(path) as bag:
        available = bag.topics()
        camera_types = {}
        for name, topic in topics.cameras.items():
            camera_types[name] = bag.require(topic, (IMAGE, COMPRESSED), f'camera {name!r}').msgtype
        wanted = {topic: ('camera', name) for name, topic in topics.cameras.items()}
        notes: list[str] = []
        optional = (('instruction', topics.instruction, (STRING,)), ('ee_pose', topics.ee_pose, (POSE,)),
                    ('gripper_state', topics.gripper_state, (JOINT_STATE, FLOAT64)),
                    ('commands', topics.commands, (TWIST,)), ('gripper_command', topics.gripper_command, (FLOAT64,)),
                    ('chunks', topics.chunks, (TRAJECTORY,)), ('inference', topics.inference, (STATUS,)))
        for kind, topic, types in optional:
            if not topic:
                continue
            if topic not in available:
                if kind != 'inference':      # the report says the recording method is unknown
                    notes.append(f'no {kind} topic {topic} in the bag')
                continue
            bag.require(topic, types, kind)   # present: it must have the right type
            wanted[topic] = (kind, None)
        if topics.instruction not in wanted and not instruction:
            raise BagError(f'bag {path}: instruction topic {topics.instruction or "(none)"} is missing and no '
                           'instruction was given (pass one, or name the String topic that carries it)')
        check_types_known(bag, wanted)

        frames: dict[str, dict[int, tuple[int, np.ndarray]]] = {name: {} for name in topics.cameras}
        sizes: dict[str, tuple[int, int]] = {}
        instructions: list[tuple[int, str]] = []
        poses: list[tuple[int, tuple, tuple]] = []
        grippers: list[tuple[int, float]] = []
        twists: list[tuple[int, int, tuple]] = []
        gripper_commands: list[tuple[int, float]] = []
        chunks: dict[int, np.ndarray] = {}
        recorders: Counter = Counter()
        gripper_by_header = True      # JointState: header stamps; Float64 (no header): bag time
        for topic, msgtype, bag_ns, raw in bag.raw_messages(wanted):
            kind, camera = wanted[topic]
            msg = bag.deserialize(raw, msgtype, topic)
            if kind == 'camera':
                stamp = _stamp(msg.header)
                try:
                    rgb = _decode(msg, msgtype)
                except ImageError as error:
                    raise BagError(f'bag {path}: camera {camera!r} ({topic}) frame stamped {stamp * 1e-9:.3f} s: '
                                   f'{error}') from None
                size = rgb.shape[:2]
                if camera not in sizes:
                    sizes[camera] = size
                elif sizes[camera] != size:
                    raise BagError(f'bag {path}: mismatched image sizes on camera {camera!r} ({topic}): the frame '
                                   f'stamped {stamp * 1e-9:.3f} s is {size[1]}x{size[0]}, earlier frames are '
                                   f'{sizes[camera][1]}x{sizes[camera][0]}')
                rgb = resize_to(rgb, image_size) if image_size else rgb
                frames[camera][stamp] = (bag_ns, rgb if rgb.flags.writeable else rgb.copy())
            elif kind == 'instruction':
                instructions.append((bag_ns, str(msg.data)))
            elif kind == 'ee_pose':
                p, q = msg.pose.position, msg.pose.orientation
                poses.append((_stamp(msg.header), (p.x, p.y, p.z), (q.x, q.y, q.z, q.w)))
            elif kind == 'gripper_state':
                if msgtype == JOINT_STATE:
                    try:
                        gap = finger_gap_from_joints(list(msg.name), list(msg.position), topics.finger_joints)
                    except StateError as error:
                        raise BagError(f'bag {path}: gripper state {topic}: {error}') from None
                    grippers.append((_stamp(msg.header), gap))
                else:
                    gripper_by_header = False
                    grippers.append((bag_ns, float(msg.data)))
            elif kind == 'commands':
                t = msg.twist
                twists.append((_stamp(msg.header), bag_ns,
                               (t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z)))
            elif kind == 'gripper_command':
                gripper_commands.append((bag_ns, float(msg.data)))
            elif kind == 'inference':
                recorders[(str(msg.message), str(msg.hardware_id))] += 1
            elif kind == 'chunks':
                chunks[_stamp(msg.header)] = np.array([list(point.positions) for point in msg.points],
                                                      dtype=np.float64)

    names = list(topics.cameras)
    reference = names[0]
    if not frames[reference]:
        raise BagError(f'bag {path}: camera {reference!r} has no frames')
    skew_ns = int(max_camera_skew_s * 1e9)
    others = {name: sorted(frames[name]) for name in names[1:]}
    poses.sort(key=lambda item: item[0])
    grippers.sort(key=lambda item: item[0])
    pose_stamps = [p[0] for p in poses]
    gripper_stamps = [g[0] for g in grippers]
    instruction_times = [i[0] for i in instructions]
    commands = command_timeline(twists, gripper_commands, units)
    command_stamps = [c[0] for c in commands]
    period_ns = int(round(period_s * 1e9))
    observations: list[BagObservation] = []
    unpaired = 0
    backfilled = False
    stamps = sorted(frames[reference])
    for position, stamp in enumerate(stamps):
        bag_ns, image = frames[reference][stamp]
        images = {reference: image}
        for name, candidates in others.items():
            index = bisect.bisect_left(candidates, stamp)
            best = min((c for c in candidates[max(index - 1, 0):index + 1]), key=lambda c: abs(c - stamp),
                       default=None)
            if best is None or abs(best - stamp) > skew_ns:
                break
            images[name] = frames[name][best][1]
        if len(images) != len(names):
            unpaired += 1
            continue
        text = instruction
        if not text:
            index = bisect.bisect_right(instruction_times, bag_ns) - 1
            if index < 0:
                backfilled = True
                index = 0
            text = instructions[index][1]
        proprio = None
        pose_index = bisect.bisect_right(pose_stamps, stamp) - 1
        gripper_index = bisect.bisect_right(gripper_stamps, stamp if gripper_by_header else bag_ns) - 1
        if pose_index >= 0 and gripper_index >= 0:
            _, position_xyz, quaternion = poses[pose_index]
            try:
                proprio = proprio_vector(position_xyz, quaternion, grippers[gripper_index][1])
            except StateError as error:
                raise BagError(f'bag {path}: robot state before {stamp * 1e-9:.3f} s: {error}') from None
        recorded_action = None
        lo = bisect.bisect_left(command_stamps, stamp)
        hi = bisect.bisect_left(command_stamps, stamp + period_ns)
        if hi > lo:
            recorded_action = commands[hi - 1][1]     # the last command of this tick
        observations.append(BagObservation(stamp_ns=stamp, bag_time_ns=bag_ns, images=images, instruction=text,
                                           proprio=proprio, recorded_action=recorded_action,
                                           recorded_chunk=chunks.get(stamp)))
        if max_observations and len(observations) >= max_observations:
            break
    if not observations:
        raise BagError(f'bag {path}: no synchronized frame set: camera stamps never agree within '
                       f'{max_camera_skew_s} s across {names}')
    if unpaired:
        notes.append(f'{unpaired} frames of {reference!r} had no partner frame within {max_camera_skew_s} s')
    if backfilled:
        notes.append('frames before the first recorded instruction use that first instruction')
    return BagStreams(path=str(path), topics=topics, observations=observations, camera_sizes=sizes,
                      camera_types=camera_types, notes=notes, has_state=bool(poses and grippers),
                      has_commands=bool(twists), has_chunks=bool(chunks), commands=commands,
                      recorded_by=[(method, model, count) for (method, model), count in recorders.most_common()])


def command_timeline(twists: list, gripper_commands: list, units: CommandUnits) -> list:
    """(stamp ns, normalised 7-D action) per commanded instant.

    Of the twists sharing a header stamp, the last received (a servo applies the latest); the gripper is the newest
    gripper command recorded before the next instant's first twist (bag time).
    """
    order = sorted(range(len(twists)), key=lambda i: (twists[i][0], twists[i][1], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and twists[groups[-1][-1]][0] == twists[i][0]:
            groups[-1].append(i)
        else:
            groups.append([i])
    gripper_times = [g[0] for g in gripper_commands]
    out = []
    for k, group in enumerate(groups):
        last = max(group, key=lambda i: (twists[i][1], i))
        if k + 1 < len(groups):
            limit = min(twists[i][1] for i in groups[k + 1])
            g_index = bisect.bisect_left(gripper_times, limit) - 1
        else:
            g_index = len(gripper_commands) - 1
        gripper = gripper_value_to_action(gripper_commands[g_index][1], units) if g_index >= 0 else -1.0
        out.append((twists[last][0], command_to_action(twists[last][2], gripper, units)))
    return out
