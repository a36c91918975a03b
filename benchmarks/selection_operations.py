"""Tensor operations the host issues per step: a method's hooks and the executor's whole pass, eager and graphed.

On a GPU every tensor operation is a kernel launch the host issues, and a pruned step there is bound by the host
(``docs/benchmarks.md``, "On a GPU"). This counts them on the CPU, where it is exact and needs no GPU: the methods
run real steps (frames of a closed-loop simulator episode; the reference VLA's layout or OpenVLA-OFT's, with a
random decoder), and every tensor operation other than a view is counted inside ``begin_step``, ``after_layer``
and ``end_step`` (the hooks; the attention probes the executor runs for them left out) and inside the executor's
decoder pass (hooks and probes included). The diversity steps run as device operations and keep sets are checked
on the device, as on an accelerator. Three modes: eager; each decoder layer replayed as a graph of its own; and
the layers between two points where a method reads or decides replayed as one graph, with the selection work
(:mod:`specprune_ros.pruning.selection_graphs`) replayed too, as the adapter option ``cuda_graphs`` has them on a
GPU; each with a recomputing stand-in for CUDA graphs; each replay counts as one launch and the work inside it
not at all; a capture (at the first step that meets a shape or key) is counted apart (``*_captures``), its work
not at all.

    python benchmarks/selection_operations.py --width 256 --layers 32 --out docs/benchmarks
    python benchmarks/selection_operations.py --shape oft --name selection_operations_oft --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deployment_latency as harness  # noqa: E402  (the latency harness's episode, shapes and method table)

from specprune_ros.adapters.published_shapes import PublishedShape  # noqa: E402
from specprune_ros.command_line import HelpFormatter  # noqa: E402
from specprune_ros.core import cuda_graphs  # noqa: E402
from specprune_ros.core.attention_probes import ProbeBatch  # noqa: E402
from specprune_ros.core.executor import PrunableDecoderRunner  # noqa: E402
from specprune_ros.pruning import build_method, diversity, selection_graphs  # noqa: E402
from specprune_ros.pruning.base import PruningMethodBase  # noqa: E402

# operations that only describe a tensor differently (no kernel runs on a device)
VIEWS = frozenset({'view', 'reshape', '_reshape_alias', 'slice', 'select', 'expand', 'as_strided', 'unsqueeze',
                   'squeeze', 't', 'transpose', 'permute', 'detach', 'alias', 'unbind', 'split', 'lift_fresh'})
HOOKS = ('begin_step', 'after_layer', 'end_step')
CAMERAS = ('agentview', 'wrist')             # the reference layout's two cameras
DEFAULT_METHODS = ('specprune', 'vla_pruner 25%', 'coverage_ranked', 'divprune 25%', 'fastv 25%')


SCOPES = ('hooks', 'pass')       # a method's hooks (not its probes); the executor's whole pass (hooks included)


class _Census(TorchDispatchMode):
    """Counts the tensor operations issued inside each scope; a graph replay counts as one, its work as none."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = dict.fromkeys(SCOPES, 0)
        self.operations = {scope: collections.Counter() for scope in SCOPES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.launch(name)
        return func(*args, **(kwargs or {}))

    def launch(self, name: str) -> None:
        for scope, depth in self.depth.items():
            if depth > 0:
                self.operations[scope][name] += 1

    @contextlib.contextmanager
    def inside(self, scope: str) -> Iterator[None]:
        self.depth[scope] += 1
        try:
            yield
        finally:
            self.depth[scope] -= 1

    @contextlib.contextmanager
    def paused(self, *scopes: str) -> Iterator[None]:
        saved = dict(self.depth)
        for scope in scopes or SCOPES:
            self.depth[scope] = 0
        try:
            yield
        finally:
            self.depth = saved


# nothing graphed; one graph per decoder layer; spans of layers as one graph each, and the selections
MODES = ('eager', 'layer graphs', 'graphs')


@contextlib.contextmanager
def _counted(census: _Census, mode: str) -> Iterator[None]:
    """Hooks and passes counted; graphs (``mode``) replay stand-ins."""
    saved = {hook: getattr(PruningMethodBase, hook) for hook in HOOKS}
    saved_forward, saved_resolve, saved_capture = (PrunableDecoderRunner.forward, ProbeBatch.resolve,
                                                   cuda_graphs.capture)
    # the static method itself (attribute access would hand out its function, restored as an instance method)
    saved_on, saved_layers_on = vars(cuda_graphs.ShapeGraphs)['_graphs_on'], PrunableDecoderRunner._graphs_on
    saved_enabled, saved_numpy = selection_graphs.ENABLED, diversity.CPU_STEPS_IN_NUMPY

    def inside(scope, original):
        def call(self, *args, **kwargs):
            with census.inside(scope):
                return original(self, *args, **kwargs)
        return call

    def resolve(self) -> None:
        with census.paused('hooks'):            # the executor's probes: part of the pass, not of the hooks
            saved_resolve(self)

    def capture(call, device, owner):
        census.launch('graph capture')          # once per shape or key: counted apart from the steady work
        with census.paused():
            captured = cuda_graphs.capture_recomputing(call, device, owner)
        replay = captured.graph.replay

        def counted_replay() -> None:
            census.launch('graph replay')
            with census.paused():
                replay()
        captured.graph.replay = counted_replay
        return captured

    try:
        for hook, original in saved.items():
            setattr(PruningMethodBase, hook, inside('hooks', original))
        PrunableDecoderRunner.forward = inside('pass', saved_forward)
        ProbeBatch.resolve = resolve
        diversity.CPU_STEPS_IN_NUMPY = False        # the diversity steps as on an accelerator, not in NumPy
        if mode != 'eager':
            cuda_graphs.capture = capture
            cuda_graphs.ShapeGraphs._graphs_on = staticmethod(lambda device: True)
            PrunableDecoderRunner._graphs_on = lambda self, device: self.cuda_graph_layers
            selection_graphs.ENABLED = mode == 'graphs'
        yield
    finally:
        for hook, original in saved.items():
            setattr(PruningMethodBase, hook, original)
        PrunableDecoderRunner.forward, ProbeBatch.resolve = saved_forward, saved_resolve
        cuda_graphs.capture, cuda_graphs.ShapeGraphs._graphs_on = saved_capture, saved_on
        PrunableDecoderRunner._graphs_on = saved_layers_on
        selection_graphs.ENABLED, diversity.CPU_STEPS_IN_NUMPY = saved_enabled, saved_numpy


def _cameras(adapter) -> tuple[str, ...]:
    """The episode's cameras the model reads (a published shape may read fewer than the reference VLA)."""
    return CAMERAS[:getattr(adapter, 'num_images', len(CAMERAS))]


def count_operations(label: str, name: str, config: Optional[dict], adapter, frames, mode: str,
                     warmup: int) -> dict:
    """Operations per steady step (the first ``warmup`` steps of each episode left out) of one configuration.

    ``mode``: one of :data:`MODES` ('layer graphs': one graph per decoder layer and the selections eager, as the
    graphed H200 run had them but for its probed layers, which ran eagerly; 'graphs' is the adapter option
    ``cuda_graphs`` now: the layers between two points where a method reads or decides as one graph, and the
    selections replayed as graphs).
    """
    census = _Census()
    # a throwaway run first: the tables built once per process (cell grids, visual maps, rank weights) are not a
    # step's work
    spare = harness.Runner(label, name, config, build_method(name, config, seed=0))
    with torch.inference_mode():
        for frame in frames[:warmup + 2]:
            spare.run(adapter, frame, _cameras(adapter))
    runner = harness.Runner(label, name, config, build_method(name, config, seed=0))
    adapter.runner.cuda_graph_layers = mode != 'eager'
    adapter.runner.cuda_graph_spans = mode == 'graphs'
    adapter.runner.validate_on_host = False          # keep sets checked on the device, as on an accelerator
    # graphs captured under another configuration's census would count their replays there: start afresh
    adapter.runner._graphs.clear()
    diversity._STEP_GRAPHS.clear()
    steps = 0
    with torch.inference_mode(), _counted(census, mode), census:
        for frame in frames:
            if frame.episode_step == 0:
                runner.reset()
            before = {scope: counter.copy() for scope, counter in census.operations.items()}
            runner.run(adapter, frame, _cameras(adapter))
            if frame.episode_step < warmup:
                census.operations = before
            else:
                steps += 1
    adapter.runner.cuda_graph_layers, adapter.runner.validate_on_host = False, None
    adapter.runner.cuda_graph_spans = True
    row = {'label': label, 'mode': mode, 'steps': steps}
    for scope, counter in census.operations.items():
        replays = counter.pop('graph replay', 0)
        row[f'{scope}_captures'] = counter.pop('graph capture', 0)
        row[f'{scope}_operations_per_step'] = round(sum(counter.values()) / max(steps, 1), 1)
        row[f'{scope}_replays_per_step'] = round(replays / max(steps, 1), 1)
        row[f'{scope}_most_issued'] = {op: round(count / max(steps, 1), 1) for op, count in counter.most_common(6)}
    return row


def _count(row: Optional[dict], scope: str) -> str:
    if row is None:
        return '-'
    replays = row[f'{scope}_replays_per_step']
    return f"{row[f'{scope}_operations_per_step']:.0f}" + (f' + {replays:g}' if replays else '')


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ['# Tensor operations the host issues per step', '',
             f"Command: `{meta['command']}`  ",
             f"Commit: {meta['commit']}; date: {meta['date']}  ",
             f"Shape: {meta['shape']}; {meta['frames']} frames of a closed-loop episode, the first {meta['warmup']} "
             'steps of each episode left out', '',
             'Per step, the tensor operations (views left out) a method issues in `begin_step`, `after_layer` and '
             '`end_step` (hooks; the attention probes the executor runs not counted), and the executor\'s whole '
             'decoder pass (hooks and probes included). Eager: every operation. Layer graphs: each decoder layer '
             'replayed as a graph of its own, the selections eager; graphs: the layers between two points '
             'where the method reads or decides replayed as one graph, and the selections too (what the adapter '
             'option `cuda_graphs` replays on a GPU; a recomputing stand-in for CUDA graphs on the CPU), each replay '
             'one launch (+ N) and its work not counted, captures (once per shape or key) not counted. On a GPU '
             'each operation is a kernel launch the host issues.',
             '', '| method | hooks: eager | layer graphs | graphs | whole pass: eager | layer graphs | graphs |',
             '|---|---|---|---|---|---|---|']
    by_label: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for row in rows:
        by_label[row['label']][row['mode']] = row
    for label, modes in by_label.items():
        cells = [_count(modes.get(mode), scope) for scope in SCOPES for mode in MODES]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--shape', choices=('reference', 'oft'), default='reference',
                        help="the reference VLA's layout (2 x 144 patches) or OpenVLA-OFT's (2 x 256 patches, the "
                             'layout of the 7B GPU runs), each with a random decoder of --width x --layers')
    parser.add_argument('--width', type=int, default=256, help='decoder width of the proxy')
    parser.add_argument('--layers', type=int, default=32, help='decoder depth of the proxy')
    parser.add_argument('--steps', type=int, default=12, help='steps counted per configuration')
    parser.add_argument('--warmup', type=int, default=3, help='steps left out at the start of each episode')
    parser.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS),
                        help='labels of the latency harness\'s built-in configurations')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--out', type=Path, default=Path('outputs/benchmarks'), help='folder for the JSON and table')
    parser.add_argument('--name', default='selection_operations', help='output file stem')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = {label: (name, config) for label, name, config in harness.METHODS}
    unknown = [label for label in args.methods if label not in known]
    if unknown:
        parser.error(f'unknown configuration(s) {unknown}; choose from {sorted(known)}')
    frames = harness.simulator_episode(args.steps, args.warmup, 2, seed=900_000)   # the harness's episode
    if args.shape == 'oft':
        target = PublishedShape(kind='openvla-oft', width=args.width, layers=args.layers,
                                heads=max(1, args.width // 128), vision_scale=min(1.0, args.width / 4096),
                                proprio_dim=len(frames[0].proprio))
        described = 'OpenVLA-OFT layout (2 x 256 patches)'
    else:
        target, described = harness.ReferenceShape(args.width, args.layers), 'reference layout (2 x 144 patches)'
    adapter, _ = harness.build_target(target, 'cpu', 'float32')
    rows = []
    for label in args.methods:
        name, config = known[label]
        for mode in MODES:
            rows.append(count_operations(label, name, config, adapter, frames, mode, args.warmup))
            row = rows[-1]
            print(f"{label:18s} {mode:12s}: hooks {_count(row, 'hooks')}, "
                  f"pass {_count(row, 'pass')} operations per step", flush=True)
    arguments = argv if argv is not None else sys.argv[1:]
    meta = {'command': 'python benchmarks/selection_operations.py ' + shlex.join(arguments),
            'commit': harness.git_commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'shape': f'{described}, random decoder {args.width} x {args.layers}, CPU',
            'frames': len(frames), 'warmup': args.warmup}
    report = {'meta': meta, 'rows': rows}
    harness.write_json_and_markdown(args.out, args.name, report, markdown(meta, rows))
    return report


if __name__ == '__main__':
    main()
