"""Record topics of a live ROS 2 system into a rosbag2, like ``ros2 bag record`` (not installable here).

MCAP by default, sqlite3 on request, with ``rosbags`` as the writer.

    python -m specprune_ros.ros.bag_recorder outputs/bags/run1 --topics /camera/agentview/image_raw /instruction
    python -m specprune_ros.ros.bag_recorder outputs/bags/run1 --all --storage sqlite3 --use-sim-time

Topics are discovered as they appear (every 0.2 s) and subscribed to as serialized messages (``raw=True``),
so nothing is deserialized; the CDR goes straight into the bag with the type's definition from the ROS 2
typestore, which makes the bag readable by rosbag2 and ``rosbags`` alike. The subscription QoS adapts to the
publishers (best effort if any publisher is, transient local if all are: latched messages get recorded; a
publisher joining later with a weaker QoS makes the recorder subscribe again to match it), and the first
publishers' QoS is stored as the topic's offered QoS (the replayer reuses it). Bag time is when the
middleware received the message (wall clock, as rosbag2's receive timestamp), so messages on different topics
keep their arrival order however late the recorder's executor gets to them; with ``--use-sim-time`` it is the
sim clock at the callback (what replaying with ``--clock`` needs). A recorder started before the simulator
holds what arrives before the first ``/clock`` (sim time 0): the newest message of each topic (a latched
instruction, the last frame) is written with the first clock time, older ones are dropped and counted, so the
bag never spans from time 0 to the sim clock.

Received messages wait for the writer thread in a queue bounded in messages and in bytes (``--max-queue-mb``);
beyond it they are dropped and counted. On a stop the queue is written out however long that takes (a second
interrupt drops it and closes the bag with what was written, and the exit status is 1). sqlite3 bags are committed
every 100 messages or every second, so a killed recorder leaves the committed messages in the database
(``ros2 bag reindex`` rebuilds the missing metadata.yaml).
"""
from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import rclpy
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rosgraph_msgs.msg import Clock

from specprune_ros.bags.io import BagError, BagWriter, make_qos
from specprune_ros.command_line import HelpFormatter, bounded
from specprune_ros.ros.ros_helpers import BackgroundExecutor, MessageTypeError, message_class

HIDDEN = ('/rosout', '/parameter_events')
QUEUE_LIMIT = 10_000                      # messages waiting for the writer; more are dropped and counted
QUEUE_MB = 512                            # ... and their bytes: a few thousand camera frames are gigabytes
BACKLOG_LOG_S = 5.0                       # while closing, how often the messages still to write are logged
ABANDONED_WRITER_S = 30.0                 # after a second interrupt, how long a writer stuck in a write may take


def subscription_qos(publisher_profiles: Sequence[Any], depth: int = 100) -> QoSProfile:
    """The QoS that matches every publisher (see the module docstring)."""
    reliable = bool(publisher_profiles) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in publisher_profiles)
    latched = bool(publisher_profiles) and all(p.durability == DurabilityPolicy.TRANSIENT_LOCAL
                                               for p in publisher_profiles)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def offered_qos(publisher_profiles: Sequence[Any]) -> list:
    """The publishers' QoS in the bag's (rosbags) representation."""
    out = []
    for p in publisher_profiles:
        out.append(make_qos(reliable=p.reliability == ReliabilityPolicy.RELIABLE,
                            transient_local=p.durability == DurabilityPolicy.TRANSIENT_LOCAL,
                            depth=max(int(p.depth), 1)))
    return out


class BagRecorder(Node):
    """Records ``topics`` (or every topic with ``all_topics``) until ``stop``."""

    def __init__(self, output: str | Path, topics: Sequence[str] = (), storage: str = 'mcap',
                 all_topics: bool = False, use_sim_time: bool = False, node_name: str = 'bag_recorder',
                 context: Optional[rclpy.Context] = None, max_messages: int = 0,
                 max_queue_bytes: int = QUEUE_MB << 20) -> None:
        overrides = [Parameter('use_sim_time', value=True)] if use_sim_time else []
        super().__init__(node_name, parameter_overrides=overrides, context=context)
        self.wanted = {t if t.startswith('/') else '/' + t for t in topics}
        self.all_topics, self.use_sim_time = all_topics, use_sim_time
        if not self.wanted and not all_topics:
            raise ValueError('name the topics to record, or record all of them')
        self.writer = BagWriter(output, storage=storage)
        # bounded in messages and bytes: a stalled writer cannot eat memory
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        self.max_queue_bytes = max_queue_bytes
        self.queued_bytes = 0                 # data of the messages handed to the writer and not yet written
        self._queue_lock = threading.Lock()
        self.max_messages = max_messages      # 0: no limit; messages beyond it are not taken
        self.accepted = 0
        self.write_error = ''                 # why writing stopped (a full disk, ...): the recording failed
        self.dropped_queue_full = 0
        self.dropped_backlog = 0              # queued messages given up on a second interrupt
        self._give_up = threading.Event()
        self.subscriptions_by_topic: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.messages = 0
        self.before_clock: dict[str, bytes] = {}   # use_sim_time: newest message per topic before the first /clock
        self.dropped_before_clock = 0
        self._clock_lock = threading.Lock()
        self._sim_clock_ns = 0   # use_sim_time: the newest /clock, read by the recorder's own subscription
        self._last_stamp_ns = -1_000_000_000_000   # use_sim_time: the bag time given last (arrival order)
        if use_sim_time:
            # bag time from /clock as it arrives here, whatever the node's time source does with it
            self.create_subscription(Clock, '/clock', self._on_clock,
                                     QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT))
        self.stop_event = threading.Event()
        # sqlite3 objects only work in the thread that made them: the writer thread opens, writes and closes
        self._opened = threading.Event()
        self._open_error: Optional[BaseException] = None
        self._writer_thread = threading.Thread(target=self._write_loop, name='bag-writer', daemon=True)
        self._writer_thread.start()
        self._opened.wait(30.0)
        if self._open_error is not None:
            raise BagError(f'cannot create the bag {output}: {self._open_error}')
        self._discovery_thread = threading.Thread(target=self._discovery_loop, name='bag-discovery', daemon=True)
        self._discovery_thread.start()

    # --- discovery (own thread: works whatever the clock does) ------------------------------------------------
    def _discovery_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.discover()
            except Exception as error:  # the context went away under us
                if not self.stop_event.is_set():
                    self.get_logger().warning(f'discovery failed: {error}')
            self.stop_event.wait(0.2)

    def discover(self) -> None:
        for topic, types in self.get_topic_names_and_types():
            if topic in self.subscriptions_by_topic:
                self._follow_publishers(topic, types[0])
                continue
            if topic in self.skipped:
                continue
            if not (topic in self.wanted or (self.all_topics and topic not in HIDDEN)):
                continue
            publishers = self.get_publishers_info_by_topic(topic)
            if not publishers:
                continue   # only subscribers so far: wait for a publisher to learn its QoS
            msgtype = types[0]
            try:
                cls = message_class(msgtype)
            except MessageTypeError as error:
                self.skipped[topic] = str(error)
                self.get_logger().error(f'not recording {topic}: {error}')
                continue
            profiles = [p.qos_profile for p in publishers]
            try:
                self.queue.put(('topic', topic, msgtype, offered_qos(profiles)))
            except BagError as error:
                self.skipped[topic] = str(error)
                continue
            self.subscriptions_by_topic[topic] = self._subscribe(cls, topic, subscription_qos(profiles))
            self.get_logger().info(f'recording {topic} ({msgtype})')

    def _subscribe(self, cls: Any, topic: str, qos: QoSProfile) -> Any:
        return self.create_subscription(cls, topic, lambda data, info, name=topic: self._on_message(name, data, info),
                                        qos, raw=True)

    def _follow_publishers(self, topic: str, msgtype: str) -> None:
        """Subscribe again, with the weaker QoS, when a publisher joins that the subscription cannot match.

        A best-effort publisher next to a reliable one, or a volatile one next to a latched one (an operator's
        instruction after the launch file's), would otherwise never be heard. QoS is never raised again (that
        could deliver latched messages twice). A topic whose publishers all left keeps its subscription: a
        restarted latched publisher is then matched as before.
        """
        publishers = self.get_publishers_info_by_topic(topic)
        if not publishers:
            return
        current = self.subscriptions_by_topic[topic].qos_profile
        needed = subscription_qos([p.qos_profile for p in publishers])
        best_effort = ReliabilityPolicy.BEST_EFFORT in (needed.reliability, current.reliability)
        volatile = DurabilityPolicy.VOLATILE in (needed.durability, current.durability)
        if best_effort == (current.reliability == ReliabilityPolicy.BEST_EFFORT) \
                and volatile == (current.durability == DurabilityPolicy.VOLATILE):
            return
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=current.depth,
                         reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE if volatile else DurabilityPolicy.TRANSIENT_LOCAL)
        self.destroy_subscription(self.subscriptions_by_topic[topic])
        self.subscriptions_by_topic[topic] = self._subscribe(message_class(msgtype), topic, qos)
        weaker = [name for name, lower in (('best effort', needed.reliability == ReliabilityPolicy.BEST_EFFORT),
                                           ('volatile', needed.durability == DurabilityPolicy.VOLATILE)) if lower]
        self.get_logger().warning(f'{topic}: a publisher offers only {" and ".join(weaker)}: subscribed again as '
                                  f'{"best effort" if best_effort else "reliable"}, '
                                  f'{"volatile" if volatile else "transient local"} to hear every publisher')

    def _on_message(self, topic: str, data: bytes, info: dict) -> None:
        if not self.use_sim_time:
            received = info.get('received_timestamp')
            self._enqueue(topic, received or self.get_clock().now().nanoseconds, data)
            return
        with self._clock_lock:
            now = self._sim_clock_ns or self.get_clock().now().nanoseconds
            if now == 0:                  # no /clock yet: hold the newest message of the topic
                self.dropped_before_clock += topic in self.before_clock
                self.before_clock[topic] = data
                return
            if self.before_clock:
                self.get_logger().info(f'first /clock: {len(self.before_clock)} messages received before it are '
                                       f'stamped with it ({self.dropped_before_clock} older ones dropped)')
                for held_topic, held in self.before_clock.items():
                    self._enqueue(held_topic, self._arrival_stamp(now), held)
                self.before_clock = {}
            self._enqueue(topic, self._arrival_stamp(now), data)

    def _enqueue(self, topic: str, timestamp: int, data: bytes) -> None:
        """Hand a message to the writer thread; dropped and counted when it cannot keep up (or has stopped).

        With ``max_messages``, the message that reaches it stops the recording and later ones are not taken, so
        the bag holds exactly that many.
        """
        if self.write_error:
            return
        with self._queue_lock:
            if self.max_messages and self.accepted >= self.max_messages:
                return
            if self.queued_bytes + len(data) > self.max_queue_bytes:
                self.dropped_queue_full += 1
                return
            try:
                self.queue.put_nowait(('message', topic, timestamp, data))
            except queue.Full:
                self.dropped_queue_full += 1
                return
            self.queued_bytes += len(data)
            self.accepted += 1
            if self.max_messages and self.accepted >= self.max_messages:
                self.stop_event.set()

    def _arrival_stamp(self, sim_ns: int) -> int:
        """Bag time of a message arriving at sim time ``sim_ns``: later arrivals never get an earlier time.

        Sim time moves in steps, so messages of one step share it; 1 ns apart in arrival order, a reader can
        still tell what came first (a gripper command from the twist of the next step). A clock that jumps back
        by more than a second (a new simulation) is followed.
        """
        if self._last_stamp_ns - 1_000_000_000 <= sim_ns <= self._last_stamp_ns:
            sim_ns = self._last_stamp_ns + 1
        self._last_stamp_ns = sim_ns
        return sim_ns

    def _on_clock(self, message: Clock) -> None:
        with self._clock_lock:
            self._sim_clock_ns = message.clock.sec * 1_000_000_000 + message.clock.nanosec

    # --- writing (own thread) ---------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        try:
            self.writer.open()
        except Exception as error:
            self._open_error = error
            self._opened.set()
            return
        self._opened.set()
        try:
            self._drain()
        finally:
            try:
                self.writer.close()
            except Exception as error:   # the storage failed: the bag may lack its metadata
                self._fail(f'closing the bag failed ({type(error).__name__}: {error})')

    def _drain(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            kind, topic, *rest = item
            try:
                if kind == 'topic':
                    msgtype, qos = rest
                    self.writer.add_topic(topic, msgtype, qos=qos)
                else:
                    timestamp, data = rest
                    try:
                        if self.writer.has_topic(topic):
                            self.writer.write_raw(topic, timestamp, data)
                            self.messages += 1
                    finally:
                        with self._queue_lock:
                            self.queued_bytes -= len(data)
            except BagError as error:
                self.skipped[topic] = str(error)
                self.get_logger().error(f'not recording {topic}: {error}')
            except Exception as error:   # OSError (disk full, ...) or a storage error: stop the recording
                self._fail(f'writing {topic} failed ({type(error).__name__}: {error})')
                return

    def _fail(self, reason: str) -> None:
        """The bag cannot be written any more: say so and stop the recording."""
        self.write_error = self.write_error or reason
        self.get_logger().error(f'recording stopped: {reason}')
        self.stop_event.set()

    def missing(self) -> list[str]:
        return sorted(t for t in self.wanted if t not in self.subscriptions_by_topic)

    def interrupt(self) -> None:
        """Stop recording; a second call while closing gives up the messages still waiting to be written."""
        if self.stop_event.is_set():
            self._give_up.set()
        self.stop_event.set()

    def close(self) -> dict[str, int]:
        """Stop subscribing, write what is queued and close the bag; returns messages per topic.

        Waits for the writer however long the backlog takes, logging what is left; after a second ``interrupt``
        the backlog is dropped and the bag closed with what was written (``write_error`` says so). A writer
        that still does not finish leaves ``write_error`` set: the bag is never reported complete while it is
        being written.
        """
        self.stop_event.set()
        self._discovery_thread.join(2.0)
        for subscription in list(self.subscriptions_by_topic.values()):
            try:
                self.destroy_subscription(subscription)
            except Exception:
                pass
        with self._clock_lock:
            if self.before_clock:
                self.dropped_before_clock += len(self.before_clock)
                self.get_logger().warning(f'no /clock ever arrived: {self.dropped_before_clock} messages not recorded '
                                          '(with use_sim_time the bag time comes from /clock)')
                self.before_clock = {}
        if self._writer_thread.is_alive():
            self.queue.put(None)
        self._wait_for_writer()
        return dict(self.writer.counts)

    def _wait_for_writer(self) -> None:
        """Join the writer thread (see ``close``)."""
        logged = time.monotonic()
        while self._writer_thread.is_alive() and not self._give_up.is_set():
            self._writer_thread.join(0.2)    # short: a second interrupt is acted on at once
            if self._writer_thread.is_alive() and time.monotonic() - logged >= BACKLOG_LOG_S:
                logged = time.monotonic()
                self.get_logger().warning(f'writing the bag: {self.accepted - self.messages} messages '
                                          f'({self.queued_bytes / 1e6:.0f} MB) still to write; interrupt again to '
                                          'drop them and close the bag with what was written')
        if not self._writer_thread.is_alive():
            return
        self._drop_backlog()
        self._writer_thread.join(ABANDONED_WRITER_S)
        if self._writer_thread.is_alive():
            self.write_error = (self.write_error or 'the writer did not finish: the bag was not closed and may '
                                'lack its metadata')

    def _drop_backlog(self) -> None:
        """Empty the queue (counted in ``dropped_backlog``) and let the writer close the bag."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] == 'message':
                self.dropped_backlog += 1
                with self._queue_lock:
                    self.queued_bytes -= len(item[3])
        self.queue.put(None)
        self.write_error = self.write_error or (f'interrupted twice while writing: {self.dropped_backlog} received '
                                                'messages were dropped instead of written')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('output', type=Path, help='bag directory to create (must not exist)')
    parser.add_argument('--topics', nargs='+', default=[], help='topics to record')
    parser.add_argument('-a', '--all', action='store_true', help='record every topic (not /rosout, /parameter_events)')
    parser.add_argument('-s', '--storage', choices=('mcap', 'sqlite3'), default='mcap', help='bag storage format')
    parser.add_argument('--use-sim-time', action='store_true',
                        help='bag time from /clock; before the first /clock only the newest message of each topic '
                             'is kept, stamped with that first clock time')
    parser.add_argument('--duration', type=bounded(float, 0), default=0.0,
                        help='stop after this many wall seconds (0: never)')
    parser.add_argument('--max-messages', type=bounded(int, 0), default=0,
                        help='record exactly this many messages, then stop (0: no limit)')
    parser.add_argument('--max-queue-mb', type=bounded(int, 1), default=QUEUE_MB, metavar='MB',
                        help='received messages waiting for the disk may hold this much data; more are dropped '
                             'and counted')
    parser.add_argument('--node-name', default='bag_recorder', help="the recorder's ROS node name")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.topics and not args.all:
        print('error: give --topics ... or --all', file=sys.stderr)
        return 2
    if args.output.exists():
        print(f'error: {args.output} exists already; bags are never overwritten', file=sys.stderr)
        return 2
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        recorder = BagRecorder(args.output, args.topics, args.storage, args.all, args.use_sim_time, args.node_name,
                               max_messages=args.max_messages, max_queue_bytes=args.max_queue_mb << 20)
    except (BagError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: recorder.interrupt())
    spinner = BackgroundExecutor(recorder)
    started = time.monotonic()
    try:
        while not recorder.stop_event.is_set():
            if args.duration and time.monotonic() - started >= args.duration:
                break
            recorder.stop_event.wait(0.1)
    finally:
        spinner.stop()
        counts = recorder.close()
        missing = recorder.missing()
        recorder.destroy_node()
        rclpy.try_shutdown()
    total = sum(counts.values())
    print(f'{"wrote" if recorder.write_error else "recorded"} {total} messages on {len(counts)} topics to '
          f'{args.output}: '
          + ', '.join(f'{t} {n}' for t, n in sorted(counts.items())))
    if missing:
        print(f'never seen (no publisher): {", ".join(missing)}', file=sys.stderr)
    if recorder.dropped_before_clock:
        print(f'{recorder.dropped_before_clock} messages received before the first /clock were not recorded '
              '(the newest of each topic was, stamped with the first clock time)', file=sys.stderr)
    if recorder.dropped_queue_full:
        print(f'{recorder.dropped_queue_full} messages dropped: the writer could not keep up', file=sys.stderr)
    if recorder.write_error:
        print(f'error: the recording failed: {recorder.write_error}. The bag in {args.output} is incomplete: '
              f'{incomplete_bag_hint(args.output, args.storage)}', file=sys.stderr)
        return 1
    return 0


def incomplete_bag_hint(output: Path, storage: str) -> str:
    """What is left of a bag whose recording failed, and how to get at it, for ``storage``."""
    if (output / 'metadata.yaml').is_file():
        if storage == 'sqlite3':
            return 'it holds the messages counted above (those committed before the failure)'
        return 'its metadata counts what was handed to the MCAP writer; the last chunk (up to 1 MiB) may be lost'
    if storage == 'sqlite3':
        return ('metadata.yaml is missing; the database keeps the messages committed before the failure, and '
                f'`ros2 bag reindex {output} sqlite3` rebuilds metadata.yaml for them')
    return ('metadata.yaml is missing; the MCAP file keeps its complete chunks, and '
            f'`ros2 bag reindex {output} mcap` rebuilds metadata.yaml for them')


if __name__ == '__main__':
    sys.exit(main())
