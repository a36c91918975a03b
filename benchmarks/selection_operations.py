"""Tensor operations a method's hooks issue per step: eagerly, and with its selection work replayed as graphs.

On a GPU every tensor operation is a kernel launch the host issues, and a pruned step there is bound by the host
(``docs/benchmarks.md``, "On a GPU"): the operations a method's hooks issue are most of its selection time. This
counts them on the CPU, where it is exact and needs no GPU: the methods run real steps (frames of a closed-loop
simulator episode, the reference layout with a random decoder), and every tensor operation inside ``begin_step``,
``after_layer`` and ``end_step`` is counted (views, which launch nothing, and the attention probes, which the
executor runs, left out; the diversity steps run as device operations, as on an accelerator, not in NumPy). With
graphs the selection work replays through :mod:`specprune_ros.pruning.selection_graphs` with a recomputing stand-in
for CUDA graphs: each replay counts as one launch and the work inside it not at all (a capture, at the first step
that meets a key, counts its work once).

    python benchmarks/selection_operations.py --width 256 --layers 32 --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deployment_latency as harness  # noqa: E402  (the latency harness's episode, shapes and method table)

from specprune_ros.core import cuda_graphs  # noqa: E402
from specprune_ros.core.executor import _ProbeBatch  # noqa: E402
from specprune_ros.pruning import build_method, diversity, selection_graphs  # noqa: E402
from specprune_ros.pruning.base import PruningMethodBase  # noqa: E402

# operations that only describe a tensor differently (no kernel runs on a device)
VIEWS = frozenset({'view', 'reshape', '_reshape_alias', 'slice', 'select', 'expand', 'as_strided', 'unsqueeze',
                   'squeeze', 't', 'transpose', 'permute', 'detach', 'alias', 'unbind', 'split', 'lift_fresh'})
HOOKS = ('begin_step', 'after_layer', 'end_step')
CAMERAS = ('agentview', 'wrist')             # the reference layout's two cameras
DEFAULT_METHODS = ('specprune', 'vla_pruner 25%', 'coverage_ranked', 'divprune 25%', 'fastv 25%')


class _Census(TorchDispatchMode):
    """Counts the tensor operations issued while ``depth`` > 0 (inside a hook, outside a probe or a replay)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.operations: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.depth > 0 and name not in VIEWS:
            self.operations[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        saved, self.depth = self.depth, 0
        try:
            yield
        finally:
            self.depth = saved


@contextlib.contextmanager
def _counted(census: _Census, graphs: bool) -> Iterator[None]:
    """Hooks counted, probes and replays not; with ``graphs``, selection graphs on with the stand-in captures."""
    saved = {hook: getattr(PruningMethodBase, hook) for hook in HOOKS}
    saved_resolve, saved_capture = _ProbeBatch.resolve, cuda_graphs.capture
    saved_on, saved_enabled = cuda_graphs.ShapeGraphs._graphs_on, selection_graphs.ENABLED
    saved_numpy = diversity.CPU_STEPS_IN_NUMPY

    def hooked(original):
        def call(self, *args):
            census.depth += 1
            try:
                return original(self, *args)
            finally:
                census.depth -= 1
        return call

    def resolve(self) -> None:
        with census.paused():
            saved_resolve(self)

    def capture(call, device, owner):
        captured = cuda_graphs.capture_recomputing(call, device, owner)
        replay = captured.graph.replay

        def counted_replay() -> None:
            census.operations['graph replay'] += 1
            with census.paused():
                replay()
        captured.graph.replay = counted_replay
        return captured

    try:
        for hook, original in saved.items():
            setattr(PruningMethodBase, hook, hooked(original))
        _ProbeBatch.resolve = resolve
        diversity.CPU_STEPS_IN_NUMPY = False        # the diversity steps as on an accelerator, not in NumPy
        if graphs:
            cuda_graphs.capture = capture
            cuda_graphs.ShapeGraphs._graphs_on = staticmethod(lambda device: True)
            selection_graphs.ENABLED = True
        yield
    finally:
        for hook, original in saved.items():
            setattr(PruningMethodBase, hook, original)
        _ProbeBatch.resolve, cuda_graphs.capture = saved_resolve, saved_capture
        cuda_graphs.ShapeGraphs._graphs_on, selection_graphs.ENABLED = saved_on, saved_enabled
        diversity.CPU_STEPS_IN_NUMPY = saved_numpy


def count_operations(label: str, name: str, config: Optional[dict], adapter, frames, graphs: bool,
                     warmup: int) -> dict:
    """Operations per steady step (the first ``warmup`` steps of each episode left out) of one configuration."""
    census = _Census()
    runner = harness.Runner(label, name, config, build_method(name, config, seed=0))
    steps = 0
    with torch.inference_mode(), _counted(census, graphs), census:
        for frame in frames:
            if frame.episode_step == 0:
                runner.reset()
            before = census.operations.copy()
            runner.run(adapter, frame, CAMERAS)
            if frame.episode_step < warmup:
                census.operations = before
            else:
                steps += 1
    replays = census.operations.pop('graph replay', 0)
    top = census.operations.most_common(6)
    return {'label': label, 'graphs': graphs, 'steps': steps,
            'operations_per_step': round(sum(census.operations.values()) / max(steps, 1), 1),
            'replays_per_step': round(replays / max(steps, 1), 1),
            'most_issued': {op: round(count / max(steps, 1), 1) for op, count in top}}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ['# Tensor operations in the hooks per step', '',
             f"Command: `{meta['command']}`  ",
             f"Commit: {meta['commit']}; date: {meta['date']}  ",
             f"Shape: {meta['shape']}; {meta['frames']} frames of a closed-loop episode, the first {meta['warmup']} "
             'steps of each episode left out', '',
             'Operations a method issues in `begin_step`, `after_layer` and `end_step` (views and the executor\'s '
             'attention probes not counted); with selection graphs each replay is one launch and the work inside '
             'it is not counted (a recomputing stand-in for CUDA graphs on the CPU). On a GPU each operation is a '
             'kernel launch the host issues.', '',
             '| method | eager: operations / step | with selection graphs: operations + replays / step |',
             '|---|---|---|']
    by_label: dict[str, dict[bool, dict]] = collections.defaultdict(dict)
    for row in rows:
        by_label[row['label']][row['graphs']] = row
    for label, pair in by_label.items():
        eager, graphed = pair.get(False), pair.get(True)
        lines.append(f"| {label} | {eager['operations_per_step'] if eager else '-'} | "
                     + (f"{graphed['operations_per_step']} + {graphed['replays_per_step']}" if graphed else '-')
                     + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--width', type=int, default=256, help='decoder width of the reference-layout proxy')
    parser.add_argument('--layers', type=int, default=32, help='decoder depth of the proxy')
    parser.add_argument('--steps', type=int, default=12, help='steps counted per configuration')
    parser.add_argument('--warmup', type=int, default=3, help='steps left out at the start of each episode')
    parser.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS),
                        help='labels of the latency harness\'s built-in configurations')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--out', type=Path, default=Path('outputs/benchmarks'), help='folder for the JSON and table')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = {label: (name, config) for label, name, config in harness.METHODS}
    unknown = [label for label in args.methods if label not in known]
    if unknown:
        parser.error(f'unknown configuration(s) {unknown}; choose from {sorted(known)}')
    frames = harness.simulator_episode(args.steps, args.warmup, 2, seed=900_000)   # the harness's episode
    adapter, _ = harness.build_target(harness.ReferenceShape(args.width, args.layers), 'cpu', 'float32')
    rows = []
    for label in args.methods:
        name, config = known[label]
        for graphs in (False, True):
            rows.append(count_operations(label, name, config, adapter, frames, graphs, args.warmup))
            print(f"{label:18s} {'graphs' if graphs else 'eager '} {rows[-1]['operations_per_step']:6.1f} "
                  f"operations + {rows[-1]['replays_per_step']} replays per step", flush=True)
    arguments = argv if argv is not None else sys.argv[1:]
    meta = {'command': 'python benchmarks/selection_operations.py ' + shlex.join(arguments),
            'commit': harness.git_commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'shape': f'reference layout (2 x 144 patches), random decoder {args.width} x {args.layers}, CPU',
            'frames': len(frames), 'warmup': args.warmup}
    report = {'meta': meta, 'rows': rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'selection_operations.json').write_text(json.dumps(report, indent=1) + '\n')
    (args.out / 'selection_operations.md').write_text(markdown(meta, rows))
    return report


if __name__ == '__main__':
    main()
