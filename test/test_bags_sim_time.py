"""Recording on sim time and replaying part of a bag, through real DDS (ROS_DOMAIN_ID 90).

A recorder started before the simulator's first /clock, and a replay of topics that start late in the bag.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels')

from specprune_ros.bags.io import BagReader, BagWriter  # noqa: E402
from specprune_ros.bags.typestore_messages import TypestoreMessages  # noqa: E402
from specprune_ros.ros.sim_runner import child_environment  # noqa: E402

DOMAIN = 90
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
SIM_START_S = 172_800          # the simulator's clock starts two days in (wall seconds modulo 10^6 do that)

PUBLISH_BEFORE_AND_AFTER_CLOCK = f"""
import time, rclpy
from builtin_interfaces.msg import Time
from rosgraph_msgs.msg import Clock
from std_msgs.msg import String
rclpy.init()
node = rclpy.create_node('sim_like_publisher')
early, clock = node.create_publisher(String, '/early', 10), node.create_publisher(Clock, '/clock', 10)
deadline = time.monotonic() + 60
while (early.get_subscription_count() < 1 or clock.get_subscription_count() < 2) and time.monotonic() < deadline:
    time.sleep(0.05)    # the recorder's /early and /clock subscriptions, and its time source's /clock
time.sleep(0.5)
for i in range(3):      # before the simulator runs: no /clock yet
    early.publish(String(data=f'before{{i}}'))
    time.sleep(0.05)
time.sleep(0.5)
for i in range(10):
    clock.publish(Clock(clock=Time(sec={SIM_START_S} + i // 10, nanosec=(i % 10) * 100_000_000)))
    time.sleep(0.05)
    early.publish(String(data=f'after{{i}}'))
    time.sleep(0.05)
time.sleep(0.5)
"""


def test_recording_on_sim_time_started_before_the_clock_keeps_the_bag_on_sim_time(tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from specprune_ros.ros.bag_recorder import BagRecorder
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    recorder = BagRecorder(tmp_path / 'sim', all_topics=True, use_sim_time=True, storage='mcap', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(recorder)
    publisher = subprocess.Popen([sys.executable, '-c', PUBLISH_BEFORE_AND_AFTER_CLOCK],
                                 env=child_environment(DOMAIN), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        deadline = time.monotonic() + 90
        while publisher.poll() is None and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(20):
            executor.spin_once(timeout_sec=0.05)
    finally:
        if publisher.poll() is None:
            publisher.kill()
        output = publisher.communicate()[0]
        counts = recorder.close()
        dropped = recorder.dropped_before_clock
        executor.shutdown(timeout_sec=1.0)
        recorder.destroy_node()
        rclpy.try_shutdown(context=context)
    assert publisher.returncode == 0, output
    assert counts.get('/early') == 11 and counts.get('/clock', 0) >= 9, counts
    assert dropped == 2      # before0 and before1: only the newest message before the clock is kept
    with BagReader(tmp_path / 'sim') as bag:
        rows = [(t, bag.deserialize(raw, msgtype).data) for _, msgtype, t, raw in bag.raw_messages(['/early'])]
        start, end = bag.start_time, bag.end_time
    assert start >= SIM_START_S * 10**9 and (end - start) * 1e-9 < 2.0, (start, end)
    assert [text for _, text in rows] == ['before2'] + [f'after{i}' for i in range(10)]
    assert rows[0][0] <= rows[1][0] < (SIM_START_S + 1) * 10**9


def test_replay_of_late_topics_starts_at_their_first_message_and_shows_progress(tmp_path):
    """A bag whose selected topic begins 30 s after its first message: the replay must not wait those 30 s."""
    path = tmp_path / 'late'
    with BagWriter(path, storage='sqlite3') as writer:
        make = TypestoreMessages(writer.typestore)
        writer.add_topic('/early', 'std_msgs/msg/String')
        writer.add_topic('/late', 'std_msgs/msg/String')
        base = 100 * 10**9
        for i in range(3):
            writer.write('/early', base + i * 10**8, make.string(f'early{i}'))
        for i in range(5):
            writer.write('/late', base + 30 * 10**9 + i * 10**8, make.string(f'late{i}'))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'replay_bag.py'), str(path), '--topics', '/late',
                           '--progress'], env=child_environment(DOMAIN), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0 and 'published 5 messages' in done.stdout, done.stdout + done.stderr
    assert elapsed < 25, elapsed      # 0.4 s of replay; starting at the bag's first message would take 30 s more
    assert '100%' in done.stderr and '0.4/0.4 s of bag time' in done.stderr and 'left' in done.stderr, done.stderr
