"""End-to-end latency and speedup of every pruning method on an OpenVLA / OpenVLA-OFT checkpoint.

One adapter is loaded once; each method gets its own ``PrunablePolicy`` around it (its own temporal state). A
synthetic episode (textured frames with a block that moves, a drifting proprio vector, small executed actions)
is fed to all methods round-robin, step by step, so machine noise hits them alike; the first ``--warmup`` steps
are not timed. The adapter's own unpruned forward through transformers ("hf-reference") is timed alongside.

Reported per method: median and p90 ``predict()`` latency (preprocessing, vision, decoder, action decoding, method
overhead), speedup over 'none', the median decoder time, the method's own time (hooks + attention probes), the
mean share of visual tokens entering each decoder layer, and decoder FLOPs relative to the unpruned pass.

    # a real checkpoint on a GPU robot
    python benchmarks/adapter_latency.py --checkpoint /models/openvla-7b-oft-finetuned-libero-spatial \\
        --device cuda --dtype bfloat16 --unnorm-key libero_spatial --steps 30
    # here: the tiny architecture-identical random checkpoints on the CPU
    python benchmarks/adapter_latency.py --checkpoint tiny-oft --steps 8 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from specprune_ros.adapters.factory import load_adapter, read_options
from specprune_ros.command_line import HelpFormatter
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.prunable_policy import PrunablePolicy
from specprune_ros.pruning import build_method

DEFAULT_METHODS = ['none', 'random', 'fastv', 'divprune', 'vla_pruner', 'vla_cache', 'specprune']
TINY = {'tiny-openvla': 'openvla', 'tiny-oft': 'openvla-oft'}


def synthetic_episode(steps: int, cameras: tuple[str, ...], size: int, proprio_dim: int, seed: int = 0):
    """Observations of a slowly moving coloured block over a fixed textured background."""
    rng = np.random.default_rng(seed)
    backgrounds = [rng.integers(40, 200, size=(size, size, 3), dtype=np.uint8) for _ in cameras]
    block = max(4, size // 8)
    proprio = rng.normal(scale=0.3, size=proprio_dim) if proprio_dim else None
    for t in range(steps):
        images = {}
        for c, name in enumerate(cameras):
            frame = backgrounds[c].copy()
            y = (8 + 3 * t + 20 * c) % (size - block)
            x = (16 + 2 * t) % (size - block)
            frame[y:y + block, x:x + block] = (230, 40 + 60 * c, 40)
            images[name] = frame
        if proprio is not None:
            proprio = proprio + rng.normal(scale=0.01, size=proprio_dim)
        yield Observation(images=images, instruction='pick up the black bowl and place it on the plate',
                          proprio=None if proprio is None else proprio.copy(),
                          executed_actions=rng.normal(scale=0.05, size=(2, 7)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', default='tiny-oft',
                        help="a checkpoint directory, or 'tiny-openvla' / 'tiny-oft' (written to a temp dir)")
    parser.add_argument('--device', default='auto', help="torch device ('auto': cuda when available, else cpu)")
    parser.add_argument('--dtype', default='auto', help="'auto' (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument('--methods', nargs='+', default=DEFAULT_METHODS, help='pruning methods to time')
    parser.add_argument('--method-config', default='{}',
                        help='JSON: {method: {field: value}} applied to the named methods, e.g. '
                             '\'{"fastv": {"keep_ratio": 0.25}}\'')
    parser.add_argument('--unnorm-key', default=None,
                        help="the checkpoint's action statistics to unnormalise with (None: its only one)")
    parser.add_argument('--steps', type=int, default=10, help='timed steps per method')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps first (VLA-Pruner warms up 3 steps)')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = leave the default)')
    parser.add_argument('--no-reference', action='store_true', help="skip timing transformers' own forward")
    parser.add_argument('--json', type=Path, default=None, help='also write the results here')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = json.loads(args.method_config)

    tmp = None
    directory = args.checkpoint
    if directory in TINY:
        from specprune_ros.adapters.tiny import write_tiny_checkpoint
        tmp = tempfile.TemporaryDirectory()
        directory = write_tiny_checkpoint(Path(tmp.name) / directory, TINY[directory])
    started = time.perf_counter()
    options = read_options(directory, {'unnorm_key': args.unnorm_key})
    adapter = load_adapter(directory, device=args.device, dtype=args.dtype, options=options)
    load_s = time.perf_counter() - started
    policies = {name: PrunablePolicy(adapter, build_method(name, configs.get(name), seed=0)) for name in args.methods}
    first = next(iter(policies.values()))
    print(f'{adapter.kind} from {args.checkpoint}: {adapter.device} {str(adapter.dtype).replace("torch.", "")}, '
          f'{adapter.runner.num_layers} decoder layers x {adapter.runner.hidden_size}, '
          f'{adapter.num_images} camera(s) x {adapter.patches_per_image} patches; loaded in {load_s:.1f} s')

    sync = torch.cuda.synchronize if adapter.device.type == 'cuda' else (lambda: None)
    times = {name: [] for name in policies}
    model_s = {name: [] for name in policies}
    method_s = {name: [] for name in policies}
    kept = {name: [] for name in policies}
    flops = {name: [] for name in policies}
    reference: list[float] = []
    total = args.warmup + args.steps
    episode = synthetic_episode(total, first.camera_names, 224 if args.checkpoint not in TINY else 128,
                                first.proprio_dim)
    with torch.inference_mode():
        for step, observation in enumerate(episode):
            for name, policy in policies.items():
                sync()
                t0 = time.perf_counter()
                out = policy.predict(observation)
                sync()
                elapsed = time.perf_counter() - t0
                if step < args.warmup:
                    continue
                record = out.record
                times[name].append(elapsed)
                model_s[name].append(record.model_seconds)
                method_s[name].append(record.selection_seconds + record.probe_seconds)
                nv = record.layout.num_visual
                kept[name].append(float(np.mean(record.visual_kept_per_layer)) / nv)
                flops[name].append(record.flops / record.flops_full)
            if not args.no_reference:
                images = [observation.images[c] for c in first.camera_names]
                sync()
                t0 = time.perf_counter()
                if adapter.kind == 'openvla-oft':
                    adapter.reference_step(images, observation.instruction, observation.proprio)
                else:
                    adapter.reference_step(images, observation.instruction)
                sync()
                if step >= args.warmup:
                    reference.append(time.perf_counter() - t0)

    base = statistics.median(times['none']) if 'none' in times else None
    rows = []
    for name in policies:
        median = statistics.median(times[name])
        rows.append({'method': name, 'median_ms': 1e3 * median,
                     'p90_ms': 1e3 * float(np.percentile(times[name], 90)),
                     'speedup': (base / median) if base else float('nan'),
                     'decoder_ms': 1e3 * statistics.median(model_s[name]),
                     'method_ms': 1e3 * statistics.median(method_s[name]),
                     'visual_kept': float(np.mean(kept[name])), 'flops': float(np.mean(flops[name]))})
    if reference:
        median = statistics.median(reference)
        rows.append({'method': 'hf-reference', 'median_ms': 1e3 * median,
                     'p90_ms': 1e3 * float(np.percentile(reference, 90)),
                     'speedup': (base / median) if base else float('nan'), 'decoder_ms': float('nan'),
                     'method_ms': float('nan'), 'visual_kept': 1.0, 'flops': 1.0})

    print(f'\n{args.steps} timed steps per method after {args.warmup} warm-up steps; speedup = median(none) / median\n')
    print('| method | median ms | p90 ms | speedup | decoder ms | method ms | visual kept | decoder FLOPs |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['method']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['decoder_ms']:.1f} | {r['method_ms']:.1f} | {100 * r['visual_kept']:.0f}% | "
              f"{100 * r['flops']:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps({'checkpoint': str(args.checkpoint), 'kind': adapter.kind,
                                         'device': str(adapter.device), 'dtype': str(adapter.dtype),
                                         'steps': args.steps, 'rows': rows}, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == '__main__':
    main()
