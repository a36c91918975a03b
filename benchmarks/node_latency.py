"""End-to-end latency of specprune_node over DDS, against the model step alone, plus a soak check.

A synthetic camera publishes frames at ``--rate`` Hz (separate process); the node (separate process,
started exactly like the launch file does) runs the policy; this process listens. For every inference:

    e2e       = first command of the chunk received here  -  camera header.stamp of its newest frame
    model     = Policy.predict wall time reported by the node (``~/inference`` model_latency_ms)
    overhead  = e2e - model   (DDS both ways, decoding, resizing, scheduling, publishing; target <= 10 ms median)

The first command of a chunk is the first TwistStamped stamped at or after the chunk's ``accepted_time``
(the node publishes it at once with ``publish_on_new_chunk``). The soak part reports the node's resident
memory (psutil, after warm-up and at the end; target growth < 5 %) and whether latency drifts (a growing
queue would show as rising e2e).

    python benchmarks/node_latency.py --duration 300            # the 5-minute soak
    python benchmarks/node_latency.py --duration 30 --model tiny-random
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import TwistStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy

from specprune_ros.command_line import HelpFormatter
from specprune_ros.core.json_documents import strict_json
from specprune_ros.ros.launch_config import format_value, node_command, node_setup
from specprune_ros.ros.output_messages import values_of

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--duration', type=float, default=300.0, help='measured seconds (after warm-up)')
    parser.add_argument('--warmup', type=float, default=10.0, help='seconds of traffic before measuring')
    parser.add_argument('--rate', type=float, default=30.0, help='camera frames per second')
    parser.add_argument('--size', type=int, default=96, help='camera resolution (square); the node resizes')
    parser.add_argument('--model', default='tiny-random', help="'reference', 'tiny-random' or a checkpoint dir")
    parser.add_argument('--method', default='specprune', help='pruning method of the node')
    parser.add_argument('--method-config', default='', help="YAML mapping; default '{num_layers: 4}' for tiny-random")
    parser.add_argument('--replan-every-steps', type=int, default=1, help='node parameter: infer every N control steps')
    parser.add_argument('--torch-threads', type=int, default=1, help='torch threads of the node')
    parser.add_argument('--domain', type=int, default=97, help='ROS_DOMAIN_ID of this run')
    parser.add_argument('--json', default='', help='also write the results here')
    return parser.parse_args()


def stamp_seconds(text: str) -> float:
    sec, nanosec = text.split('.')
    return int(sec) + int(nanosec) * 1e-9


class Listener:
    """Records commands (receive time, header stamp), inference records and the node's diagnostics."""

    def __init__(self, domain: int) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node('latency_listener', context=self.context)
        self.lock = threading.Lock()
        self.twists: list[tuple[float, float]] = []
        self.inferences: list[tuple[float, dict]] = []
        self.diagnostics: dict[str, str] = {}
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(TwistStamped, 'delta_twist_cmds', self._on_twist, qos)
        self.node.create_subscription(DiagnosticStatus, '/specprune_node/inference', self._on_inference, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:
                break

    def _on_twist(self, message: TwistStamped) -> None:
        received = time.time()
        stamp = message.header.stamp.sec + message.header.stamp.nanosec * 1e-9
        with self.lock:
            self.twists.append((received, stamp))

    def _on_inference(self, message: DiagnosticStatus) -> None:
        with self.lock:
            self.inferences.append((time.time(), values_of(message)))

    def _on_diagnostics(self, message: DiagnosticArray) -> None:
        for status in message.status:
            if status.name == '/specprune_node: policy':
                with self.lock:
                    self.diagnostics = values_of(status)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def process_tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def match(listener: Listener, start: float, end: float) -> list[dict]:
    """One row per inference in [start, end): e2e, model and overhead in ms."""
    with listener.lock:
        twists = sorted(listener.twists, key=lambda item: item[1])
        inferences = [values for t, values in listener.inferences if start <= t < end]
    stamps = np.array([stamp for _, stamp in twists])
    rows = []
    for values in inferences:
        accepted = stamp_seconds(values['accepted_time'])
        index = int(np.searchsorted(stamps, accepted - 1e-6))
        if index >= len(twists):
            continue
        received, published = twists[index]
        source = stamp_seconds(values['source_stamp'])
        e2e = (received - source) * 1e3
        model = float(values['model_latency_ms'])
        before = (stamp_seconds(values['request_time']) - source) * 1e3
        inference = float(values['inference_latency_ms'])
        rows.append({'time': received, 'e2e_ms': e2e, 'model_ms': model, 'overhead_ms': e2e - model,
                     'before_ms': before, 'worker_ms': inference - model, 'after_ms': e2e - before - inference,
                     'dds_out_ms': (received - published) * 1e3, 'to_publish_ms': (published - accepted) * 1e3})
    return rows


def percentiles(values: list[float]) -> str:
    if not values:
        return 'n/a'
    p50, p95 = np.percentile(values, [50, 95])
    return f'p50 {p50:7.2f}  p95 {p95:7.2f}'


def main() -> int:
    args = parse_args()
    method_config = args.method_config or ('{num_layers: 4}' if args.model == 'tiny-random'
                                           and args.method in ('specprune', 'vla_pruner') else '')
    launch = {'model': args.model, 'method': args.method, 'twist_topic': 'delta_twist_cmds'}
    if method_config:
        launch['method_config'] = method_config
    command = node_command(node_setup(launch))
    for name, value in {'replan_every_steps': args.replan_every_steps, 'torch_threads': args.torch_threads}.items():
        command += ['-p', f'{name}:={format_value(value)}']
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')   # DDS discovery stays on this machine
    env = dict(os.environ, ROS_DOMAIN_ID=str(args.domain), PYTHONUNBUFFERED='1')
    log = open(f'/tmp/node_latency_{args.domain}.log', 'w')
    node = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    camera = subprocess.Popen([sys.executable, '-m', 'specprune_ros.ros.tools.synthetic_camera', '--rate',
                               str(args.rate), '--size', str(args.size)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    listener = Listener(args.domain)
    try:
        deadline = time.monotonic() + 180
        while not listener.inferences and time.monotonic() < deadline:
            if node.poll() is not None:
                raise RuntimeError(f'node exited; see {log.name}')
            time.sleep(0.2)
        if not listener.inferences:
            raise RuntimeError(f'no inference within 180 s; see {log.name}')
        time.sleep(args.warmup)
        rss_start = process_tree_rss(node.pid)
        start = time.time()
        minute_rss = []
        while time.time() - start < args.duration:
            time.sleep(min(10.0, max(0.0, args.duration - (time.time() - start))))
            minute_rss.append(process_tree_rss(node.pid))
        end = time.time()
        time.sleep(0.5)
        rss_end = process_tree_rss(node.pid)
        rows = match(listener, start, end)
        diagnostics = dict(listener.diagnostics)
    finally:
        listener.close()
        camera.terminate()
        node.send_signal(signal.SIGINT)
        for process in (camera, node):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()

    e2e = [r['e2e_ms'] for r in rows]
    model = [r['model_ms'] for r in rows]
    overhead = [r['overhead_ms'] for r in rows]
    keys = ('before_ms', 'worker_ms', 'after_ms', 'dds_out_ms', 'to_publish_ms')
    parts = {key: [r[key] for r in rows] for key in keys}
    fifth = max(1, len(rows) // 5)
    drift = float(np.median(e2e[-fifth:]) - np.median(e2e[:fifth])) if rows else float('nan')
    growth = (rss_end - rss_start) / rss_start * 100.0
    print(f'model {args.model} / {args.method}, camera {args.rate:g} Hz {args.size}x{args.size}, '
          f'{args.duration:g} s measured, {len(rows)} chunks')
    print(f'  image -> first command (e2e) ms : {percentiles(e2e)}')
    print(f'  model step (predict) ms         : {percentiles(model)}')
    print(f'  node overhead (e2e - model) ms  : {percentiles(overhead)}   target p50 <= 10')
    print(f'    camera stamp -> inference requested ms: {percentiles(parts["before_ms"])}  (DDS in, decode, wake-up)')
    print(f'    worker around the model ms          : {percentiles(parts["worker_ms"])}  (observation, accept)')
    print(f'    chunk accepted -> command received  : {percentiles(parts["after_ms"])}  (publish, DDS out)')
    print(f'      accepted -> command stamped        : {percentiles(parts["to_publish_ms"])}')
    print(f'      command stamped -> received here   : {percentiles(parts["dds_out_ms"])}')
    print(f'  e2e drift (last fifth - first fifth) : {drift:+.2f} ms   (a growing queue would show here)')
    print(f'  node RSS MiB: start {rss_start / 2**20:.1f}, end {rss_end / 2**20:.1f}, growth {growth:+.2f} % '
          f'(target < 5 %); max during run {max(minute_rss, default=rss_end) / 2**20:.1f}')
    print(f"  node diagnostics: frames received {diagnostics.get('frames received')}, dropped (superseded) "
          f"{diagnostics.get('frames dropped (superseded before use)')}, hold ticks {diagnostics.get('hold ticks')}, "
          f"deadline misses {diagnostics.get('inference deadline misses', '0')}")
    ok = bool(rows) and np.median(overhead) <= 10.0 and growth < 5.0 and drift < 10.0
    print('RESULT:', 'PASS' if ok else 'FAIL')
    if args.json:
        Path(args.json).write_text(strict_json({
            'args': vars(args), 'chunks': len(rows), 'e2e_ms_p50': float(np.median(e2e)) if rows else None,
            'model_ms_p50': float(np.median(model)) if rows else None,
            'overhead_ms_p50': float(np.median(overhead)) if rows else None,
            'overhead_ms_p95': float(np.percentile(overhead, 95)) if rows else None,
            'drift_ms': drift, 'rss_start': rss_start, 'rss_end': rss_end, 'rss_growth_pct': growth,
            'diagnostics': diagnostics}, indent=2))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
