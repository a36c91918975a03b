"""Bags as robots record them: unstamped drivers, simulator resets, bad messages, empty topics.

Shared joint-state topics, a broken frame here and there: each bag is read into the right frame sets, with what was
skipped or guessed in the notes.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from specprune_ros.bags.io import BagError, BagWriter
from specprune_ros.bags.replay_eval import ReplayConfig, _reset_points, inference_indices
from specprune_ros.bags.streams import StreamTopics, clock_episodes, load_streams
from specprune_ros.bags.typestore_messages import TypestoreMessages

ROOT = Path(__file__).resolve().parents[1]
CAMERAS = ('/camera/agentview/image_raw', '/camera/wrist/image_raw')
FINGERS = ('finger_joint1', 'finger_joint2')
S = 1_000_000_000


def write_bag(path: Path, frames: int, stamp: Callable[[int], int], bag_time: Callable[[int], int],
              instructions: tuple = ((0, 'pick up the red cube'),), extra: Optional[Callable] = None,
              poses: bool = True, twists: bool = True) -> Path:
    """A bag of ``frames`` frame sets with their robot state and commands.

    Frame ``k`` of both cameras (pixel value ``k``) is stamped ``stamp(k)`` and received at ``bag_time(k)``, just after
    a pose at x = k / 10 and finger joints, and before a twist, all of the same stamp; ``instructions``: (frame index,
    text) published just before that frame.
    """
    with BagWriter(path) as writer:
        build = TypestoreMessages(writer.typestore)
        for topic in CAMERAS:
            writer.add_topic(topic, 'sensor_msgs/msg/Image')
        writer.add_topic('/instruction', 'std_msgs/msg/String')
        writer.add_topic('/ee_pose', 'geometry_msgs/msg/PoseStamped')
        writer.add_topic('/gripper_state', 'sensor_msgs/msg/JointState')
        writer.add_topic('/delta_twist_cmds', 'geometry_msgs/msg/TwistStamped')
        texts = dict(instructions)
        for k in range(frames):
            ns, at = stamp(k), bag_time(k)
            if k in texts:
                writer.write('/instruction', at - 1000, build.string(texts[k]))
            for topic in CAMERAS:
                writer.write(topic, at, build.image(np.full((16, 16, 3), k, np.uint8), ns))
            if poses:
                writer.write('/ee_pose', at - 2, build.pose((k / 10, 0.0, 0.2), 0.0, ns))
                writer.write('/gripper_state', at - 1, build.finger_joints(0.04, FINGERS, ns))
            if twists:
                writer.write('/delta_twist_cmds', at + 3, build.twist((0.01 * k, 0, 0, 0, 0, 0), ns))
        if extra is not None:
            extra(writer, build)
    return path


def pixels(streams) -> list[int]:
    return [int(o.images['agentview'][0, 0, 0]) for o in streams.observations]


def test_unstamped_frames_are_paired_by_bag_time(tmp_path):
    """A driver that leaves header.stamp at zero: every frame is kept, in bag order, with its own state."""
    path = write_bag(tmp_path / 'zero', 8, stamp=lambda k: 0, bag_time=lambda k: 5 * S + k * S // 10)
    streams = load_streams(path, image_size=None)
    assert pixels(streams) == list(range(8))
    assert [o.stamp_ns for o in streams.observations] == [5 * S + k * S // 10 for k in range(8)]
    assert [round(float(o.proprio[0]), 3) for o in streams.observations] == [k / 10 for k in range(8)]
    assert [round(float(o.recorded_action[0]), 3) for o in streams.observations] == \
        [round(0.01 * k * 0.1 / 0.02, 3) for k in range(8)]
    assert any('carry no header.stamp' in note for note in streams.notes)


def test_a_simulator_reset_starts_a_new_episode(tmp_path):
    """The sim clock restarts at zero while the recorder's clock goes on: two episodes, nothing merged or lost.

    Each frame keeps its own episode's instruction, state and command, and the replay resets the policy in between.
    """
    def stamp(k: int) -> int:
        return (k % 6) * S // 10

    def bag_time(k: int) -> int:
        return 100 * S + k * S // 10 + (7 * S if k >= 6 else 0)

    path = write_bag(tmp_path / 'reset', 12, stamp, bag_time,
                     instructions=((0, 'pick up the red cube'), (6, 'push the blue cube')))
    streams = load_streams(path, image_size=None)
    assert pixels(streams) == list(range(12))
    assert [o.episode for o in streams.observations] == [0] * 6 + [1] * 6
    assert [o.instruction for o in streams.observations] == ['pick up the red cube'] * 6 + ['push the blue cube'] * 6
    assert [round(float(o.proprio[0]), 3) for o in streams.observations] == [k / 10 for k in range(12)]
    assert [round(float(o.recorded_action[0]), 3) for o in streams.observations] == \
        [round(0.01 * k * 0.1 / 0.02, 3) for k in range(12)]
    assert any('clock restarted once' in note for note in streams.notes)
    indices, _ = inference_indices(streams, ReplayConfig(schedule='every', stride=3))
    assert indices == [0, 3, 6, 9] and _reset_points(streams, indices, gap_s=2.0) == {0, 2}
    # the same instruction in both episodes: still a reset at the restart
    same = write_bag(tmp_path / 'reset_same', 12, stamp, bag_time)
    streams = load_streams(same, image_size=None)
    assert _reset_points(streams, list(range(12)), gap_s=2.0) == {0, 6}


def test_clock_episodes_tell_a_restart_from_reordering_and_pauses():
    ordered = [(k * S // 10, 50 * S + k * S // 10) for k in range(5)]
    assert clock_episodes(ordered) == [0] * 5
    swapped = [ordered[0], ordered[2], ordered[1], ordered[3]]            # out of order by one frame
    assert clock_episodes(swapped) == [0] * 4
    paused = ordered[:3] + [(3 * S // 10, 60 * S)]                       # sim paused for ten seconds, then on
    assert clock_episodes(paused) == [0] * 4
    restarted = ordered + [(0, 52 * S), (S // 10, 52 * S + S // 10)]     # back to zero, two seconds later
    assert clock_episodes(restarted) == [0] * 5 + [1, 1]


def test_bad_messages_are_skipped_and_counted(tmp_path):
    """One corrupt frame, a NaN pose, the arm's own JointState on the gripper topic: each is skipped with a note.

    The frame sets around them stay, with the newest valid state.
    """
    def extra(writer, build):
        writer.add_topic('/specprune_node/action_chunk', 'trajectory_msgs/msg/JointTrajectory')
        bad = build.image(np.zeros((16, 16, 3), np.uint8), 3 * S // 10 + 5 * S)
        bad.step = 16 * 3 + 7
        writer.write(CAMERAS[1], 5 * S + 3 * S // 10 + 10, bad)           # a second wrist frame at frame 3, broken
        # stamped like frame 4's valid state and received after it: the newest at that stamp, were they kept
        nan_pose = build.pose((float('nan'), 0.0, 0.2), 0.0, 5 * S + 4 * S // 10)
        writer.write('/ee_pose', 5 * S + 4 * S // 10 + 50, nan_pose)
        arm = build.finger_joints(0.0, ('joint1', 'joint2'), 5 * S + 4 * S // 10)
        writer.write('/gripper_state', 5 * S + 4 * S // 10 + 60, arm)
        labels = [f'a{i}' for i in range(7)]
        writer.write('/specprune_node/action_chunk', 5 * S + 2, build.trajectory(np.zeros((4, 7)), 5 * S, 0.1, labels))
        writer.write('/specprune_node/action_chunk', 5 * S + S // 10 + 2,
                     build.trajectory(np.zeros((4, 6)), 5 * S + S // 10, 0.1, labels[:6]))

    path = write_bag(tmp_path / 'bad', 6, stamp=lambda k: 5 * S + k * S // 10, bag_time=lambda k: 5 * S + k * S // 10,
                     extra=extra)
    streams = load_streams(path, image_size=None)
    assert pixels(streams) == list(range(6))
    assert streams.observations[3].images['wrist'][0, 0, 0] == 3       # the valid wrist frame of that stamp
    assert [round(float(o.proprio[0]), 3) for o in streams.observations] == [k / 10 for k in range(6)]
    notes = ' | '.join(streams.notes)
    assert '1 unusable frames on /camera/wrist/image_raw skipped' in notes and 'data holds' in notes
    assert '1 invalid poses on /ee_pose skipped' in notes
    assert '1 joint states without usable finger joints on /gripper_state skipped' in notes
    assert '1 recorded chunks of another width than 7 skipped' in notes
    assert streams.observations[0].recorded_chunk.shape == (4, 7) and streams.observations[1].recorded_chunk is None


def test_empty_topics_count_as_absent_and_a_given_instruction_replaces_the_topic(tmp_path):
    def extra(writer, build):
        writer.add_topic('/specprune_node/inference', 'diagnostic_msgs/msg/DiagnosticStatus')
        writer.add_topic('/task', 'std_msgs/msg/String')

    path = write_bag(tmp_path / 'empty', 3, stamp=lambda k: S + k * S // 10, bag_time=lambda k: S + k * S // 10,
                     extra=extra, twists=False)
    assert len(load_streams(path).observations) == 3
    topics = StreamTopics(instruction='/task')
    with pytest.raises(BagError, match='instruction topic /task has no messages and no instruction was given'):
        load_streams(path, topics)
    streams = load_streams(path, topics, instruction='stack the cubes')
    assert {o.instruction for o in streams.observations} == {'stack the cubes'}


def test_max_observations_stops_reading(tmp_path):
    """Only the frame sets asked for (and a few seconds after them) are read: a broken frame later is not reached."""
    def extra(writer, build):
        bad = build.image(np.zeros((16, 16, 3), np.uint8), 70 * S)
        bad.step = 1
        writer.write(CAMERAS[0], 70 * S, bad)

    path = write_bag(tmp_path / 'long', 40, stamp=lambda k: S + k * S // 10, bag_time=lambda k: S + k * S // 10,
                     extra=extra)
    limited = load_streams(path, max_observations=5)
    assert pixels(limited) == list(range(5)) and not any('unusable' in note for note in limited.notes)
    everything = load_streams(path)
    assert len(everything.observations) == 40 and any('1 unusable frames' in note for note in everything.notes)


def test_evaluate_cli_refuses_bad_arguments_before_running(tmp_path):
    """User errors end with exit status 2 and one line (a mistyped method before the unpruned baseline runs)."""
    path = write_bag(tmp_path / 'cli', 3, stamp=lambda k: S + k * S // 10, bag_time=lambda k: S + k * S // 10)
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    cases = [(['--methods', 'specprun'], "unknown pruning method 'specprun'"),
             (['--method-config', 'random={keep_ratio: [0.5'], 'not valid YAML'),
             (['--out', str(a_file)], 'is a file; give a directory'),
             (['--stride', '0'], '--stride: must be at least 1'),
             (['--device', 'cuda:7'], "--device 'cuda:7'"),
             (['--instruction', 'stack the cubes'], 'words this model does not know (stack, cubes)')]
    for extra_args, message in cases:
        done = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'evaluate_bag.py'), str(path), '--model',
                               'tiny-random', '--quiet', '--out', str(tmp_path / 'report'), *extra_args],
                              capture_output=True, text=True, timeout=120,
                              env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
        assert done.returncode == 2 and message in done.stderr, (extra_args, done.stderr)
        assert 'Traceback' not in done.stderr
    assert not (tmp_path / 'report').exists()
