"""Bags without DDS: simulator episodes written to real MCAP and sqlite3 files and read back (frames, robot
state, commands), custom message definitions, and bad bags failing with a clear message, never a traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specprune_ros.bags.io import BagError, BagReader, BagWriter
from specprune_ros.bags.typestore_messages import TypestoreMessages
from specprune_ros.bags.sim_bag import SimBagOptions, record_sim_bag
from specprune_ros.bags.streams import StreamTopics, load_streams

ROOT = Path(__file__).resolve().parents[1]
SEED = 1_000_000
STEPS = 12


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    base = tmp_path_factory.mktemp('bags')
    mcap = record_sim_bag(base / 'expert_mcap', SimBagOptions(seeds=(SEED,), max_steps=STEPS, storage='mcap'))
    sqlite = record_sim_bag(base / 'expert_sqlite3', SimBagOptions(seeds=(SEED,), max_steps=STEPS, storage='sqlite3',
                                                                    compressed=True))
    return {'base': base, 'mcap': mcap, 'sqlite3': sqlite}


@pytest.fixture(scope='module')
def expert_run():
    """The same episode run directly: observations before each action, and the actions."""
    from specprune_ros.sim import ScriptedExpert, TabletopEnv
    env = TabletopEnv(image_size=96)
    expert = ScriptedExpert(env)
    obs = env.reset(seed=SEED, family='pick')
    observations, actions = [], []
    for _ in range(STEPS):
        action = expert.act(obs)
        observations.append(obs)
        actions.append(np.clip(action, -1, 1))
        obs, done, _ = env.step(action)
        if done:
            break
    env.close()
    return observations, np.array(actions)


def compressed_topics() -> StreamTopics:
    topics = StreamTopics()
    topics.cameras = {name: f'{topic}/compressed' for name, topic in topics.cameras.items()}
    return topics


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_sim_episode_round_trips_through_a_real_bag(bags, expert_run, storage):
    result = bags[storage]
    observations, actions = expert_run
    suffix = '.mcap' if storage == 'mcap' else '.db3'
    assert any(p.suffix == suffix for p in result.path.iterdir()) and (result.path / 'metadata.yaml').is_file()
    assert result.episodes == [('pick', SEED, False, STEPS)]
    with BagReader(result.path) as bag:
        topics = bag.topics()
        assert topics['/instruction'].count == 1 and topics['/clock'].count == STEPS
        latched = topics['/instruction'].offered_qos[0]
        assert latched.durability.name == 'TRANSIENT_LOCAL'
    streams = load_streams(result.path, compressed_topics() if storage == 'sqlite3' else None)
    assert len(streams.observations) == STEPS and streams.has_state and streams.has_commands
    assert not streams.has_chunks and any('chunks' in note for note in streams.notes)
    for observation, expected, action in zip(streams.observations, observations, actions):
        assert observation.instruction == expected.instruction
        np.testing.assert_allclose(observation.proprio, expected.proprio, atol=1e-6)
        np.testing.assert_allclose(observation.recorded_action, action, atol=1e-9)
        for name in ('agentview', 'wrist'):
            if storage == 'mcap':   # raw rgb8: bit-exact
                np.testing.assert_array_equal(observation.images[name], expected.images[name])
            else:                   # JPEG
                error = np.abs(observation.images[name].astype(int) - expected.images[name]).mean()
                assert error < 6, error
    stamps = [o.stamp_ns for o in streams.observations]
    assert np.all(np.diff(stamps) == 100_000_000)


def test_bags_are_never_overwritten_and_custom_types_keep_their_definition(bags):
    with pytest.raises(BagError, match='exists already'):
        BagWriter(bags['mcap'].path)
    path = bags['base'] / 'custom'
    with BagWriter(path) as writer:
        writer.add_topic('/status', 'foo_msgs/msg/Status', msgdef='int32 code\nstring text\n')
        writer.write_raw('/status', 5, bytes([0, 1, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 111, 107, 0, 0]))
        with pytest.raises(BagError, match='unknown to the ROS 2 typestore'):
            writer.add_topic('/other', 'foo_msgs/msg/Unknown')
    with BagReader(path) as reader:
        (_, msgtype, timestamp, raw), = list(reader.raw_messages())
        message = reader.deserialize(raw, msgtype)
    assert (msgtype, timestamp, message.code, message.text) == ('foo_msgs/msg/Status', 5, 7, 'ok')


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    shutil.copytree(source, target)
    storage = next(p for p in target.iterdir() if p.suffix in ('.mcap', '.db3'))
    data = storage.read_bytes()
    storage.write_bytes(data[:int(len(data) * fraction)])
    return target


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_truncated_bags_name_the_problem(bags, storage):
    path = truncated_copy(bags[storage].path, bags['base'] / f'truncated_{storage}', 0.6)
    with pytest.raises(BagError, match='truncated or corrupt') as error:
        load_streams(path, compressed_topics() if storage == 'sqlite3' else None)
    assert str(path) in str(error.value)


def write_frames(path: Path, sizes: list[tuple[int, int]], bad_step: bool = False) -> Path:
    with BagWriter(path) as writer:
        build = TypestoreMessages(writer.typestore)
        writer.add_topic('/camera/agentview/image_raw', 'sensor_msgs/msg/Image')
        writer.add_topic('/camera/wrist/image_raw', 'sensor_msgs/msg/Image')
        writer.add_topic('/instruction', 'std_msgs/msg/String')
        writer.write('/instruction', 1, build.string('pick up the red cube'))
        for k, (height, width) in enumerate(sizes):
            ns = 10**9 + k * 10**8
            writer.write('/camera/agentview/image_raw', ns, build.image(np.zeros((96, 96, 3), np.uint8), ns))
            message = build.image(np.full((height, width, 3), 50, np.uint8), ns)
            if bad_step and k == 1:
                message.step = width * 3 + 7
            writer.write('/camera/wrist/image_raw', ns, message)
    return path


def test_missing_wrong_and_unknown_topics_are_named(bags):
    path = bags['mcap'].path
    with pytest.raises(BagError, match=r"camera 'wrist' topic /cam/wrist is missing; the bag has: .*/ee_pose"):
        load_streams(path, StreamTopics(cameras={'agentview': '/camera/agentview/image_raw', 'wrist': '/cam/wrist'}))
    with pytest.raises(BagError, match='has type geometry_msgs/msg/PoseStamped, expected sensor_msgs/msg/Image or'):
        load_streams(path, StreamTopics(cameras={'agentview': 'camera/agentview/image_raw', 'wrist': 'ee_pose'}))
    with pytest.raises(BagError, match='ee_pose topic /gripper_state has type sensor_msgs/msg/JointState'):
        load_streams(path, StreamTopics(ee_pose='/gripper_state'))
    with pytest.raises(BagError, match='instruction topic /task is missing and no instruction was given'):
        load_streams(path, StreamTopics(instruction='/task'))
    assert load_streams(path, StreamTopics(instruction='/task'), instruction='push it').observations[0].instruction \
        == 'push it'
    custom = bags['base'] / 'custom_camera'
    with BagWriter(custom) as writer:
        writer.add_topic('/camera/agentview/image_raw', 'foo_msgs/msg/Frame', msgdef='uint8[] pixels\n')
    with pytest.raises(BagError, match='has type foo_msgs/msg/Frame, expected'):
        load_streams(custom)


def test_mismatched_and_malformed_images_are_named(bags):
    sizes = write_frames(bags['base'] / 'sizes', [(96, 96), (96, 96), (64, 80)])
    with pytest.raises(BagError, match=r"mismatched image sizes on camera 'wrist' .* 80x64, earlier frames are 96x96"):
        load_streams(sizes)
    malformed = write_frames(bags['base'] / 'malformed', [(96, 96), (96, 96)], bad_step=True)
    with pytest.raises(BagError, match=r"camera 'wrist' .* stamped 1.100 s: data holds .* bytes"):
        load_streams(malformed)
    fine = load_streams(write_frames(bags['base'] / 'small', [(48, 64)] * 2), image_size=(96, 96))
    assert fine.camera_sizes['wrist'] == (48, 64) and fine.observations[0].images['wrist'].shape == (96, 96, 3)


def test_not_a_bag_is_named(tmp_path):
    with pytest.raises(BagError, match='no such file or directory'):
        load_streams(tmp_path / 'nothing')
    with pytest.raises(BagError, match='metadata.yaml is missing'):
        load_streams(tmp_path)


def test_cli_prints_the_reason_and_exits_2_without_a_traceback(bags):
    path = truncated_copy(bags['mcap'].path, bags['base'] / 'cli_truncated', 0.5)
    done = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'evaluate_bag.py'), str(path), '--model',
                           'tiny-random', '--quiet'], capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 2, done.stderr
    assert 'error: bag' in done.stderr and 'truncated or corrupt' in done.stderr
    assert 'Traceback' not in done.stderr
