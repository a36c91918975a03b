"""Bags without DDS.

Simulator episodes written to real MCAP and sqlite3 files and read back (frames, robot state, commands), custom message
definitions, and bad bags failing with a clear message, never a traceback.
"""
from __future__ import annotations

import re
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
    malformed = load_streams(write_frames(bags['base'] / 'malformed', [(96, 96), (96, 96)], bad_step=True))
    assert len(malformed.observations) == 1        # the first camera's second frame lost its partner
    assert any(re.search(r"1 unusable frames on /camera/wrist/image_raw skipped \(first: camera 'wrist' frame stamped "
                         r"1.100 s: data holds .* bytes", note) for note in malformed.notes), malformed.notes
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


def raw_image(build: TypestoreMessages, encoding: str, height: int, width: int, data: np.ndarray, step: int, ns: int):
    types = build.types
    return types['sensor_msgs/msg/Image'](header=build.header(ns, 'camera'), height=height, width=width,
                                          encoding=encoding, is_bigendian=0, step=step,
                                          data=np.frombuffer(data.tobytes(), dtype=np.uint8).copy())


def test_encodings_the_node_does_not_take_are_decoded_with_rosbags_image(tmp_path):
    """16-bit mono (row-padded), Bayer and YUV 4:2:2 frames become RGB; a truncated 16-bit frame is named."""
    height, width = 8, 8
    gray16 = (np.arange(height * width, dtype='<u2').reshape(height, width) * 1000)
    padded = np.zeros((height, width * 2 + 6), np.uint8)       # 6 bytes of padding per row
    padded[:, :width * 2] = gray16.view(np.uint8).reshape(height, width * 2)
    bayer = np.full((height, width), 200, np.uint8)           # a uniform Bayer mosaic stays uniform
    path = tmp_path / 'encodings'
    with BagWriter(path) as writer:
        build = TypestoreMessages(writer.typestore)
        for topic in ('/mono16', '/bayer', '/yuv'):
            writer.add_topic(topic, 'sensor_msgs/msg/Image')
        writer.add_topic('/instruction', 'std_msgs/msg/String')
        writer.write('/instruction', 1, build.string('push the cube'))
        ns = 10**9
        writer.write('/mono16', ns, raw_image(build, 'mono16', height, width, padded, width * 2 + 6, ns))
        writer.write('/bayer', ns, raw_image(build, 'bayer_rggb8', height, width, bayer, width, ns))
        yuv = np.tile(np.array([128, 90, 128, 90], np.uint8), height * width // 2)   # UYVY, U=V=128: gray
        writer.write('/yuv', ns, raw_image(build, 'yuv422', height, width, yuv, width * 2, ns))
    streams = load_streams(path, StreamTopics(cameras={'a': '/mono16', 'b': '/bayer', 'c': '/yuv'}, ee_pose='',
                                              gripper_state='', commands='', gripper_command='', chunks=''),
                           image_size=None)
    images = streams.observations[0].images
    assert images['a'].shape == (height, width, 3) and images['a'].dtype == np.uint8
    assert np.all(np.abs(images['a'][..., 0] - gray16 / 257.0) <= 1)   # 16 bits scaled to 8 (padding dropped)
    assert np.array_equal(images['a'][..., 0], images['a'][..., 2])
    assert images['b'].shape == (height, width, 3) and np.all(np.abs(images['b'].astype(int) - 200) <= 1)
    yuv_rgb = images['c'].astype(int)     # uniform gray near Y = 90 (video-range scaling moves it a little)
    assert yuv_rgb.shape == (height, width, 3) and np.ptp(yuv_rgb) <= 1 and abs(yuv_rgb.mean() - 90) <= 6
    truncated = tmp_path / 'truncated'
    with BagWriter(truncated) as writer:
        build = TypestoreMessages(writer.typestore)
        writer.add_topic('/mono16', 'sensor_msgs/msg/Image')
        writer.add_topic('/instruction', 'std_msgs/msg/String')
        writer.write('/instruction', 1, build.string('push the cube'))
        writer.write('/mono16', 10**9, raw_image(build, 'mono16', height, width, gray16[:4], width * 2, 10**9))
    with pytest.raises(BagError, match=r"camera 'a' .* mono16 8x8: data holds 64 bytes with step 16"):
        load_streams(truncated, StreamTopics(cameras={'a': '/mono16'}, ee_pose='', gripper_state='', commands='',
                                             gripper_command='', chunks=''))


WRITE_UNTIL_THE_DISK_IS_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))    # writes past 1 MiB fail, as on a full disk
from specprune_ros.bags.io import BagWriter
from specprune_ros.bags.typestore_messages import TypestoreMessages
writer = BagWriter(sys.argv[1], storage='sqlite3')
writer.open()
writer.add_topic('/blob', 'std_msgs/msg/String')
text = TypestoreMessages(writer.typestore).string('x' * 4000)
try:
    for i in range(1000):
        writer.write('/blob', 10**9 + i * 10**6, text)
except Exception as error:
    print('write failed:', type(error).__name__)
writer.close()
print('counts:', writer.counts['/blob'])
"""


def test_a_sqlite3_bag_whose_writes_fail_keeps_what_was_committed_with_matching_metadata(tmp_path):
    """A full disk mid-recording: the committed messages stay readable and metadata.yaml counts exactly those."""
    path = tmp_path / 'full'
    done = subprocess.run([sys.executable, '-c', WRITE_UNTIL_THE_DISK_IS_FULL, str(path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and 'write failed' in done.stdout, done.stdout + done.stderr
    with BagReader(path) as bag:
        counted = bag.topics()['/blob'].count
        readable = len(list(bag.raw_messages()))
    assert counted == readable and 100 <= readable < 1000, (counted, readable)
    assert f'counts: {readable}' in done.stdout


WRITE_THEN_DIE = """
import os, sys
from specprune_ros.bags.io import BagWriter
from specprune_ros.bags.typestore_messages import TypestoreMessages
writer = BagWriter(sys.argv[1], storage='sqlite3')
writer.open()
writer.add_topic('/blob', 'std_msgs/msg/String')
text = TypestoreMessages(writer.typestore).string('x' * 1000)
for i in range(250):
    writer.write('/blob', 10**9 + i * 10**6, text)
os._exit(0)                       # killed: close() never runs
"""


def test_a_killed_sqlite3_recording_keeps_the_committed_messages(tmp_path):
    import sqlite3
    path = tmp_path / 'killed'
    done = subprocess.run([sys.executable, '-c', WRITE_THEN_DIE, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    database = sqlite3.connect(path / 'killed.db3')
    try:
        rows = database.execute('SELECT COUNT(*) FROM messages').fetchone()[0]
    finally:
        database.close()
    assert 200 <= rows <= 250, rows       # committed every 100 messages at least; the rest was in flight


def test_opencv_style_colour_encodings_keep_bgr_order_and_float_frames_are_refused(tmp_path):
    """16UC3/16UC4 frames are BGR(A) like 8UC3; a 32FC3 frame has no colour scale and is counted as unusable."""
    height, width = 4, 6
    blue = {'8UC3': np.array([255, 0, 0], np.uint8), '16UC3': np.array([65535, 0, 0], '<u2'),
            '16UC4': np.array([65535, 0, 0, 65535], '<u2'), '32FC3': np.array([1.0, 0.2, 0.5], '<f4')}
    path = tmp_path / 'generic'
    with BagWriter(path) as writer:
        build = TypestoreMessages(writer.typestore)
        writer.add_topic('/cam', 'sensor_msgs/msg/Image')
        writer.add_topic('/instruction', 'std_msgs/msg/String')
        writer.write('/instruction', 1, build.string('push the cube'))
        for k, (encoding, pixel) in enumerate(blue.items()):
            ns = 10**9 + k * 10**8
            frame = np.tile(pixel, (height, width, 1))
            writer.write('/cam', ns, raw_image(build, encoding, height, width, frame, width * pixel.nbytes, ns))
    streams = load_streams(path, StreamTopics(cameras={'a': '/cam'}, ee_pose='', gripper_state='', commands='',
                                              gripper_command='', chunks=''), image_size=None)
    assert len(streams.observations) == 3, streams.notes
    for observation in streams.observations:
        assert np.array_equal(observation.images['a'].reshape(-1, 3), np.tile([0, 0, 255], (height * width, 1)))
    assert any(re.search(r"1 unusable frames on /cam skipped .*unsupported encoding '32FC3'", note)
               for note in streams.notes), streams.notes


def test_a_compressed_frame_of_too_many_pixels_is_refused_before_decoding(tmp_path):
    """A 200 kB PNG of 8192 x 8192 pixels is counted as unusable (image_size); a normal frame next to it is used."""
    import cv2
    huge = cv2.imencode('.png', np.zeros((8192, 8192), np.uint8))[1].tobytes()
    small = cv2.imencode('.png', np.full((48, 64, 3), 200, np.uint8))[1].tobytes()
    path = tmp_path / 'huge'
    with BagWriter(path) as writer:
        build = TypestoreMessages(writer.typestore)
        writer.add_topic('/cam/compressed', 'sensor_msgs/msg/CompressedImage')
        writer.add_topic('/instruction', 'std_msgs/msg/String')
        writer.write('/instruction', 1, build.string('push the cube'))
        for k, data in enumerate((huge, small)):
            ns = 10**9 + k * 10**8
            writer.write('/cam/compressed', ns, build.types['sensor_msgs/msg/CompressedImage'](
                header=build.header(ns, 'camera'), format='png', data=np.frombuffer(data, np.uint8).copy()))
    streams = load_streams(path, StreamTopics(cameras={'a': '/cam/compressed'}, ee_pose='', gripper_state='',
                                              commands='', gripper_command='', chunks=''), image_size=None)
    assert len(streams.observations) == 1 and streams.observations[0].images['a'].shape == (48, 64, 3)
    assert any(re.search(r'1 unusable frames on /cam/compressed skipped .*image 8192x8192 has 67108864 pixels', note)
               for note in streams.notes), streams.notes
