"""Observation streams out of a bag.

Synchronized camera frames with the instruction, the robot state and, when the bag has them, the commands that were
executed and the chunks the policy node computed.

Frames are paired by ``header.stamp``: every frame of the first camera, with the nearest-stamped frame of
each other camera (within ``max_camera_skew_s``; a frame re-sent with the same stamp counts once). The
proprio comes from the newest ``ee_pose`` and gripper state stamped at or before the frame, the instruction from
the newest one recorded before the frame (bag time). Commands: of the ``TwistStamped`` sharing a header stamp, the
last one received, converted back to normalised units, with the newest gripper command recorded before the next
commanded instant (bag time). The recorded action of an observation stamped ``t`` is the last command stamped in
``[t, t + period)`` (the policy's control period); its recorded chunk is the ``~/action_chunk`` whose header stamp
equals ``t``. The policy node's ``~/inference`` records, when the bag has
them, say which method and model recorded it.

Clocks: a stream whose messages carry no stamp (most of them zero, or a ``Float64`` without a header) is matched
by bag time instead; when a camera's frames carry none, every stream is. A header stamp that goes back while the bag
time goes on (the delay between them grows by more than ``CLOCK_RESTART_S``) means the clock restarted (a simulator
reset with ``use_sim_time``): the frames after it form the next episode (``BagObservation.episode``), paired and
matched within that episode, and the replay resets the policy there.

A message that cannot be used (an undecodable frame or message, a non-finite or zero-quaternion pose, a joint state
without the finger joints, a non-finite twist, a chunk of another width) is skipped and counted in the notes; the
evaluation goes on with the rest. Raw frames in the encodings the node takes are decoded as the node does; other
encodings (16-bit, Bayer, YUV 4:2:2, ...) go through ``rosbags-image``.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from rosbags.image import ImageError as ConversionError
from rosbags.image import message_to_cvimage
from rosbags.image.image import ENCODINGMAP, to_cvtype

from specprune_ros.bags.io import BagError, BagReader, check_types_known, normalize_topic
from specprune_ros.bridge.conversions import CommandUnits, command_to_action, gripper_value_to_action
from specprune_ros.codecs.image_decoding import (MAX_SIDE, RAW_ENCODINGS, DecodedFrame, ImageError,
                                                 decode_compressed_frame, decode_raw_image, fit_to)
from specprune_ros.codecs.proprio import StateError, check_pose, finger_gap_from_joints, proprio_vector

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
STRING = 'std_msgs/msg/String'
POSE = 'geometry_msgs/msg/PoseStamped'
JOINT_STATE = 'sensor_msgs/msg/JointState'
FLOAT64 = 'std_msgs/msg/Float64'
TWIST = 'geometry_msgs/msg/TwistStamped'
TRAJECTORY = 'trajectory_msgs/msg/JointTrajectory'
STATUS = 'diagnostic_msgs/msg/DiagnosticStatus'

CLOCK_RESTART_S = 1.0      # a header stamp this far below the newest before it on its topic: the clock restarted
READ_AHEAD_S = 5.0         # with max_observations: bag time read past the last frame needed (partners, commands)
_NS = 1_000_000_000


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
    pose_layout: str = 'reference'     # how pose and gripper state become the proprio (codecs.proprio.POSE_LAYOUTS)

    def normalized(self) -> 'StreamTopics':
        def norm(topic: str) -> str:
            return normalize_topic(topic) if topic else ''
        return StreamTopics(cameras={k: norm(v) for k, v in self.cameras.items()},
                            instruction=norm(self.instruction), ee_pose=norm(self.ee_pose),
                            gripper_state=norm(self.gripper_state), commands=norm(self.commands),
                            gripper_command=norm(self.gripper_command), chunks=norm(self.chunks),
                            inference=norm(self.inference), finger_joints=tuple(self.finger_joints),
                            pose_layout=self.pose_layout)


@dataclass
class BagObservation:
    stamp_ns: int                              # header stamp of the first camera's frame (bag time when unstamped)
    bag_time_ns: int
    images: dict                               # camera -> (H, W, 3) uint8 RGB at the requested size
    instruction: str
    proprio: Optional[np.ndarray]
    recorded_action: Optional[np.ndarray] = None    # (7,) normalised, what the robot executed at this tick
    recorded_chunk: Optional[np.ndarray] = None     # (steps, action dim) the chunk the node computed from this frame
    episode: int = 0                                # clock restarts before this frame (see the module docstring)


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
    commands: list = field(default_factory=list)   # ((episode, stamp ns), 7-D action) per commanded instant, sorted
    commands_by_bag_time: bool = False          # the commands' stamps are bag times (compare bag_time_ns)
    recorded_by: list = field(default_factory=list)   # (method, model, inferences) from ~/inference, most first

    def command_key(self, observation: BagObservation) -> tuple[int, int]:
        """Where ``observation`` sits on the commands' clock (compare with ``commands[i][0]``)."""
        if self.commands_by_bag_time:
            return 0, observation.bag_time_ns
        return observation.episode, observation.stamp_ns


def _stamp(header) -> int:
    return int(header.stamp.sec) * _NS + int(header.stamp.nanosec)


def _decode(msg, msgtype: str, at_least: Optional[tuple]) -> DecodedFrame:
    """A camera message's pixels; JPEG at a reduced scale down to ``at_least`` (as the node decodes them)."""
    if msgtype == COMPRESSED:
        return decode_compressed_frame(msg.data, msg.format, at_least)
    if msg.encoding in RAW_ENCODINGS:
        rgb = decode_raw_image(msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data)
    else:
        rgb = decode_other_encoding(msg)
    return DecodedFrame(rgb, rgb.shape[:2])


# OpenCV-style encodings with a colour order: BGR(A), as 8UC3 in RAW_ENCODINGS (rosbags-image would take
# them as channels of no colour space and pass them on as RGB)
GENERIC_ALIASES = {'8UC4': 'bgra8', '16UC3': 'bgr16', '16UC4': 'bgra16'}


def decode_other_encoding(msg) -> np.ndarray:
    """RGB uint8 from a ``sensor_msgs/Image`` in an encoding the node does not take, with ``rosbags-image``.

    16-bit scaled to 8, Bayer demosaiced, YUV converted; sizes are checked and row padding removed first.
    Only named encodings (and the aliases above) are taken: other ``NN[USF]Cn`` ones (depth, float images)
    have no colour meaning, and a cast to uint8 would turn them black.
    """
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    encoding = GENERIC_ALIASES.get(msg.encoding, msg.encoding)
    if encoding not in ENCODINGMAP:
        raise ImageError('image_encoding', f'unsupported encoding {msg.encoding!r}: not a colour or gray image '
                         f'(expected a named ROS encoding such as rgb8, mono16 or bayer_rggb8, or '
                         f'{", ".join(["8UC1", "8UC3", *GENERIC_ALIASES])})')
    _, _, typestr, channels = to_cvtype(encoding)
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
    if encoding != msg.encoding:
        msg = dataclasses.replace(msg, encoding=encoding)
    try:
        rgb = message_to_cvimage(msg, 'rgb8')
    except (ConversionError, ValueError) as error:
        raise ImageError('image_encoding', f'cannot convert {msg.encoding} to RGB: {error}') from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


# --- clocks and episodes ---------------------------------------------------------------------------------------
def clock_episodes(entries: Sequence[tuple], restart_s: float = CLOCK_RESTART_S) -> list[int]:
    """Episode of each (header stamp, bag time, ...) entry of one topic, in bag order.

    The next episode starts where the header clock went back while the bag's clock went on: a stamp below the newest
    before it, received more than ``restart_s`` later than that newest stamp's delay (a simulator reset). Messages
    merely out of order keep their delay; a paused simulator does not go back.
    """
    jump = int(restart_s * _NS)
    out: list[int] = []
    newest: Optional[tuple[int, int]] = None       # (stamp, bag time - stamp) of the newest stamp so far
    episode = 0
    for stamp, bag_ns, *_ in entries:
        delay = bag_ns - stamp
        if newest is not None and stamp < newest[0] and delay > newest[1] + jump:
            episode += 1
            newest = (stamp, delay)
        elif newest is None or stamp >= newest[0]:
            newest = (stamp, delay)
        out.append(episode)
    return out


@dataclass
class _Series:
    """The usable messages of one stream in bag order: (header stamp ns, bag time ns, value)."""

    entries: list = field(default_factory=list)

    def add(self, header_ns: int, bag_ns: int, value: Any) -> None:
        self.entries.append((header_ns, bag_ns, value))

    def unstamped(self) -> bool:
        """Most stamps are zero (a driver that never sets them; a simulator's clock starts at zero once)."""
        return 2 * sum(header <= 0 for header, _, _ in self.entries) > len(self.entries)


@dataclass
class _Episodes:
    """The reference camera's episodes: how many, and the bag time each one's first frame arrived."""

    count: int = 1
    starts_ns: list = field(default_factory=lambda: [0])

    def by_bag_time(self, bag_ns: int) -> int:
        return max(bisect.bisect_right(self.starts_ns, bag_ns) - 1, 0)


def _episode_indices(series: _Series, episodes: _Episodes) -> list[int]:
    """Each entry's episode: its own clock restarts when they match the reference camera's, else by bag time."""
    own = clock_episodes(series.entries)
    if own and own[-1] + 1 == episodes.count:
        return own
    return [episodes.by_bag_time(bag_ns) for _, bag_ns, _ in series.entries]


@dataclass
class _Timeline:
    """One stream keyed on the clock it is matched by: per episode, sorted keys (later messages win ties)."""

    by_bag_time: bool
    keys: dict = field(default_factory=dict)        # episode -> sorted key ns
    values: dict = field(default_factory=dict)      # episode -> values in the same order

    @classmethod
    def of(cls, series: _Series, episodes: _Episodes, by_bag_time: bool) -> '_Timeline':
        by_bag_time = by_bag_time or series.unstamped()
        if by_bag_time:
            indices = [0] * len(series.entries)
        else:
            indices = _episode_indices(series, episodes)
        grouped: dict[int, list] = {}
        for episode, (header, bag_ns, value) in zip(indices, series.entries):
            grouped.setdefault(episode, []).append((bag_ns if by_bag_time else header, value))
        timeline = cls(by_bag_time)
        for episode, items in grouped.items():
            items.sort(key=lambda item: item[0])      # stable: among equal keys the later message stays last
            timeline.keys[episode] = [key for key, _ in items]
            timeline.values[episode] = [value for _, value in items]
        return timeline

    def newest_at(self, observation: BagObservation) -> Any:
        """The newest value keyed at or before the observation (None when there is none)."""
        episode, key = (0, observation.bag_time_ns) if self.by_bag_time else (observation.episode,
                                                                              observation.stamp_ns)
        keys = self.keys.get(episode, ())
        index = bisect.bisect_right(keys, key) - 1
        return self.values[episode][index] if index >= 0 else None


# --- reading ---------------------------------------------------------------------------------------------------
@dataclass
class _Recorded:
    """What the read kept of the bag, and what it skipped."""

    frames: dict                                    # camera -> _Series of (bag ns, RGB) frames
    instructions: list = field(default_factory=list)       # (bag ns, text)
    poses: _Series = field(default_factory=_Series)        # ((x, y, z), (qx, qy, qz, qw))
    grippers: _Series = field(default_factory=_Series)     # finger gap (Float64: unstamped)
    twists: _Series = field(default_factory=_Series)       # (bag ns, (vx, vy, vz, wx, wy, wz))
    gripper_commands: list = field(default_factory=list)   # (bag ns, value)
    chunks: _Series = field(default_factory=_Series)       # (steps, width) float64
    recorders: Counter = field(default_factory=Counter)
    sizes: dict = field(default_factory=dict)              # camera -> (H, W) as recorded
    skipped: Counter = field(default_factory=Counter)      # (topic, why) -> count
    first_reason: dict = field(default_factory=dict)       # (topic, why) -> the first message's detail
    exhausted: bool = False                                # every message of the bag was read
    pending: list = field(default_factory=list)            # the message read but not yet used

    def skip(self, topic: str, why: str, detail: str = '') -> None:
        self.skipped[(topic, why)] += 1
        self.first_reason.setdefault((topic, why), detail)


def _read(bag: BagReader, path: str | Path, topics: StreamTopics, wanted: dict, image_size: Optional[tuple],
          recorded: _Recorded, messages: Iterator, until: Callable[[_Recorded, int], bool],
          image_fit: str = 'stretch') -> None:
    """Read ``messages`` into ``recorded`` until ``until(recorded, bag time)`` says enough (or the bag ends).

    The message that stopped it is kept (``recorded.pending``) and read first when reading goes on.
    """
    pending, recorded.pending = recorded.pending, []
    for message in itertools.chain(pending, messages):
        topic, msgtype, bag_ns, raw = message
        if until(recorded, bag_ns):
            recorded.pending = [message]
            return
        kind, camera = wanted[topic]
        try:
            msg = bag.deserialize(raw, msgtype, topic)
        except BagError as error:
            recorded.skip(topic, 'undecodable messages', str(error).split(': ', 1)[-1])
            continue
        if kind == 'camera':
            stamp = _stamp(msg.header)
            try:
                frame = _decode(msg, msgtype, image_size)
            except ImageError as error:
                recorded.skip(topic, 'unusable frames', f'camera {camera!r} frame stamped {stamp * 1e-9:.3f} s: '
                                                        f'{error}')
                continue
            rgb, size = frame
            if camera not in recorded.sizes:
                recorded.sizes[camera] = size
            elif recorded.sizes[camera] != size:
                raise BagError(f'bag {path}: mismatched image sizes on camera {camera!r} ({topic}): the frame '
                               f'stamped {stamp * 1e-9:.3f} s is {size[1]}x{size[0]}, earlier frames are '
                               f'{recorded.sizes[camera][1]}x{recorded.sizes[camera][0]}')
            rgb = fit_to(rgb, image_size, image_fit) if image_size else rgb
            recorded.frames[camera].add(stamp, bag_ns, rgb if rgb.flags.writeable else rgb.copy())
        elif kind == 'instruction':
            recorded.instructions.append((bag_ns, str(msg.data)))
        elif kind == 'ee_pose':
            p, q = msg.pose.position, msg.pose.orientation
            position, quaternion = (p.x, p.y, p.z), (q.x, q.y, q.z, q.w)
            try:
                check_pose(position, quaternion)
            except StateError as error:
                recorded.skip(topic, 'invalid poses', str(error))
                continue
            recorded.poses.add(_stamp(msg.header), bag_ns, (position, quaternion))
        elif kind == 'gripper_state':
            if msgtype == JOINT_STATE:
                try:
                    gap = finger_gap_from_joints(list(msg.name), list(msg.position), topics.finger_joints)
                except StateError as error:
                    recorded.skip(topic, 'joint states without usable finger joints', str(error))
                    continue
                recorded.grippers.add(_stamp(msg.header), bag_ns, gap)
            elif np.isfinite(msg.data):
                recorded.grippers.add(0, bag_ns, float(msg.data))      # no header: matched by bag time
            else:
                recorded.skip(topic, 'non-finite finger gaps')
        elif kind == 'commands':
            t = msg.twist
            twist = (t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z)
            if not np.isfinite(twist).all():
                recorded.skip(topic, 'non-finite twists')
                continue
            recorded.twists.add(_stamp(msg.header), bag_ns, (bag_ns, twist))
        elif kind == 'gripper_command':
            recorded.gripper_commands.append((bag_ns, float(msg.data)))
        elif kind == 'inference':
            recorded.recorders[(str(msg.message), str(msg.hardware_id))] += 1
        elif kind == 'chunks':
            try:
                chunk = np.array([list(point.positions) for point in msg.points], dtype=np.float64)
            except ValueError:
                chunk = np.empty((0,))
            if chunk.ndim != 2 or not chunk.size or not np.isfinite(chunk).all():
                recorded.skip(topic, 'empty, ragged or non-finite chunks')
                continue
            recorded.chunks.add(_stamp(msg.header), bag_ns, chunk)
    recorded.exhausted = True


def _enough_frames(count: int) -> Callable[[_Recorded, int], bool]:
    """Stop once ``count`` frames of the first camera are read and ``READ_AHEAD_S`` of bag time has passed."""
    def until(recorded: _Recorded, bag_ns: int) -> bool:
        if not count:
            return False
        frames = next(iter(recorded.frames.values())).entries
        return len(frames) >= count and bag_ns > frames[count - 1][1] + int(READ_AHEAD_S * _NS)
    return until


def load_streams(path: str | Path, topics: Optional[StreamTopics] = None, image_size: Optional[tuple] = (96, 96),
                 max_camera_skew_s: float = 0.05, units: CommandUnits = CommandUnits(), instruction: str = '',
                 max_observations: int = 0, image_fit: str = 'stretch') -> BagStreams:
    """Read and pair everything (see the module docstring); ``BagError`` names whatever is wrong.

    Frames are fitted to ``image_size`` as the policy node fits them (``image_fit``, the policy's).

    ``units``: what the recording node's commands meant (its policy's scales times ``action_scale``, the policy's
    control period, the gripper values). ``max_observations`` (0: all) stops reading once that many frame sets are
    paired.
    """
    topics = (topics or StreamTopics()).normalized()
    if not topics.cameras:
        raise BagError('at least one camera topic is needed')
    if max_observations < 0:
        raise BagError(f'max_observations must be 0 (all) or positive, got {max_observations}')
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
            if not topic or (kind == 'instruction' and instruction):
                continue                     # switched off, or the instruction given replaces the topic
            info = available.get(topic)
            if info is None or info.count == 0:
                if kind != 'inference':      # the report says the recording method is unknown
                    notes.append(f'no {kind} topic {topic} in the bag' if info is None else
                                 f'{kind} topic {topic} has no messages')
                continue
            bag.require(topic, types, kind)   # present: it must have the right type
            wanted[topic] = (kind, None)
        if topics.instruction not in wanted and not instruction:
            state = 'has no messages' if topics.instruction in available else 'is missing'
            raise BagError(f'bag {path}: instruction topic {topics.instruction or "(none)"} {state} and no '
                           'instruction was given (pass one, or name the String topic that carries it)')
        check_types_known(bag, wanted)
        recorded = _Recorded(frames={name: _Series() for name in topics.cameras})
        messages = bag.raw_messages(wanted)
        target = max_observations
        while True:
            _read(bag, path, topics, wanted, image_size, recorded, messages, _enough_frames(target), image_fit)
            streams = _pair(path, topics, recorded, camera_types, list(notes), max_camera_skew_s, units, instruction,
                            max_observations)
            short = max_observations - len(streams.observations)
            if recorded.exhausted or short <= 0:
                return streams
            target = len(next(iter(recorded.frames.values())).entries) + short   # frames without partners: more


def _skipped_notes(recorded: _Recorded) -> list[str]:
    return [f'{count} {why} on {topic} skipped' + (f' (first: {recorded.first_reason[(topic, why)]})'
                                                   if recorded.first_reason[(topic, why)] else '')
            for (topic, why), count in sorted(recorded.skipped.items())]


def _pair(path, topics: StreamTopics, recorded: _Recorded, camera_types: dict, notes: list, max_camera_skew_s: float,
          units: CommandUnits, instruction: str, max_observations: int) -> BagStreams:
    """Frame sets of the read messages, with their state, instruction, commands and chunks."""
    names = list(topics.cameras)
    reference = names[0]
    notes += _skipped_notes(recorded)
    if not recorded.frames[reference].entries:
        reasons = [note for note in notes if topics.cameras[reference] in note]
        detail = f': {reasons[0]}' if reasons else ''
        raise BagError(f'bag {path}: camera {reference!r} has no usable frames{detail}')
    unstamped = [name for name in names if recorded.frames[name].unstamped()]
    by_bag_time = bool(unstamped)
    if unstamped:
        notes.append(f'frames of {unstamped} carry no header.stamp: every stream is matched by bag time')
    episodes = _Episodes()
    reference_frames = recorded.frames[reference].entries
    if not by_bag_time:
        own = clock_episodes(reference_frames)
        starts = [reference_frames[i][1] for i in range(len(own)) if i == 0 or own[i] != own[i - 1]]
        episodes = _Episodes(count=own[-1] + 1, starts_ns=starts)
        if episodes.count > 1:
            restarts = 'once' if episodes.count == 2 else f'{episodes.count - 1} times'
            notes.append(f'the clock restarted {restarts} (a simulator reset?): {episodes.count} episodes, each '
                         'replayed from a fresh temporal state')
    cameras = {name: _camera_frames(recorded.frames[name], episodes, by_bag_time) for name in names}
    poses = _Timeline.of(recorded.poses, episodes, by_bag_time)
    grippers = _Timeline.of(recorded.grippers, episodes, by_bag_time)
    commands, commands_by_bag_time = _command_timeline(recorded, episodes, by_bag_time, units)
    command_keys = [key for key, _ in commands]
    chunks = _chunks_by_frame(recorded, episodes, notes) if not by_bag_time else {}
    instruction_times = [i[0] for i in recorded.instructions]
    skew_ns = int(max_camera_skew_s * _NS)
    period_ns = int(round(units.period_s * _NS))
    observations: list[BagObservation] = []
    unpaired = 0
    backfilled = False
    for episode, frames in sorted(cameras[reference].items()):
        for stamp in frames.stamps:
            bag_ns, image = frames.by_stamp[stamp]
            images = {reference: image}
            for name in names[1:]:
                partner = cameras[name].get(episode, _CameraFrames()).nearest(stamp, skew_ns)
                if partner is None:
                    break
                images[name] = partner
            if len(images) != len(names):
                unpaired += 1
                continue
            text = instruction
            if not text:
                index = bisect.bisect_right(instruction_times, bag_ns) - 1
                if index < 0:
                    backfilled = True
                    index = 0
                text = recorded.instructions[index][1]
            observation = BagObservation(stamp_ns=stamp, bag_time_ns=bag_ns, images=images, instruction=text,
                                         proprio=None, recorded_chunk=chunks.get((episode, stamp)), episode=episode)
            pose, gap = poses.newest_at(observation), grippers.newest_at(observation)
            if pose is not None and gap is not None:
                try:
                    observation.proprio = proprio_vector(pose[0], pose[1], gap, topics.pose_layout)
                except StateError:
                    pass                  # the pose and the gap were checked as they were read
            key = (0, bag_ns) if commands_by_bag_time else (episode, stamp)
            lo = bisect.bisect_left(command_keys, key)
            hi = bisect.bisect_left(command_keys, (key[0], key[1] + period_ns))
            if hi > lo:
                observation.recorded_action = commands[hi - 1][1]     # the last command of this tick
            observations.append(observation)
            if max_observations and len(observations) >= max_observations:
                break
        if max_observations and len(observations) >= max_observations:
            break
    if not observations:
        raise BagError(f'bag {path}: no synchronized frame set: camera stamps never agree within '
                       f'{max_camera_skew_s} s across {names}')
    if unpaired:
        notes.append(f'{unpaired} frames of {reference!r} had no partner frame within {max_camera_skew_s} s')
    if backfilled:
        notes.append('frames before the first recorded instruction use that first instruction')
    return BagStreams(path=str(path), topics=topics, observations=observations, camera_sizes=dict(recorded.sizes),
                      camera_types=camera_types, notes=notes,
                      has_state=bool(recorded.poses.entries and recorded.grippers.entries),
                      has_commands=bool(commands), has_chunks=bool(chunks), commands=commands,
                      commands_by_bag_time=commands_by_bag_time,
                      recorded_by=[(method, model, count) for (method, model), count
                                   in recorded.recorders.most_common()])


@dataclass
class _CameraFrames:
    """One camera's frames of one episode: {stamp: (bag ns, RGB)} and the stamps sorted."""

    by_stamp: dict = field(default_factory=dict)
    stamps: list = field(default_factory=list)

    def nearest(self, stamp: int, skew_ns: int) -> Optional[np.ndarray]:
        """The frame stamped nearest ``stamp`` within ``skew_ns`` (None when there is none)."""
        index = bisect.bisect_left(self.stamps, stamp)
        best = min(self.stamps[max(index - 1, 0):index + 1], key=lambda c: abs(c - stamp), default=None)
        return None if best is None or abs(best - stamp) > skew_ns else self.by_stamp[best][1]


def _camera_frames(series: _Series, episodes: _Episodes, by_bag_time: bool) -> dict[int, _CameraFrames]:
    """Each episode's frames (a frame re-sent with the same stamp: the later one)."""
    indices = [0] * len(series.entries) if by_bag_time else _episode_indices(series, episodes)
    out: dict[int, _CameraFrames] = {}
    for episode, (header, bag_ns, rgb) in zip(indices, series.entries):
        out.setdefault(episode, _CameraFrames()).by_stamp[bag_ns if by_bag_time else header] = (bag_ns, rgb)
    for frames in out.values():
        frames.stamps = sorted(frames.by_stamp)
    return out


def _chunks_by_frame(recorded: _Recorded, episodes: _Episodes, notes: list) -> dict[tuple[int, int], np.ndarray]:
    """(episode, header stamp) -> the recorded chunk; chunks of a width other than the most common are skipped."""
    series = recorded.chunks
    if not series.entries:
        return {}
    if series.unstamped():
        notes.append(f'{len(series.entries)} recorded chunks carry no header.stamp: not compared')
        return {}
    widths = Counter(chunk.shape[1] for _, _, chunk in series.entries)
    width = widths.most_common(1)[0][0]
    if len(widths) > 1:
        notes.append(f'{sum(widths.values()) - widths[width]} recorded chunks of another width than {width} skipped')
    return {(episode, header): chunk for episode, (header, _, chunk)
            in zip(_episode_indices(series, episodes), series.entries) if chunk.shape[1] == width}


def _command_timeline(recorded: _Recorded, episodes: _Episodes, by_bag_time: bool,
                      units: CommandUnits) -> tuple[list, bool]:
    """The recorded commands per commanded instant (sorted by episode and stamp), and whether keyed by bag time."""
    timeline = _Timeline.of(recorded.twists, episodes, by_bag_time)
    out = []
    for episode in sorted(timeline.keys):
        twists = [(key, bag_ns, twist)
                  for key, (bag_ns, twist) in zip(timeline.keys[episode], timeline.values[episode])]
        end = episodes.starts_ns[episode + 1] if not timeline.by_bag_time and episode + 1 < episodes.count else None
        out += [((episode, stamp), action)
                for stamp, action in command_timeline(twists, recorded.gripper_commands, units, end)]
    return out, timeline.by_bag_time


def command_timeline(twists: list, gripper_commands: list, units: CommandUnits, end_ns: Optional[int] = None) -> list:
    """(stamp ns, normalised 7-D action) per commanded instant, from (stamp ns, bag ns, twist) entries.

    Of the twists sharing a stamp, the last received (a servo applies the latest); the gripper is the newest
    gripper command recorded before the next instant's first twist (bag time; for the last instant, before
    ``end_ns`` when given).
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
            g_index = len(gripper_commands) - 1 if end_ns is None else bisect.bisect_left(gripper_times, end_ns) - 1
        gripper = gripper_value_to_action(gripper_commands[g_index][1], units) if g_index >= 0 else -1.0
        out.append((twists[last][0], command_to_action(twists[last][2], gripper, units)))
    return out
