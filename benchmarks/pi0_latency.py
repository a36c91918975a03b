"""Latency and speedup of every pruning method on pi0 / pi0.5 (prefix on the executor, 10 expert denoising steps).

One model is loaded once; each method keeps its own temporal state. A synthetic episode (textured frames with a
block that moves, a drifting robot state) is fed to all methods round-robin, step by step, so machine noise hits
them alike; the first ``--warmup`` steps are not timed. Reported per method: median and p90 latency of one
inference (pre-processing, SigLIP, the pruned prefix, the denoising steps, method overhead), speedup over 'none',
the mean share of visual tokens entering each prefix layer, and FLOPs relative to the unpruned step (prefix,
expert, total).

    # a LeRobot checkpoint (with the PaliGemma tokenizer files copied next to it) on a GPU
    python benchmarks/pi0_latency.py --checkpoint /models/pi05_libero --device cuda --dtype bfloat16 --steps 30
    # the published pi0 shape (PaliGemma 3B + 300M expert) with random weights, no download
    python benchmarks/pi0_latency.py --checkpoint published-pi0 --cameras 3 --device cuda --dtype bfloat16
    # here: the tiny architecture-identical random checkpoints on the CPU
    python benchmarks/pi0_latency.py --checkpoint tiny-pi0 --steps 5 --threads 1
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

from specprune_ros.adapters.base import resolve_device, resolve_dtype
from specprune_ros.adapters.pi0.checkpoint import Pi0Checkpoint
from specprune_ros.adapters.pi0.configuration import parse_config
from specprune_ros.adapters.pi0.inference import Pi0Inference, load_inference
from specprune_ros.adapters.pi0.modeling import Pi0Model
from specprune_ros.adapters.pi0.processing import FeatureStats, Normalization
from specprune_ros.adapters.pi0.tiny import gemma_tokenizer, tiny_config, write_tiny_checkpoint
from specprune_ros.command_line import HelpFormatter
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.core.json_documents import strict_json
from specprune_ros.pruning import build_method

DEFAULT_METHODS = ['none', 'random', 'fastv', 'divprune', 'vla_pruner', 'vla_cache', 'specprune']
CAMERAS = ('base_0_rgb', 'left_wrist_0_rgb', 'right_wrist_0_rgb')
INSTRUCTION = 'pick up the black bowl and place it on the plate'


def published_model(policy_type: str, cameras: int, device: torch.device, dtype: torch.dtype,
                    directory: Path) -> Pi0Inference:
    """The published shape with random weights (std 0.02, norms 0) built on ``device``.

    Identity normalisation and a small stand-in tokenizer (prompt length, not wording, matters for latency).
    """
    config = parse_config(tiny_config(policy_type, CAMERAS[:cameras], state_dim=14, action_dim=14, published=True))
    with torch.device(device):
        model = Pi0Model(config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.02) if param.dim() > 1 else param.zero_()
    model.restore_buffers(device)
    gemma_tokenizer(directory)
    from transformers import AutoTokenizer  # optional heavy dependency, loaded only for this model
    identity = FeatureStats('IDENTITY')
    checkpoint = Pi0Checkpoint(directory=directory, config=config, model=model.eval(),
                               normalization=Normalization(state=identity, action=identity),
                               tokenizer=AutoTokenizer.from_pretrained(str(directory)))
    return Pi0Inference(checkpoint, device, dtype)


def synthetic_episode(steps: int, cameras: int, size: int, state_dim: int, seed: int = 0):
    """(frames, robot state) of a slowly moving coloured block over fixed textured backgrounds."""
    rng = np.random.default_rng(seed)
    backgrounds = [rng.integers(40, 200, size=(size, size, 3), dtype=np.uint8) for _ in range(cameras)]
    block = max(4, size // 8)
    state = rng.normal(scale=0.3, size=state_dim)
    for t in range(steps):
        frames = []
        for c in range(cameras):
            frame = backgrounds[c].copy()
            y, x = (8 + 3 * t + 20 * c) % (size - block), (16 + 2 * t) % (size - block)
            frame[y:y + block, x:x + block] = (230, 40 + 60 * c, 40)
            frames.append(frame)
        state = state + rng.normal(scale=0.01, size=state_dim)
        yield frames, state.copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', default='tiny-pi0',
                        help="a checkpoint directory; 'tiny-pi0' / 'tiny-pi05' (written to a temp dir); "
                             "'published-pi0' / 'published-pi05' (random weights at the published shape)")
    parser.add_argument('--cameras', type=int, default=2, help='cameras of the published / tiny shapes (1-3)')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument('--dtype', default='auto', help="'auto' (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument('--methods', nargs='+', default=DEFAULT_METHODS, help='pruning methods to time, round-robin')
    parser.add_argument('--method-config', default='{}', help='JSON: {method: {field: value}}')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per method')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps first (VLA-Pruner warms up 3 steps)')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = leave the default)')
    parser.add_argument('--json', type=Path, default=None, help='also write the results here')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = json.loads(args.method_config)
    tmp = tempfile.TemporaryDirectory()
    started = time.perf_counter()
    kind = args.checkpoint.split('-', 1)[-1]
    if args.checkpoint.startswith('tiny-'):
        directory = write_tiny_checkpoint(Path(tmp.name) / kind, kind, cameras=CAMERAS[:args.cameras])
        model = load_inference(directory, args.device, args.dtype)
    elif args.checkpoint.startswith('published-'):
        device = resolve_device(args.device)
        model = published_model(kind, args.cameras, device, resolve_dtype(args.dtype, device), Path(tmp.name))
    else:
        try:
            model = load_inference(args.checkpoint, args.device, args.dtype)
        except (CheckpointError, ValueError) as error:        # a mistyped path: one line, not a traceback
            parser.error(f'--checkpoint: {error}')
    load_s = time.perf_counter() - started
    cfg = model.config
    print(f'{cfg.policy_type} from {args.checkpoint}: {model.device} {str(model.dtype).replace("torch.", "")}, '
          f'prefix {cfg.vlm.depth} x {cfg.vlm.width}, expert {cfg.expert.depth} x {cfg.expert.width}, '
          f'{model.num_cameras} camera(s) x {cfg.tokens_per_image} patches, {cfg.num_inference_steps} denoising '
          f'steps; ready in {load_s:.1f} s')
    methods = {name: build_method(name, configs.get(name), seed=0) for name in args.methods}
    sync = torch.cuda.synchronize if model.device.type == 'cuda' else (lambda: None)
    rows = {name: {'t': [], 'kept': [], 'flops': [], 'prefix': [], 'expert': []} for name in methods}
    episode = synthetic_episode(args.warmup + args.steps, model.num_cameras, cfg.image_resolution, cfg.state_dim)
    with torch.inference_mode():
        for step, (frames, state) in enumerate(episode):
            for name, method in methods.items():
                sync()
                t0 = time.perf_counter()
                inp = model.encode(frames, INSTRUCTION, state)
                _, result, _ = model.run(inp, method, model.context(inp, step, INSTRUCTION))
                sync()
                elapsed = time.perf_counter() - t0
                if step < args.warmup:
                    continue
                record, row = result.record, rows[name]
                row['t'].append(elapsed)
                row['kept'].append(float(np.mean(record.visual_kept_per_layer)) / record.layout.num_visual)
                row['flops'].append(record.flops / record.flops_full)
                row['prefix'].append(record.info['prefix_flops'] / record.info['prefix_flops_full'])
                row['expert'].append(record.info['expert_flops'] / record.info['expert_flops_full'])
    base = statistics.median(rows['none']['t']) if 'none' in rows else None
    table = []
    for name, row in rows.items():
        median = statistics.median(row['t'])
        table.append({'method': name, 'median_ms': 1e3 * median, 'p90_ms': 1e3 * float(np.percentile(row['t'], 90)),
                      'speedup': base / median if base else float('nan'),
                      **{k: float(np.mean(row[k])) for k in ('kept', 'prefix', 'expert', 'flops')}})
    print(f'\n{args.steps} timed steps per method after {args.warmup} warm-up steps; speedup = median(none) / median\n')
    print('| method | median ms | p90 ms | speedup | visual kept | prefix FLOPs | expert FLOPs | total FLOPs |')
    print('|---|---|---|---|---|---|---|---|')
    for r in table:
        print(f"| {r['method']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{100 * r['kept']:.0f}% | {100 * r['prefix']:.0f}% | {100 * r['expert']:.0f}% | "
              f"{100 * r['flops']:.0f}% |")
    if args.json:
        args.json.write_text(strict_json({'checkpoint': args.checkpoint, 'policy_type': cfg.policy_type,
                                          'device': str(model.device), 'dtype': str(model.dtype),
                                          'steps': args.steps, 'rows': table}, indent=2))
    tmp.cleanup()


if __name__ == '__main__':
    main()
