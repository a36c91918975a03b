"""Run a simulation closed loop as processes (what ``ros2 launch specprune_ros sim.launch.py`` does).

The policy node, the sim bridge and optionally a bag recorder, each with its log file.

Used by ``scripts/run_sim_closed_loop.py``, ``scripts/compare_ros_vs_harness.py`` and the tests.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from specprune_ros.bridge.episodes import summary_files
from specprune_ros.bridge.settings import BridgeSettings
from specprune_ros.ros.sim_launch_config import bridge_command, policy_command, sim_setup

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ManagedProcess:
    """A child process with its output in a log file; ``interrupt`` sends SIGINT (twice), then SIGKILL."""

    label: str
    command: list[str]
    env: dict
    log_path: Path
    cwd: Optional[Path] = None
    popen: Optional[subprocess.Popen] = None

    def start(self) -> 'ManagedProcess':
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, 'w')
        self.popen = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=self.cwd, start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self, timeout: float = 20.0, second_timeout: float = 45.0) -> Optional[int]:
        """SIGINT; after ``timeout`` a second SIGINT, after ``second_timeout`` more SIGKILL. Returns the exit status.

        A second interrupt lets a process close cleanly what it can (the bag recorder drops its backlog and writes
        the bag's metadata), where a kill would leave a bag to reindex.
        """
        for wait_s in (timeout, second_timeout):
            if not self.alive():
                break
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)
        return None if self.popen is None else self.popen.returncode

    def output(self, tail: Optional[int] = None) -> str:
        """The log so far (its last ``tail`` characters if given)."""
        try:
            text = self.log_path.read_text(errors='replace')
            return text if tail is None else text[-tail:]
        except OSError:
            return ''


def child_environment(domain_id: Optional[int], torch_threads: int = 1) -> dict:
    env = dict(os.environ)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    env.update(PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(max(torch_threads, 1)))
    if domain_id is not None:
        env['ROS_DOMAIN_ID'] = str(domain_id)
    return env


@dataclass
class SimRun:
    """Options of one simulation run (launch arguments + process plumbing)."""

    arguments: dict = field(default_factory=dict)         # sim.launch.py arguments (model, method, mode, ...)
    policy_parameters: dict = field(default_factory=dict)  # extra -p for the policy node
    bridge_parameters: dict = field(default_factory=dict)  # extra -p for the bridge
    domain_id: Optional[int] = None
    torch_threads: int = 1
    log_dir: Optional[Path] = None
    record_bag: Optional[Path] = None                      # record the run (recorder on sim time)
    record_storage: str = 'mcap'
    record_topics: Sequence[str] = ()
    timeout_s: float = 3600.0
    nice: int = 0
    progress: Optional[Callable[[str], None]] = None      # called with each 'episode i/N ...' line of the bridge


DEFAULT_RECORD_TOPICS = ('/clock', '/camera/agentview/image_raw', '/camera/wrist/image_raw', '/ee_pose',
                         '/gripper_state', '/instruction', '/delta_twist_cmds', '/gripper_command',
                         '/specprune_node/action_chunk', '/specprune_node/inference', '/sim_bridge/episode')


def recording_start_condition(recorded: Sequence[str], bridge_parameters: dict) -> dict[str, int]:
    """Bridge settings that hold the first episode until the recorder listens.

    The recorder then sees frame one and, where it records every topic the policy node answers on, the first
    command and chunk too.
    """
    s = BridgeSettings(**{k: v for k, v in bridge_parameters.items() if k in BridgeSettings.descriptions()})
    answers = [s.twist_topic, s.gripper_topic]
    if s.policy_node:
        answers += [f'{s.policy_node}/action_chunk', f'{s.policy_node}/inference']
    absolute = {name if name.startswith('/') else f'/{name}' for name in answers}   # the bridge's root namespace
    return {'min_camera_subscribers': 2, 'min_command_subscribers': 2 if absolute <= set(recorded) else 1}


def run_simulation(run: SimRun) -> dict:
    """Start everything, wait for the bridge to finish, stop the rest.

    Returns ``{'returncode', 'summary' (the bridge's JSON document or None), 'logs', 'problem'}``; ``problem``
    says why the run stopped early ('' when the bridge finished on its own): the bridge is interrupted (its episode
    in progress marked so) when the policy node exits or ``timeout_s`` passes.
    """
    setup = sim_setup(run.arguments)
    log_dir = Path(run.log_dir or tempfile.mkdtemp(prefix='specprune-sim-'))
    log_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run.bridge_parameters.get('summary_path') or setup.bridge_overrides.get('summary_path') \
        or str(log_dir / 'summary')
    env = child_environment(run.domain_id, run.torch_threads)
    prefix = ['nice', '-n', str(run.nice)] if run.nice else []
    policy_extra = {'torch_threads': run.torch_threads, **run.policy_parameters}
    processes: list[ManagedProcess] = []
    recorder = None
    if threading.current_thread() is threading.main_thread():   # SIGTERM: stop the children too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if run.record_bag is not None:
            topics = list(run.record_topics or DEFAULT_RECORD_TOPICS)
            command = [sys.executable, '-m', 'specprune_ros.ros.bag_recorder', str(run.record_bag),
                       '--storage', run.record_storage, '--use-sim-time', '--topics', *topics]
            recorder = ManagedProcess('recorder', prefix + command, env, log_dir / 'recorder.log').start()
            processes.append(recorder)
        node = ManagedProcess('specprune_node', prefix + policy_command(setup, policy_extra), env,
                              log_dir / 'specprune_node.log').start()
        processes.append(node)
        recording = recording_start_condition(topics, run.bridge_parameters) if recorder is not None else {}
        bridge = ManagedProcess('sim_bridge', prefix + bridge_command(
            setup, {**recording, **run.bridge_parameters, 'summary_path': summary_path}), env,
            log_dir / 'sim_bridge.log').start()
        processes.append(bridge)
        deadline = time.monotonic() + run.timeout_s
        progress = EpisodeProgress(bridge.log_path, run.progress)
        problem = ''
        while bridge.alive():
            if not node.alive():
                problem = f'the policy node exited (code {node.popen.returncode}) before the bridge finished'
                break
            if time.monotonic() >= deadline:
                problem = f'the run took longer than {run.timeout_s:g} s'
                break
            progress.poll()
            time.sleep(0.2)
        returncode = bridge.wait(1.0) if not bridge.alive() else bridge.interrupt()
        progress.poll()
        if recorder is not None:
            time.sleep(1.0)   # the last outcome and commands reach the recorder
    finally:
        for process in reversed(processes):
            process.interrupt()
    summary = None
    json_path, _ = summary_files(summary_path)
    if json_path.is_file():
        summary = json.loads(json_path.read_text())
    return {'returncode': returncode, 'summary': summary, 'summary_path': str(json_path), 'problem': problem,
            'logs': {p.label: str(p.log_path) for p in processes},
            'outputs': {p.label: p.output(tail=4000) for p in processes}}


class EpisodeProgress:
    """Follows the bridge's log and hands each finished episode's line ('episode 3/20 pick seed ...') on."""

    PATTERN = re.compile(r'(episode \d+/\d+ .*)$')

    def __init__(self, log_path: Path, callback: Optional[Callable[[str], None]]) -> None:
        self.log_path, self.callback, self.offset = Path(log_path), callback, 0

    def poll(self) -> None:
        if self.callback is None or not self.log_path.is_file():
            return
        with open(self.log_path, 'rb') as log:
            log.seek(self.offset)
            chunk = log.read()
        complete = chunk[:chunk.rfind(b'\n') + 1]
        self.offset += len(complete)
        for line in complete.decode(errors='replace').splitlines():
            match = self.PATTERN.search(line)
            if match:
                self.callback(match.group(1))


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """['name=value', ...] -> {name: YAML-parsed value}."""
    import yaml
    out = {}
    for item in items:
        name, sep, value = item.partition('=')
        if not sep or not name:
            raise ValueError(f'expected name=value, got {item!r}')
        out[name.strip()] = yaml.safe_load(value)
    return out
