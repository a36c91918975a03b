r"""Latency of every pruning method at a deployment shape (OpenVLA / OpenVLA-OFT layouts), measured side by side.

The model is OpenVLA or OpenVLA-OFT at its published dimensions with random weights, built in memory
(``specprune_ros.adapters.published_shapes``), optionally narrower for CPU runs (``--width``: the token layout,
the 32 layers and the action head stay; the ViTs shrink by the same factor unless ``--vision-scale`` says
otherwise). One sequence of observations from a closed-loop simulator episode (the scripted expert drives the
MuJoCo tabletop; both cameras rendered, resized to 224 px by the model's own preprocessing, one frame every
``--stride`` control steps) is fed to every method round-robin, step by step, in one process: each method keeps
its own temporal state (reset when an episode starts), the order rotates every step (:func:`step_order`), and
the first ``--warmup``
steps of each episode (allocator / kernel warm-up and every method's own warm-up, e.g. VLA-Pruner's 3 unpruned
steps) are not timed. transformers' own
forward of the same weights with SDPA (``reference_step``: what users of the published models run) is timed in
the same rotation.

Per method: total step time and its parts (vision = both ViTs + projector; decoder = prefill, plus the
autoregressive decode for OpenVLA; selection = the method's hooks and attention probes; head = OFT's action head /
OpenVLA's de-tokenisation; other = prompt, preprocessing, embedding) as medians with p10 / p90; speedup over the
unpruned executor with a 95% paired bootstrap interval of the ratio of medians; the same over transformers' forward;
the FLOPs-ideal decoder speedup and measured / ideal; the Amdahl-ideal total speedup (decoder scaled by its FLOPs,
the rest unchanged); mean kept visual tokens per layer; the attention path of each layer.

    # CPU proxy (a few minutes on a quiet 2-core machine)
    python benchmarks/deployment_latency.py --shape oft --width 512 256 --steps 8 --threads 2 --out docs/benchmarks
    # a GPU: the OpenVLA-OFT 7B shape in bf16 (see scripts/gpu_benchmark.sh)
    python benchmarks/deployment_latency.py --shape oft-7b --device cuda --steps 20 --out outputs/benchmarks
    # a real checkpoint on the robot's GPU (its proprio input gets the simulator's state, cut or zero-padded)
    python benchmarks/deployment_latency.py --checkpoint /models/oft-libero-spatial --unnorm-key libero_spatial \
        --device cuda --steps 30

On CUDA every step is synchronised before and after, and nothing in between: the host queues the decoder while the
device still runs the vision backbones, as on a robot. The vision, executor-pass and head parts are then spans of
the device's timeline between CUDA events recorded where each part starts and ends (a span includes the device's
idle time waiting for the host to issue work). ``--serial-phases`` synchronises around each part instead (the host
clock of each part alone, at the cost of the overlap). The method's share inside the executor pass (selection) is
the executor's host clock, so GPU work queued by a method's hooks and not waited for there counts as decoder time;
a method that reads a value back inside the pass waits there for the device, and that wait counts as selection.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from specprune_ros.adapters.base import resolve_device
from specprune_ros.adapters.factory import load_adapter, read_options
from specprune_ros.adapters.published_checkpoint import check_checkpoint_directory
from specprune_ros.adapters.published_shapes import PublishedShape, build_shape
from specprune_ros.command_line import HelpFormatter
from specprune_ros.core.cpu_info import cpu_info
from specprune_ros.core.json_documents import is_missing, number_text, strict_json
from specprune_ros.models.loading import load_model
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.reference_backend import reference_policy
from specprune_ros.policy.reference_vla import ReferenceVLA
from specprune_ros.pruning import build_method

REPO = Path(__file__).resolve().parents[1]
REFERENCE = 'transformers sdpa'
BASELINE = 'none'
# (label, registry name, config)
METHODS: tuple[tuple[str, str, Optional[dict]], ...] = (
    ('none', 'none', None),
    ('specprune', 'specprune', None),
    ('vla_pruner 25%', 'vla_pruner', {'keep_ratio': 0.25}),
    ('fastv 25%', 'fastv', {'keep_ratio': 0.25}),
    ('divprune 25%', 'divprune', {'keep_ratio': 0.25}),
    ('random 25%', 'random', {'keep_ratio': 0.25}),
    ('vla_cache', 'vla_cache', None),
    ('coverage_ranked', 'coverage_ranked', None),
)
# --shape name -> (kind, width or None for --width)
SHAPES = {'oft': ('openvla-oft', None), 'openvla': ('openvla', None), 'oft-7b': ('openvla-oft', 4096),
          'openvla-7b': ('openvla', 4096), 'reference': ('reference', None)}
NOISY_SPREAD = 1.3        # unpruned p90 / p10 above this: the table says the machine was too busy to trust the times
PHASES = ('total', 'vision', 'decoder', 'prefill', 'decode', 'selection', 'probe', 'head', 'other', 'layers')


# -- observations -----------------------------------------------------------------------------------------------

@dataclass
class Frame:
    """One observation of the episode as the policy receives it."""

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instruction: str
    executed_actions: np.ndarray
    episode_step: int = 0                 # policy steps since the episode started (0: methods reset first)


def simulator_episode(timed: int, warmup: int, stride: int, family: str = 'place', seed: int = 0,
                      image_size: int = 224) -> list[Frame]:
    """Observations of the scripted expert acting in closed loop in the MuJoCo tabletop.

    One every ``stride`` control steps, until ``timed`` of them lie ``warmup`` or more policy steps into their
    episode (a new episode, seed + 1, starts when one ends).
    """
    from specprune_ros.sim import ScriptedExpert, TabletopEnv   # MuJoCo: only when the harness runs
    env = TabletopEnv(family=family, seed=seed, image_size=image_size)
    expert = ScriptedExpert(env)
    frames: list[Frame] = []
    observation, episode, episode_step = env.reset(seed=seed), seed, 0
    executed: list[np.ndarray] = []
    while sum(f.episode_step >= warmup for f in frames) < timed:
        frames.append(Frame(images={k: v.copy() for k, v in observation.images.items()},
                            proprio=np.asarray(observation.proprio, dtype=np.float64).copy(),
                            instruction=observation.instruction,
                            executed_actions=np.array(executed[-stride:] or [np.zeros(7)], dtype=np.float64),
                            episode_step=episode_step))
        episode_step, executed = episode_step + 1, []
        for i in range(stride):
            action = expert.act(observation)
            observation, done, _ = env.step(action, render=i == stride - 1)
            executed.append(action)
            if done:
                episode += 1
                observation, episode_step, executed = env.reset(seed=episode), 0, []
                break
    env.close()
    return frames


def save_frames(frames: list[Frame], path: Path) -> None:
    """Write ``frames`` to an ``.npz`` file (no pickles), for a machine that cannot render the simulator."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, frame in enumerate(frames):
        for camera, image in frame.images.items():
            arrays[f'{i}/image/{camera}'] = image
        arrays[f'{i}/proprio'] = frame.proprio
        arrays[f'{i}/executed'] = frame.executed_actions
        meta.append({'cameras': list(frame.images), 'instruction': frame.instruction,
                     'episode_step': frame.episode_step})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def load_frames(path: Path) -> list[Frame]:
    """Frames written by :func:`save_frames`."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data['meta']))
        return [Frame(images={c: data[f'{i}/image/{c}'] for c in m['cameras']}, proprio=data[f'{i}/proprio'],
                      instruction=m['instruction'], executed_actions=data[f'{i}/executed'],
                      episode_step=int(m['episode_step'])) for i, m in enumerate(meta)]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A frame resized (bicubic) to the model's square input."""
    from PIL import Image
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def digest(arrays: list[np.ndarray], text: str = '') -> str:
    h = hashlib.sha256(text.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# -- timing -----------------------------------------------------------------------------------------------------

class PhaseClock:
    """Times the adapter's vision, decoder pass and action-head calls; remembers the frames the model saw.

    The decoder pass is the executor's prefill; the timers are instance wrappers. With ``device_event`` (a factory
    of timing events, e.g. CUDA's) each part is the span between two events recorded on the device's stream, read
    by :meth:`settle` once the step has been synchronised, and nothing waits for the device in between; without
    it each part is timed on the host clock between two calls of ``sync``.
    """

    def __init__(self, adapter: Any, sync: Callable[[], None], layer_times: bool = False,
                 device_event: Optional[Callable[[], Any]] = None) -> None:
        self.sync = sync
        self.device_event = device_event
        self._spans: list[tuple[str, Any, Any]] = []
        self.seconds: dict[str, float] = {}
        self.frames: list[np.ndarray] = []
        self.inside_selection = 0.0          # the method's time inside the executor pass (hooks + probes)
        self._wrap(adapter.runner, 'forward', 'runner')
        if layer_times:                      # each decoder layer's own time (its device span on CUDA)
            self._wrap(adapter.runner, '_run_layer', 'layers')
        if isinstance(adapter, ReferenceVLA):    # vision = the stem and the token embeddings together
            self._wrap(adapter, 'embed', 'vision')
            self._wrap(adapter, 'decode_actions', 'head')
            return
        self._wrap(adapter, 'visual_tokens', 'vision')
        self._wrap(adapter, 'head' if adapter.kind == 'openvla-oft' else 'detokenize', 'head')
        original = adapter.prepare_frames

        def prepare(images):
            self.frames = original(images)
            return self.frames
        adapter.prepare_frames = prepare

    def _wrap(self, adapter: Any, attribute: str, phase: str) -> None:
        original = getattr(adapter, attribute)

        def timed(*args, **kwargs):
            if self.device_event is not None:
                start = self.device_event()
                start.record()
                out = original(*args, **kwargs)
                end = self.device_event()
                end.record()
                self._spans.append((phase, start, end))
            else:
                self.sync()
                t0 = time.perf_counter()
                out = original(*args, **kwargs)
                self.sync()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
            if phase == 'runner':
                self.inside_selection = out.record.selection_seconds + out.record.probe_seconds
            return out
        setattr(adapter, attribute, timed)

    def settle(self) -> None:
        """Add the device spans recorded since the last call to :attr:`seconds` (after the step's final sync)."""
        for phase, start, end in self._spans:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + start.elapsed_time(end) / 1e3
        self._spans = []

    def reset(self) -> None:
        self.seconds = {}
        self._spans = []
        self.frames = []
        self.inside_selection = 0.0


@dataclass
class Runner:
    """One timed configuration: a pruning method (its own temporal state) or transformers' forward."""

    label: str
    name: str
    config: Optional[dict]
    method: Any = None
    step_index: int = 0
    samples: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    flops: list[float] = field(default_factory=list)
    flops_full: list[float] = field(default_factory=list)
    pass_flops: list[float] = field(default_factory=list)       # the executor's pass alone (OpenVLA: no decode)
    pass_flops_full: list[float] = field(default_factory=list)
    kept_visual: list[float] = field(default_factory=list)
    num_visual: int = 0
    num_tokens: int = 0
    probe_keys: list[set] = field(default_factory=list)
    backends: Optional[list[str]] = None
    kernels: list[set] = field(default_factory=list)
    reused: int = 0
    inputs: Any = field(default_factory=hashlib.sha256)
    frames: Any = field(default_factory=hashlib.sha256)
    policy: Any = None                       # the reference VLA's Policy (it carries the method and step index)
    profile: Optional[dict] = None           # --profile: what torch.profiler saw in its steps

    @property
    def is_reference(self) -> bool:
        return self.name == REFERENCE

    def reset(self) -> None:
        self.step_index = 0
        if self.method is not None:
            self.method.reset()
        if self.policy is not None:
            self.policy.reset()

    def run(self, adapter: Any, frame: Frame, cameras: tuple[str, ...]):
        if isinstance(adapter, ReferenceVLA):
            if self.policy is None:
                self.policy = reference_policy(adapter, self.method)
            size = adapter.config.image_size
            images = {c: resize(frame.images[c], size) for c in cameras}
            return self.policy.predict(Observation(images=images, instruction=frame.instruction,
                                                   proprio=frame.proprio.astype(np.float32),
                                                   executed_actions=frame.executed_actions))
        images = [frame.images[c] for c in cameras]
        proprio = None
        if adapter.kind == 'openvla-oft' and adapter.proprio_dim:
            proprio = fit_proprio(frame.proprio, adapter.proprio_dim)
        if self.is_reference:
            args = (images, frame.instruction) + ((proprio,) if proprio is not None else ())
            return adapter.reference_step(*args)
        common = dict(method=self.method, step_index=self.step_index, executed_actions=frame.executed_actions)
        if proprio is not None:
            common['proprio'] = proprio
        out = adapter.step(images, frame.instruction, **common)
        self.step_index += 1
        return out

    def record(self, out: Any, elapsed: float, clock: PhaseClock, images: list[np.ndarray], frame: Frame,
               layers: int) -> None:
        vision, head = clock.seconds.get('vision', 0.0), clock.seconds.get('head', 0.0)
        self.inputs.update(digest(images + [frame.proprio], frame.instruction).encode())
        self.frames.update(digest(clock.frames).encode())
        values = {'total': elapsed, 'vision': vision, 'head': head}
        if self.is_reference:
            values.update(decoder=elapsed - vision - head, prefill=float('nan'), decode=float('nan'),
                          selection=0.0, probe=0.0, other=float('nan'), layers=float('nan'))
            self.backends = ['sdpa (transformers)'] * layers
        else:
            record = out.result.record if hasattr(out, 'result') else out.record
            # prefill: the executor pass's wall time (synchronised) less the method's time inside it; decode:
            # OpenVLA's token loop (each token read back to the host, so its host clock holds on CUDA too)
            decode = float(record.info.get('decode_seconds', 0.0))
            prefill = clock.seconds['runner'] - clock.inside_selection
            selection = record.selection_seconds + record.probe_seconds
            values.update(decoder=prefill + decode, prefill=prefill, decode=decode, selection=selection,
                          probe=record.probe_seconds, other=elapsed - vision - head - prefill - decode - selection,
                          layers=clock.seconds.get('layers', float('nan')))
            self.flops.append(record.flops)
            self.flops_full.append(record.flops_full)
            self.pass_flops.append(record.info.get('prefill_flops', record.flops))
            self.pass_flops_full.append(record.info.get('prefill_flops_full', record.flops_full))
            self.num_visual, self.num_tokens = record.layout.num_visual, record.layout.num_tokens
            self.kept_visual.append(float(np.mean(record.visual_kept_per_layer)))
            keys = [set(record.attention.get(layer, {})) for layer in range(layers)]
            self.probe_keys = keys if not self.probe_keys else [a | b for a, b in zip(self.probe_keys, keys)]
            self.reused = max(self.reused, 0 if record.reused is None else len(record.reused))
            if record.attention_kernels:
                kernels = [{kernel} for kernel in record.attention_kernels]
                self.kernels = kernels if not self.kernels else [a | b for a, b in zip(self.kernels, kernels)]
        for phase, value in values.items():
            self.samples[phase].append(value)

    def layer_backends(self) -> list[str]:
        """Per layer: the attention output's kernels and the attention rows a method read there.

        Kernels: fused SDPA, two products, or 'sdpa/products' where the token count chose either in different steps.
        """
        if self.backends is not None:
            return self.backends
        out = []
        kernels = self.kernels or [{'sdpa'}] * len(self.probe_keys)
        for keys, kernel in zip(self.probe_keys, kernels):
            path = '/'.join(sorted(kernel, reverse=True)) + (' + probe(' + ','.join(sorted(keys)) + ')' if keys else '')
            out.append(path + (' + reused K/V' if self.reused else ''))
        return out


# the CUDA runtime calls that launch a kernel, and those that make the host wait for the device
LAUNCHES = {'cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx'}
STREAM_SYNCS = {'cudaStreamSynchronize', 'cudaEventSynchronize'}


def profile_steps_of(step: Callable[[Frame], Any], frames: list[Frame], sync: Callable[[], None],
                     cuda: bool, top: int = 12) -> dict:
    """One method's steps under torch.profiler: per step, host and device time, kernel launches, host waits.

    Says whether a step is bound by the host (the Python and dispatch work that issues the operations) or by the
    device (kernel time), and which operations cost most on each. The profiler itself slows the host.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=activities) as prof:
        for frame in frames:
            sync()
            t0 = time.perf_counter()
            step(frame)
            sync()
            walls.append(time.perf_counter() - t0)
    events = prof.key_averages()
    steps = max(len(frames), 1)

    def device_us(event) -> float:
        return float(getattr(event, 'self_device_time_total', getattr(event, 'self_cuda_time_total', 0.0)))

    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    on_host = [e for e in events if e.device_type == DeviceType.CPU]
    per_step = (lambda names: sum(e.count for e in on_host if e.key in names) / steps)
    return {
        'steps': len(frames), 'wall_ms': 1e3 * float(np.median(walls)),
        'device_busy_ms': sum(device_us(e) for e in on_device) / 1e3 / steps,
        'kernel_launches': per_step(LAUNCHES), 'stream_syncs': per_step(STREAM_SYNCS),
        'device_syncs': per_step({'cudaDeviceSynchronize'}),
        'aten_calls': sum(e.count for e in on_host if e.key.startswith('aten::')) / steps,
        'top_host': [[e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps]
                     for e in sorted(on_host, key=lambda e: -e.self_cpu_time_total)[:top]],
        'top_device': [[e.key, device_us(e) / 1e3 / steps, e.count / steps]
                       for e in sorted(on_device, key=device_us, reverse=True)[:top]],
    }


def bootstrap_ratio(base: np.ndarray, other: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of median(base) / median(other), resampling the interleaved steps in pairs."""
    n = min(len(base), len(other))
    if n < 2:
        return [float('nan'), float('nan')]
    base, other = np.asarray(base[:n]), np.asarray(other[:n])
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    ratios = np.median(base[idx], axis=1) / np.median(other[idx], axis=1)
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def compress(backends: list[str]) -> str:
    """'sdpa x29; sdpa + probe(text) @1' style summary of per-layer paths."""
    groups: dict[str, list[int]] = {}
    for layer, path in enumerate(backends):
        groups.setdefault(path, []).append(layer)
    parts = []
    for path, layers in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        parts.append(f'{path} x{len(layers)}' if len(layers) > 3 else f"{path} @{','.join(map(str, layers))}")
    return '; '.join(parts)


# -- one shape --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceShape:
    """The shipped reference VLA's layout with a random WIDTH x LAYERS decoder.

    The layout: 2 cameras x 144 patches, 12 words, proprio, 56 action queries; the decoder: MLP 3 x width, head
    dim 64, as the pruning benchmark's wide phase.
    """

    width: int
    layers: int

    @property
    def label(self) -> str:
        return f'reference layout {self.width}x{self.layers}'


def build_target(target: PublishedShape | ReferenceShape | Path, device: str, dtype: str, seed: int = 0,
                 unnorm_key: Optional[str] = None) -> tuple[Any, str]:
    """(model, label).

    A published shape with random weights, the reference VLA's layout with a random decoder, or a checkpoint directory's
    real weights.
    """
    if isinstance(target, ReferenceShape):
        from dataclasses import replace
        base = load_model('reference').config
        heads = max(1, target.width // 64)
        torch.manual_seed(seed)
        config = replace(base, hidden_size=target.width, num_layers=target.layers, mlp_size=3 * target.width,
                         num_heads=heads, num_kv_heads=heads)
        # float32 on every device: its action head reads float32 states
        return ReferenceVLA(config).to(resolve_device(device)).eval(), target.label
    if isinstance(target, PublishedShape):
        return build_shape(target, device=device, dtype=dtype, seed=seed), target.label
    options = read_options(target, {'unnorm_key': unnorm_key})
    adapter = load_adapter(target, device=device, dtype=dtype, options=options)
    return adapter, f'{adapter.kind} checkpoint {target.name}'


def fit_proprio(proprio: np.ndarray, dim: int) -> np.ndarray:
    """The simulator's state cut or zero-padded to the model's proprio width (a real checkpoint's may differ)."""
    out = np.zeros(dim)
    out[:min(dim, len(proprio))] = proprio[:dim]
    return out


class EveryLayerHooks:
    """A method whose plans ask for its ``after_layer`` hook after every layer, not only where it acts.

    Times what the hooks a plan does not name would cost (``--every-layer-hooks``); the kept tokens are the same.
    """

    def __init__(self, method: Any) -> None:
        self._method = method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def begin_step(self, context: Any) -> Any:
        plan = self._method.begin_step(context)
        plan.after_layers = None
        return plan


def measure_shape(target: PublishedShape | Path, frames: list[Frame], methods, device: str, dtype: str, warmup: int,
                  seed: int = 0, reference: bool = True, unnorm_key: Optional[str] = None,
                  log: Callable[[str], None] = print, weight_copies: str = 'auto',
                  attention_kernel: str = 'auto', every_layer_hooks: bool = False,
                  layer_times: bool = False, profile_steps: int = 0, fuse_projections: str = 'auto',
                  compile_layers: bool = False, cuda_graphs: bool = False,
                  serial_phases: bool = False, graph_spans: bool = True) -> tuple[list, dict]:
    started = time.perf_counter()
    adapter, label = build_target(target, device, dtype, seed, unnorm_key)
    if fuse_projections != 'auto':
        adapter.runner.fuse_projections = fuse_projections == 'on'
    adapter.runner.compile_layers = compile_layers
    if cuda_graphs and hasattr(adapter, 'use_cuda_graphs'):
        adapter.use_cuda_graphs()
    elif cuda_graphs:                                     # the reference VLA: its decoder layers
        adapter.runner.cuda_graph_layers = True
    adapter.runner.cuda_graph_spans = graph_spans
    if weight_copies != 'auto':        # 'onednn', 'mkl' or 'none'
        adapter.runner.packed_weights = weight_copies == 'onednn'
        adapter.runner.mkl_packed_weights = weight_copies == 'mkl'
    if attention_kernel != 'auto':     # 'sdpa' or 'products'
        adapter.runner.attention_kernel = attention_kernel
    build_s = time.perf_counter() - started
    is_reference_vla = isinstance(adapter, ReferenceVLA)
    module = adapter if is_reference_vla else adapter.model
    first = next(module.parameters())
    model_device, model_dtype = first.device, first.dtype
    cuda = model_device.type == 'cuda'
    sync = (lambda: torch.cuda.synchronize(model_device)) if cuda else (lambda: None)
    timing_event = (lambda: torch.cuda.Event(enable_timing=True)) if cuda and not serial_phases else None
    clock = PhaseClock(adapter, sync, layer_times, timing_event)
    if is_reference_vla:
        c = adapter.config
        kind, cameras, patches, heads = 'reference', tuple(c.camera_names), c.grid * c.grid, c.num_heads
        vision_widths, vision_depths = list(c.vision_channels), [len(c.vision_channels)]
        reference = False                    # transformers has no forward of this model
    else:
        kind, cameras, patches = adapter.kind, ('agentview', 'wrist')[:adapter.num_images], adapter.patches_per_image
        heads = adapter.model.decoder.config.num_attention_heads
        vision_widths = [s.embed_dim for s in adapter.checkpoint.vision_specs]
        vision_depths = [s.depth for s in adapter.checkpoint.vision_specs]
    layers = adapter.runner.num_layers
    runners = [Runner(label, name, config, build_method(name, config, seed=seed)) for label, name, config in methods]
    if every_layer_hooks:
        runners += [Runner(f'{label}, hooks after every layer', name, config,
                           EveryLayerHooks(build_method(name, config, seed=seed)))
                    for label, name, config in methods]
    if reference:
        runners.append(Runner(REFERENCE, REFERENCE, None))
    log(f'{label}: {kind} on {model_device} {str(model_dtype).replace("torch.", "")}, '
        f'{layers} layers x {adapter.runner.hidden_size} (MLP {adapter.runner.mlp_size}), '
        f'{len(cameras)} x {patches} patches; built in {build_s:.1f} s')
    failed: dict[str, str] = {}
    with torch.inference_mode():
        for index, frame in enumerate(frames):
            if frame.episode_step == 0:
                for runner in runners:
                    runner.reset()
            if not runners:
                break
            for runner in step_order(runners, index):
                clock.reset()
                try:                           # one broken method must not cost the others' measurements
                    sync()
                    t0 = time.perf_counter()
                    out = runner.run(adapter, frame, cameras)
                    sync()
                    elapsed = time.perf_counter() - t0
                    clock.settle()
                    if frame.episode_step >= warmup:
                        images = [frame.images[c] for c in cameras]
                        if is_reference_vla:   # what the model saw: the frames resized to its input
                            clock.frames = [resize(image, adapter.config.image_size) for image in images]
                        runner.record(out, elapsed, clock, images, frame, layers)
                except Exception as error:
                    log(f'  {runner.label} failed at step {index} and is left out: '
                        + ''.join(traceback.format_exception(error)).rstrip())
                    failed[runner.label] = f'{type(error).__name__}: {error}'
                    runners.remove(runner)
            if frame.episode_step >= warmup:
                log(f'  step {index}: ' + ', '.join(f'{r.label} {1e3 * r.samples["total"][-1]:.0f}' for r in runners)
                    + ' ms')
        if profile_steps and runners:
            steady = [frame for frame in frames if frame.episode_step >= warmup] or frames
            steady = [steady[i % len(steady)] for i in range(-profile_steps, 0)]     # the last ones, cycled
            for runner in runners:
                runner.profile = profile_steps_of(lambda frame: runner.run(adapter, frame, cameras), steady, sync,
                                                  cuda)
    info = {'shape': label, 'kind': kind, 'width': adapter.runner.hidden_size, 'layers': layers, 'heads': heads,
            'mlp': adapter.runner.mlp_size, 'vision_widths': vision_widths, 'vision_depths': vision_depths,
            'images': len(cameras), 'patches_per_image': patches,
            'parameters_m': sum(p.numel() for p in module.parameters()) / 1e6, 'build_s': build_s,
            'device': device_name(model_device), 'dtype': str(model_dtype).replace('torch.', ''),
            'weight_copies': adapter.runner.weight_copy_kind(), 'failed': failed,
            'phase_timing': ('spans between CUDA events; one synchronisation per step' if timing_event is not None
                             else 'host clock, synchronised around each part' if cuda else 'host clock')}
    return rows_for(runners, info), info


def _stat(values: list[float]) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0 or np.isnan(v).all():
        return float('nan'), float('nan'), float('nan')
    return tuple(float(1e3 * np.nanpercentile(v, q)) for q in (50, 10, 90))


def rows_for(runners: list[Runner], info: dict) -> list[dict]:
    by_label = {r.label: r for r in runners}
    base = by_label.get(BASELINE)
    ref = by_label.get(REFERENCE)
    base_total = np.asarray(base.samples['total']) if base else None
    base_decoder = (np.asarray(base.samples['decoder']) + np.asarray(base.samples['selection'])) if base else None
    rows = []
    for r in runners:
        total = np.asarray(r.samples['total'])
        row: dict[str, Any] = {'shape': info['shape'], 'device': info['device'], 'dtype': info['dtype'],
                               'method': r.name, 'label': r.label, 'config': r.config, 'steps': len(total)}
        for phase in PHASES:
            row[f'{phase}_ms'], row[f'{phase}_ms_p10'], row[f'{phase}_ms_p90'] = _stat(r.samples[phase])
        if base is not None:
            row['speedup'] = float(np.median(base_total) / np.median(total))
            row['speedup_ci95'] = bootstrap_ratio(base_total, total)
        if ref is not None:
            ref_total = np.asarray(ref.samples['total'])
            row['speedup_vs_transformers'] = float(np.median(ref_total) / np.median(total))
            row['speedup_vs_transformers_ci95'] = bootstrap_ratio(ref_total, total)
        if r.is_reference:
            row.update(flops_ratio=1.0, flops_ideal_speedup=1.0, kept_visual_ratio=1.0,
                       kept_visual_tokens=float(base.num_visual) if base else float('nan'))
        else:
            flops_ratio = float(np.sum(r.flops) / np.sum(r.flops_full))
            decoder = np.asarray(r.samples['decoder']) + np.asarray(r.samples['selection'])
            row.update(flops_ratio=flops_ratio, flops_ideal_speedup=1.0 / flops_ratio,
                       kept_visual_tokens=float(np.mean(r.kept_visual)),
                       kept_visual_ratio=float(np.mean(r.kept_visual)) / r.num_visual,
                       num_visual=r.num_visual, num_tokens=r.num_tokens)
            if base is not None:
                decoder_speedup = float(np.median(base_decoder) / np.median(decoder))
                rest = float(np.median(base_total) - np.median(base_decoder))
                ideal_total = float(np.median(base_total) / (rest + np.median(base_decoder) * flops_ratio))
                row.update(decoder_speedup=decoder_speedup, measured_over_ideal=decoder_speedup * flops_ratio,
                           total_ideal_speedup=ideal_total, total_measured_over_ideal=row['speedup'] / ideal_total,
                           selection_share_of_decoder=float(np.median(r.samples['selection'])
                                                            / np.median(r.samples['decoder'])))
                layers = np.asarray(r.samples['layers'])
                base_layers = np.asarray(base.samples['layers'])
                if np.isfinite(layers).all() and np.isfinite(base_layers).all() and len(layers):
                    # the layers clock times the executor's pass only: its FLOPs, without OpenVLA's decode
                    layers_speedup = float(np.median(base_layers) / np.median(layers))
                    pass_ratio = float(np.sum(r.pass_flops) / np.sum(r.pass_flops_full))
                    row.update(layers_speedup=layers_speedup, layers_over_ideal=layers_speedup * pass_ratio)
        backends = r.layer_backends()
        row['attention_backend'] = backends
        row['attention_backend_summary'] = compress(backends)
        row['inputs_sha256'] = r.inputs.hexdigest()[:16]
        row['frames_sha256'] = r.frames.hexdigest()[:16]
        row['total_ms_samples'] = [1e3 * v for v in total]
        if r.profile is not None:
            row['profile'] = r.profile
        rows.append(row)
    return rows


# -- reporting --------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = cpu_info('model name') or platform.processor() or platform.machine()
    return f'CPU ({name}, {torch.get_num_threads()} threads)'


def git_commit() -> str:
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', 'specprune_ros',
                                'benchmarks'], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return commit + (' (uncommitted changes)' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


# the executor's weight copies (``weight_copy_kind``) as the tables name its products
PRODUCTS = {'packed': 'from oneDNN prepacked weights', 'mkl_packed': "from MKL's packed weights",
            'input_major': 'by BLAS (MKL) from input-major weights'}


def _ms(row: dict, phase: str) -> str:
    median = row.get(f'{phase}_ms')
    if is_missing(median):
        return '-'
    return f"{median:.1f} ({number_text(row[f'{phase}_ms_p10'], '.0f')}-{number_text(row[f'{phase}_ms_p90'], '.0f')})"


def _x(value: Optional[float], interval: Optional[list] = None) -> str:
    if is_missing(value):
        return '-'
    text = f'{value:.2f}x'
    return text + (f' ({number_text(interval[0], ".2f")}-{number_text(interval[1], ".2f")})' if interval else '')


def markdown(meta: dict, shapes: list[dict], rows: list[dict]) -> str:
    others = [shape for shape in shapes if 'run' in shape and shape['run'].get('started') != meta.get('started')]
    earlier = ([f"Kept from other runs: {', '.join(shape['shape'] for shape in others)} (each says under its "
                'heading which run, commit, date and device measured it)  '] if others else [])
    lines = ['# Deployment-shape latency', '',
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}; date: {meta['date']}  ", *earlier,
             f"Device: {meta['device']}; dtype {meta['dtype']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}  ",
             f"Observations: {meta['observations']}  ",
             f"{meta['steps']} timed steps per method ({meta['warmup']} untimed at each episode start), every method "
             "and transformers' own forward interleaved (order rotating) in one process. Random weights: only "
             'latency, kept tokens and FLOPs mean anything.', '',
             'Times are medians (p10-p90) in ms. speedup = median(unpruned executor) / median(method), 95% paired '
             'bootstrap interval; vs transformers = the same against transformers\' SDPA forward of the same '
             'weights. Decoder ideal = decoder FLOPs ratio; measured / ideal = (decoder + selection) speedup / '
             'decoder ideal; total ideal = the total if only the decoder shrank with its FLOPs.', '']
    for shape in shapes:
        run = shape.get('run')
        provenance = [] if run is None else [
            f"Measured by `{run['command']}` at {run['commit']}, {run['date']}, {run['device']}.", '']
        lines += [f"## {shape['shape']}", '', *provenance,
                  f"Decoder {shape['width']} wide x {shape['layers']} layers ({shape['heads']} heads, MLP "
                  f"{shape['mlp']}); ViTs {shape['vision_widths']} wide x {shape['vision_depths']} blocks; "
                  f"{shape['images']} image(s) x {shape['patches_per_image']} patches; "
                  f"{shape['parameters_m']:.0f} M parameters"
                  '; executor products ' + PRODUCTS.get(shape.get('weight_copies'), 'by BLAS (MKL)' if str(
                      shape.get('device', 'CPU')).startswith('CPU') else 'on the device') + '.'
                  + (f" Parts timed by {shape['phase_timing']}."
                     if shape.get('phase_timing', 'host clock') != 'host clock' else ''), '',
                  '| method | total | vision | decoder (prefill + decode) | selection (/ decoder) | head | speedup '
                  '(95% CI) | vs transformers | decoder ideal | measured / ideal | total ideal | kept visual / layer |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|']
        for row in (r for r in rows if r['shape'] == shape['shape']):
            decoder = _ms(row, 'decoder')
            if not is_missing(row.get('decode_ms')) and row['decode_ms']:
                decoder += f" ({row['prefill_ms']:.0f} + {row['decode_ms']:.0f})"
            ratio = row.get('measured_over_ideal')
            share = row.get('selection_share_of_decoder')
            selection = _ms(row, 'selection') + ('' if share is None else f' ({100 * share:.1f}%)')
            lines.append(
                f"| {row['label']} | {_ms(row, 'total')} | {_ms(row, 'vision')} | {decoder} | "
                f"{selection} | {_ms(row, 'head')} | {_x(row.get('speedup'), row.get('speedup_ci95'))} | "
                f"{_x(row.get('speedup_vs_transformers'))} | {_x(row.get('flops_ideal_speedup'))} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} | {_x(row.get('total_ideal_speedup'))} | "
                f"{number_text(row['kept_visual_tokens'], '.0f')} "
                f"({number_text(row['kept_visual_ratio'], '.0f', 100)}%) |")
        none = next((r for r in rows if r['shape'] == shape['shape'] and r['label'] == BASELINE), None)
        spread = none['total_ms_p90'] / none['total_ms_p10'] if none is not None and none['total_ms_p10'] else 1.0
        if spread > NOISY_SPREAD:
            lines += ['', f"**Noisy machine**: the unpruned step's p90 / p10 is {spread:.1f} (flagged above "
                          f"{NOISY_SPREAD}); the times and speedups of this table are not reliable, the kept-token "
                          'and FLOPs columns are. Rerun the command on a quiet machine.']
        if none is not None and 'speedup_vs_transformers' in none:
            ratio = 1 / none['speedup_vs_transformers']
            low, high = (1 / v for v in reversed(none['speedup_vs_transformers_ci95']))
            lines += ['', f"Unpruned executor / transformers' SDPA forward, total step time: {ratio:.3f} "
                          f"(95% CI {low:.3f}-{high:.3f})."]
        timed = [row for row in rows if row['shape'] == shape['shape'] and 'layers_speedup' in row]
        if timed:
            lines += ['', "Decoder layers alone (`--layer-times`: each layer's own time, without the hooks, the "
                          "keep-set switches and the pass's loop), speedup and measured / ideal: "
                      + '; '.join(f"{row['label']} {number_text(row['layers_ms'])} ms, "
                                  f"{number_text(row['layers_speedup'], '.2f')}x, "
                                  f"{number_text(row['layers_over_ideal'], '.2f')}" for row in timed) + '.']
        profiled = [row for row in rows if row['shape'] == shape['shape'] and 'profile' in row]
        if profiled:
            lines += ['', f"Profile (`--profile`: torch.profiler over {profiled[0]['profile']['steps']} more steps per "
                          'method; the profiler slows the host, so its wall times exceed the table\'s). Per step: '
                          'wall time, device kernel time, kernel launches, aten calls (nested ones included), host '
                          'waits for a stream, and the operations taking most host and device time:', '',
                      '| method | wall | device busy | launches | aten calls | stream waits | most host time | '
                      'most device time |', '|---|---|---|---|---|---|---|---|']
            for row in profiled:
                prof = row['profile']
                host = ', '.join(f'{name} {ms:.2f}' for name, ms, _ in prof['top_host'][:4])
                device = ', '.join(f'{name[:40]} {ms:.2f}' for name, ms, _ in prof['top_device'][:3]) or '-'
                lines.append(f"| {row['label']} | {prof['wall_ms']:.1f} | {prof['device_busy_ms']:.1f} | "
                             f"{prof['kernel_launches']:.0f} | {prof['aten_calls']:.0f} | {prof['stream_syncs']:.1f} | "
                             f'{host} | {device} |')
        if shape.get('failed'):
            lines += ['', '**Left out** (failed during the run; the log has the traceback): '
                      + '; '.join(f'{label}: {error}' for label, error in shape['failed'].items()) + '.']
        lines += ['', 'Attention path per layer:', '']
        lines += [f"- {row['label']}: {row['attention_backend_summary']}" for row in rows
                  if row['shape'] == shape['shape']]
        lines.append('')
    return '\n'.join(lines)


def plot(shapes: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        selected = [r for r in rows if r['shape'] == shape['shape'] and 'speedup' in r]
        y = np.arange(len(selected))

        def values(key: str, index: Optional[int] = None) -> np.ndarray:    # a missing value (None) is NaN here
            return np.array([r.get(key) if index is None else r[key][index] for r in selected], dtype=float)

        speed = values('speedup')
        ax.barh(y, speed, xerr=[speed - values('speedup_ci95', 0), values('speedup_ci95', 1) - speed],
                color='tab:blue', alpha=0.8, capsize=3, label='measured (95% CI)')
        ax.scatter(values('flops_ideal_speedup'), y, marker='|', s=200, color='tab:red', label='decoder FLOPs ideal')
        ax.scatter(values('total_ideal_speedup'), y, marker='x', color='black', label='total ideal')
        ax.axvline(1.0, color='grey', lw=0.8)
        ax.set_yticks(y, [r['label'] for r in selected])
        ax.set_xlabel('speedup over the unpruned executor (total step)')
        ax.set_title(shape['shape'], fontsize=9)
        ax.grid(axis='x', alpha=0.3)
    axes[0][0].legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_extra(text: str) -> tuple[str, str, Optional[dict]]:
    label, sep, rest = text.partition('=')
    name, _, config = rest.partition(':')
    if not sep or not label.strip() or not name.strip():
        raise SystemExit(f'--extra {text!r}: expected LABEL=METHOD:JSON')
    return label.strip(), name.strip(), json.loads(config) if config.strip() else None


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--shape', nargs='+', default=['oft'], choices=sorted(SHAPES),
                        help='oft / openvla (width from --width), oft-7b / openvla-7b (4096 wide), or reference '
                        "(the shipped reference VLA's 2 x 144-patch layout with a random --width x --layers decoder)")
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='time a real OpenVLA / OpenVLA-OFT checkpoint directory instead of --shape')
    parser.add_argument('--unnorm-key', default=None, help='dataset statistics of --checkpoint')
    parser.add_argument('--width', type=int, nargs='+', default=[512], help='decoder width(s) for oft / openvla')
    parser.add_argument('--layers', type=int, default=32, help='decoder depth of the proxy shapes')
    parser.add_argument('--heads', type=int, default=None, help='default: width / 128 (the published head dim)')
    parser.add_argument('--vision-scale', type=float, default=None,
                        help='fraction of the ViT widths (default: width / 4096)')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument('--dtype', default='auto', help="'auto': bf16 on CUDA, fp32 on the CPU")
    parser.add_argument('--steps', type=int, default=10, help='timed steps per method')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed steps at the start of each episode (VLA-Pruner prunes from step 3)')
    parser.add_argument('--stride', type=int, default=2, help='control steps between observations')
    parser.add_argument('--family', default='place', help='simulator task family of the episode (place: the longest)')
    parser.add_argument('--episode-seed', type=int, default=900_000,
                        help='seed of the simulator episode whose frames every method sees')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = leave the default)')
    parser.add_argument('--methods', nargs='+', default=None, help='labels of the built-in methods to run')
    parser.add_argument('--extra', action='append', default=[], metavar='LABEL=METHOD:JSON',
                        help="another configuration, e.g. 'vla_pruner 12.5%%=vla_pruner:{\"keep_ratio\": 0.125}'")
    parser.add_argument('--no-reference', action='store_true', help="skip transformers' own forward")
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights and of seeded methods')
    parser.add_argument('--out', type=Path, default=Path('outputs/benchmarks'),
                        help='folder for deployment_latency.json / .md / .png')
    parser.add_argument('--name', default='deployment_latency', help='output file stem')
    parser.add_argument('--no-plot', action='store_true', help='skip the plot')
    parser.add_argument('--save-frames', type=Path, default=None,
                        help='render the episode, write its frames to this .npz file and stop')
    parser.add_argument('--frames', type=Path, default=None,
                        help='use the frames of a --save-frames file instead of rendering (a machine without MuJoCo)')
    parser.add_argument('--weight-copies', choices=('auto', 'onednn', 'mkl', 'none'), default='auto',
                        help="the executor's products from oneDNN's prepacked weights, MKL's packed ones or the plain "
                             "BLAS product (CPU, fp32; every method and the unpruned executor alike, not "
                             "transformers' own forward): 'auto' = the executor's default for this processor")
    parser.add_argument('--attention-kernel', choices=('auto', 'sdpa', 'products'), default='auto',
                        help="what computes the executor's attention outputs in unmasked layers: fused SDPA, two "
                             "products, or 'auto' = the executor's rule (two products on the CPU at 96-191 tokens "
                             "with 64-dimensional heads or more and two threads or more)")
    parser.add_argument('--every-layer-hooks', action='store_true',
                        help="also time every method with its after_layer hook called after every layer (not only "
                             "the layers its plans name), interleaved with the rest")
    parser.add_argument('--layer-times', action='store_true',
                        help="also time each decoder layer's own work (a clock read around every layer; on CUDA "
                             "its span between two events, or synchronised with --serial-phases), so the table "
                             "says how much of a method's decoder time the layers take and "
                             "how close they come to their FLOPs")
    parser.add_argument('--serial-phases', action='store_true',
                        help='on CUDA, synchronise before and after the vision, executor-pass and head parts of '
                             'every step (each part on the host clock alone; the device then never runs one part '
                             'while the host queues the next); default: one synchronisation per step, the parts '
                             'timed by CUDA events')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='after the timed steps, run N more steps per method under torch.profiler and report '
                             'host and device time, kernel launches, host waits and the costliest operations')
    parser.add_argument('--fuse-projections', choices=('auto', 'on', 'off'), default='auto',
                        help="the executor's fused query/key/value and gate/up products: 'auto' = on where the weights "
                             'live on the CPU (the executor\'s default), on / off everywhere')
    parser.add_argument('--compile-layers', action='store_true',
                        help="run the executor's layers as torch.compile graphs (token counts padded to 32-token "
                             'buckets; every new bucket compiles once, inside the untimed warm-up only if it recurs)')
    parser.add_argument('--cuda-graphs', action='store_true',
                        help="replay the vision backbones, the executor's layers and the methods' selections as CUDA "
                             'graphs (token counts padded to 32-token buckets; the layers between two points where '
                             'a method reads or decides are one graph, captured once per bucket; CUDA only)')
    parser.add_argument('--graphs-per-layer', action='store_true',
                        help='with --cuda-graphs: one graph per decoder layer instead of one per span of layers '
                             '(for comparison)')
    parser.add_argument('--append', action='store_true',
                        help='keep the shapes of an existing output of the same name (re-measured shapes replaced)')
    args = parser.parse_args(argv)
    if args.checkpoint is not None:
        try:
            check_checkpoint_directory(args.checkpoint)      # a mistyped path: one line, not a traceback
        except CheckpointError as error:
            parser.error(f'--checkpoint: {error}')
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.methods or ()) - {label for label, _, _ in METHODS})
    if unknown:
        parser.error(f"--methods: unknown {unknown}; the built-in labels are {[label for label, _, _ in METHODS]} "
                     "(others with --extra LABEL=METHOD:JSON)")
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods or m[0] == BASELINE]
    methods += [parse_extra(text) for text in args.extra]
    started = time.time()
    if args.frames is not None:
        frames = load_frames(args.frames)
    else:
        frames = simulator_episode(args.steps, args.warmup, args.stride, args.family, args.episode_seed)
    if args.save_frames is not None:
        save_frames(frames, args.save_frames)
        print(f'wrote {len(frames)} frames to {args.save_frames}')
        return {'rows': []}
    episodes = sum(f.episode_step == 0 for f in frames)
    observations = (f"{len(frames)} frames of {episodes} closed-loop '{args.family}' episode(s) from seed "
                    f"{args.episode_seed} (scripted expert; one frame every {args.stride} control steps; 224 px; "
                    f"cameras agentview + wrist; the first {args.warmup} steps of each episode untimed; the proprio "
                    f"token projects the simulator's {len(frames[0].proprio)}-D state)")
    if args.frames is not None:
        observations += f', read from {args.frames}'
    print(f'{observations}: ready in {time.time() - started:.1f} s')
    shapes: list[PublishedShape | ReferenceShape | Path] = [args.checkpoint] if args.checkpoint is not None else []
    for name in ([] if args.checkpoint is not None else args.shape):
        kind, fixed = SHAPES[name]
        if kind == 'reference':
            shapes += [ReferenceShape(width, args.layers) for width in args.width]
            continue
        for width in ([fixed] if fixed else args.width):
            scale = args.vision_scale if args.vision_scale is not None else min(1.0, width / 4096)
            shapes.append(PublishedShape(kind=kind, width=width, layers=args.layers, heads=args.heads,
                                         vision_scale=scale, proprio_dim=len(frames[0].proprio)))
    import transformers
    command = ' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {'command': f'python benchmarks/deployment_latency.py {command}', 'commit': git_commit(),
            'torch': torch.__version__, 'transformers': transformers.__version__, 'steps': args.steps,
            'warmup': args.warmup, 'observations': observations,
            'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='microseconds')}
    earlier = {'rows': [], 'shapes': []}
    if args.append and (args.out / f'{args.name}.json').is_file():
        earlier = json.loads((args.out / f'{args.name}.json').read_text())
    rows, infos = [], []
    for shape in shapes:          # the outputs are rewritten after every shape (a long run keeps what it measured)
        shape_rows, info = measure_shape(shape, frames, methods, args.device, args.dtype, args.warmup, args.seed,
                                         reference=not args.no_reference, unnorm_key=args.unnorm_key,
                                         weight_copies=args.weight_copies, attention_kernel=args.attention_kernel,
                                         every_layer_hooks=args.every_layer_hooks, layer_times=args.layer_times,
                                         profile_steps=args.profile, fuse_projections=args.fuse_projections,
                                         compile_layers=args.compile_layers, cuda_graphs=args.cuda_graphs,
                                         serial_phases=args.serial_phases,
                                         graph_spans=not args.graphs_per_layer)
        rows += shape_rows
        infos.append(info)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        meta.update(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                    device=infos[0]['device'], dtype=infos[0]['dtype'], threads=torch.get_num_threads(),
                    minutes=(time.time() - started) / 60)
        # each shape keeps the run that measured it, so a file assembled with --append says who measured what
        info['run'] = {'command': meta['command'], 'commit': meta['commit'], 'date': meta['date'],
                       'device': info['device'], 'started': meta['started']}
        measured = {info['shape'] for info in infos}
        kept_infos = [info for info in earlier['shapes'] if info['shape'] not in measured]
        kept_rows = [row for row in earlier['rows'] if row['shape'] not in measured]
        write_outputs(args.out, args.name, {'meta': meta, 'shapes': kept_infos + infos, 'rows': kept_rows + rows},
                      plot_too=not args.no_plot)
    print(markdown(meta, infos, rows))
    print(f'wrote {args.out}/{args.name}.{{json,md{"" if args.no_plot else ",png"}}} in {meta["minutes"]:.1f} min')
    return {'meta': meta, 'shapes': infos, 'rows': rows}


def step_order(items: list, index: int) -> list:
    """The order of step ``index``: rotated by one each step, reversed every other round of rotations.

    Each method takes every position equally often, and follows two different methods rather than always the same
    one (what ran just before changes which caches are warm).
    """
    count = len(items)
    rotated = items[index % count:] + items[:index % count]
    return rotated[::-1] if (index // count) % 2 else rotated


def write_json_and_markdown(out: Path, name: str, report: dict, table: str, indent: int = 1) -> None:
    """``<name>.json`` (``report``) and ``<name>.md`` (``table``) in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(strict_json(report, indent=indent) + '\n')
    (out / f'{name}.md').write_text(table if table.endswith('\n') else table + '\n')


def write_outputs(out: Path, name: str, report: dict, plot_too: bool = True) -> None:
    write_json_and_markdown(out, name, report, markdown(report['meta'], report['shapes'], report['rows']), indent=2)
    if plot_too:
        plot(report['shapes'], report['rows'], out / f'{name}.png')


if __name__ == '__main__':
    main()
