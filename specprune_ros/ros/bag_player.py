r"""Publish a bag's messages onto their topics with the original timing, like ``ros2 bag play``.

``ros2 bag play`` is not installable here; on a robot ``ros2 bag play --clock`` drives the node the same way.

    python -m specprune_ros.ros.bag_player outputs/bags/run1 --clock --rate 1.0
    python -m specprune_ros.ros.bag_player run1 --topics /camera/agentview/image_raw /camera/wrist/image_raw \
        /instruction /ee_pose /gripper_state --remap /camera/wrist/image_raw:=/cam_wrist/image_raw --loop

Messages go out as the recorded CDR bytes (no deserialization), in bag-time order, at ``start + (t - t0) / rate``
of wall-clock time, where ``t0`` is the first message of the replayed topics (``--start-offset`` skips the first
seconds after it, but the newest message of each latched topic from before the offset, such as the instruction,
goes out first; ``--progress`` shows the replayed bag time, its total and the time left). With ``--loop`` a pass
starts at most once every ``max(replayed span, 0.1 s) / rate``, so a one-message bag repeats at 10 Hz instead of
as fast as the CPU allows. ``--clock`` publishes ``/clock`` from bag time (at ``--clock-rate`` Hz and right before
each message, only right before each message with ``--clock-rate 0``; a recorded /clock topic is then not
replayed): run the consumer with ``use_sim_time:=true`` so header stamps and its clock agree. Each
topic's publisher QoS is the recorded offered QoS (reliable unless every recorded publisher was best effort;
transient local when one was: latched topics such as the instruction stay latched), so every usual subscriber
matches.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import rclpy
from builtin_interfaces.msg import Time
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rosgraph_msgs.msg import Clock

from specprune_ros.bags.io import BagError, BagReader, normalize_topic, qos_summary
from specprune_ros.command_line import HelpFormatter, bounded
from specprune_ros.ros.ros_helpers import MessageTypeError, message_class

MIN_PASS_S = 0.1           # with loop: bag time one pass takes at least (a one-message bag repeats at 10 Hz)


@dataclass
class PlayOptions:
    topics: Sequence[str] = ()                  # empty: every topic
    exclude_topics: Sequence[str] = ()          # left out (e.g. the recorded commands, so no robot is driven)
    rate: float = 1.0
    loop: bool = False
    start_offset_s: float = 0.0
    remap: dict = field(default_factory=dict)   # recorded topic -> published topic
    clock: bool = False
    clock_rate_hz: float = 100.0
    wait_for_subscribers_s: float = 0.0         # wait until every topic has a subscriber (or this long)
    clock_subscribers: int = 0                  # with clock: ... and /clock has this many (node, sim-time recorder)
    skip_unknown: bool = False                  # skip topics whose type is not installed (else: error)
    progress: bool = False


def parse_remap(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        source, sep, target = item.partition(':=')
        if not sep or not source or not target:
            raise ValueError(f'remap must be /old:=/new, got {item!r}')
        out[normalize_topic(source)] = normalize_topic(target)
    return out


class BagPlayer(Node):
    """Publishers for a bag's topics; ``play`` replays it (blocking) until done or ``stop_event``."""

    def __init__(self, bag: str | Path, options: PlayOptions = PlayOptions(), node_name: str = 'bag_player',
                 context: Optional[rclpy.Context] = None) -> None:
        super().__init__(node_name, context=context)
        self.bag_path = Path(bag)
        self.options = options
        self.stop_event = threading.Event()
        self.published = 0
        self.publishers_by_topic: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        with BagReader(self.bag_path) as reader:
            infos = reader.topics()
        selected = [normalize_topic(t) for t in options.topics] if options.topics else sorted(infos)
        excluded = [normalize_topic(t) for t in options.exclude_topics]
        missing = [t for t in selected + excluded if t not in infos]
        if missing:
            raise BagError(f'bag {self.bag_path}: no topic {", ".join(missing)}; it has {", ".join(sorted(infos))}')
        selected = [t for t in selected if t not in excluded]
        unknown = sorted(set(options.remap) - set(selected))
        if unknown:
            raise BagError(f'bag {self.bag_path}: cannot remap {", ".join(unknown)}: not a replayed topic; '
                           f'replayed: {", ".join(selected)}')
        if options.clock and '/clock' in selected:
            selected.remove('/clock')          # replaced by the generated clock
        for topic in selected:
            info = infos[topic]
            try:
                cls = message_class(info.msgtype)
            except MessageTypeError as error:
                if options.skip_unknown:
                    self.skipped[topic] = str(error)
                    continue
                raise BagError(f'bag {self.bag_path}: cannot replay {topic}: {error}') from None
            reliable, latched = qos_summary(info.offered_qos)
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1 if latched else 10,
                             reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            target = options.remap.get(topic, topic)
            self.publishers_by_topic[topic] = self.create_publisher(cls, target, qos)
        if not self.publishers_by_topic:
            raise BagError(f'bag {self.bag_path}: nothing to replay')
        self.first_ns, self.last_ns = self._span(list(self.publishers_by_topic))
        self.duration_ns = self.last_ns - self.first_ns
        if options.start_offset_s < 0 or options.start_offset_s * 1e9 > self.duration_ns:
            raise BagError(f'bag {self.bag_path}: start offset {options.start_offset_s:g} s is outside the replayed '
                           f'topics, which span 0 to {self.duration_ns * 1e-9:.3f} s')
        self.clock_pub = self.create_publisher(Clock, '/clock', 10) if options.clock else None

    def _span(self, topics: list[str]) -> tuple[int, int]:
        """Bag time of the first message on ``topics``, and the bag's end (the replay's end at the latest)."""
        with BagReader(self.bag_path) as reader:
            first = next((t for _, _, t, _ in reader.raw_messages(topics)), reader.start_time)   # none: nothing
            return first, max(reader.end_time, first)

    def _publish_clock(self, ns: int) -> None:
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=Time(sec=int(ns) // 1_000_000_000, nanosec=int(ns) % 1_000_000_000)))

    def wait_for_subscribers(self) -> list[str]:
        """Topics still without a subscriber after ``wait_for_subscribers_s``.

        With ``clock``, /clock counts as lonely until ``clock_subscribers`` subscribe to it: a consumer that joins
        the graph late (a recorder on sim time) would otherwise miss every /clock of a short replay.
        """
        deadline = time.monotonic() + self.options.wait_for_subscribers_s
        while True:
            lonely = [t for t, p in self.publishers_by_topic.items() if self.count_subscribers(p.topic_name) == 0]
            if self.clock_pub is not None and self.count_subscribers('/clock') < self.options.clock_subscribers:
                lonely.append('/clock')
            if not lonely or time.monotonic() >= deadline or self.stop_event.is_set():
                return lonely
            time.sleep(0.1)

    def play(self) -> int:
        """Replay once (or until stopped with ``loop``); returns the messages published."""
        options = self.options
        if options.rate <= 0:
            raise ValueError('rate must be > 0')
        if options.wait_for_subscribers_s > 0:
            lonely = self.wait_for_subscribers()
            if lonely:
                self.get_logger().warning(f'no subscriber on {", ".join(lonely)}: replaying anyway')
        while not self.stop_event.is_set():
            started = time.monotonic()
            self._play_once()
            if not options.loop:
                break
            self._pace_pass(started)
        for publisher in self.publishers_by_topic.values():   # reliable messages still in flight
            if publisher.qos_profile.reliability == ReliabilityPolicy.RELIABLE:
                publisher.wait_for_all_acked(Duration(seconds=1.0))
        return self.published

    def _pace_pass(self, started: float) -> None:
        """Wait until a pass that began at ``started`` has taken ``max(its bag time, MIN_PASS_S) / rate``.

        A pass with no time between its messages (one message, one timestamp, an offset at the end) would
        otherwise repeat at once, publishing as fast as the CPU allows.
        """
        span_s = max((self.duration_ns - self.options.start_offset_s * 1e9) * 1e-9, MIN_PASS_S)
        self.stop_event.wait(max(started + span_s / self.options.rate - time.monotonic(), 0.0))

    def _play_once(self) -> None:
        from tqdm import tqdm
        options = self.options
        with BagReader(self.bag_path) as reader:
            first = self.first_ns + int(options.start_offset_s * 1e9)
            clock_period = 1.0 / options.clock_rate_hz if options.clock_rate_hz > 0 else None
            wall0 = time.monotonic()
            total_s = max(self.last_ns - first, 0) * 1e-9
            bar = tqdm(total=round(total_s, 1), desc=f'replay {self.bag_path.name}', disable=not options.progress,
                       bar_format='{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of bag time '
                                  '[{elapsed} elapsed, {remaining} left{postfix}]')

            def bag_now() -> int:
                return first + int((time.monotonic() - wall0) * options.rate * 1e9)

            latched = self._latched_before(reader, first)
            if latched:
                self._publish_clock(first)
            for topic, raw in latched:
                self.publishers_by_topic[topic].publish(bytes(raw))
                self.published += 1

            for topic, _, timestamp, raw in reader.raw_messages(self.publishers_by_topic, start_ns=first):
                if self.stop_event.is_set():
                    break
                target = wall0 + (timestamp - first) * 1e-9 / options.rate
                while True:
                    remaining = target - time.monotonic()
                    if remaining <= 0 or self.stop_event.is_set():
                        break
                    if clock_period is not None and self.clock_pub is not None:
                        self._publish_clock(min(bag_now(), timestamp))
                        time.sleep(min(clock_period, remaining))
                    else:
                        time.sleep(min(remaining, 0.05))
                self._publish_clock(timestamp)
                self.publishers_by_topic[topic].publish(bytes(raw))
                self.published += 1
                bar.update(round((timestamp - first) * 1e-9, 1) - bar.n)
                bar.set_postfix_str(f'{self.published} messages', refresh=False)
            bar.close()

    def _latched_before(self, reader: BagReader, first: int) -> list[tuple[str, Any]]:
        """The newest message of each transient-local topic recorded before bag time ``first``."""
        latched = [topic for topic, publisher in self.publishers_by_topic.items()
                   if publisher.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL]
        newest: dict[str, Any] = {}
        if latched and first > self.first_ns:
            for topic, _, timestamp, raw in reader.raw_messages(latched):
                if timestamp >= first:
                    break
                newest[topic] = raw
        return list(newest.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('bag', type=Path, help='bag directory')
    parser.add_argument('--topics', nargs='+', default=[], help='replay only these topics')
    parser.add_argument('--exclude-topics', nargs='+', default=[],
                        help="leave these out, e.g. the recorded commands ('/delta_twist_cmds /gripper_command')")
    parser.add_argument('-r', '--rate', type=bounded(float, 0, inclusive=False), default=1.0,
                        help='playback speed factor')
    parser.add_argument('-l', '--loop', action='store_true', help='replay again and again until interrupted')
    parser.add_argument('--start-offset', type=bounded(float, 0), default=0.0,
                        help='skip the first seconds of the replayed topics (at most their span)')
    parser.add_argument('--remap', nargs='+', default=[], metavar='OLD:=NEW', help='publish a topic under another name')
    parser.add_argument('--clock', action='store_true', help='publish /clock from bag time')
    parser.add_argument('--clock-rate', type=bounded(float, 0), default=100.0,
                        help='/clock rate between messages (Hz); 0: /clock only right before each message')
    parser.add_argument('--wait-for-subscribers', type=float, default=0.0, metavar='SECONDS',
                        help='before playing, wait up to this long for a subscriber on every topic')
    parser.add_argument('--clock-subscribers', type=int, default=0, metavar='N',
                        help='with --clock and --wait-for-subscribers: also wait for N subscribers on /clock (the '
                             'node and, e.g., a recorder on sim time)')
    parser.add_argument('--skip-unknown', action='store_true', help='skip topics whose message type is not installed')
    parser.add_argument('--progress', action='store_true',
                        help='show the replayed bag time, its total and the time left')
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = PlayOptions(topics=args.topics, exclude_topics=args.exclude_topics, rate=args.rate, loop=args.loop,
                              start_offset_s=args.start_offset,
                              remap=parse_remap(args.remap), clock=args.clock, clock_rate_hz=args.clock_rate,
                              wait_for_subscribers_s=args.wait_for_subscribers,
                              clock_subscribers=args.clock_subscribers, skip_unknown=args.skip_unknown,
                              progress=args.progress)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    code = 0
    player = None
    try:
        player = BagPlayer(args.bag, options)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: player.stop_event.set())
        for topic, reason in player.skipped.items():
            print(f'skipping {topic}: {reason}', file=sys.stderr)
        count = player.play()
        print(f'published {count} messages from {args.bag}')
    except (BagError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        code = 2
    finally:
        if player is not None:
            player.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == '__main__':
    sys.exit(main())
