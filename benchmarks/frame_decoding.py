#!/usr/bin/env python3
"""Compressed camera frames to the policy input: full JPEG decode against libjpeg's reduced-scale decode.

The node decodes every ``sensor_msgs/CompressedImage`` in its executor thread, then shrinks it to the policy input.
With ``jpeg_scaled_decode`` (default on) a JPEG at least twice the input is decoded at 1/2, 1/4 or 1/8 scale. For
each camera size this script renders MuJoCo tabletop frames (both cameras, a closed-loop scripted episode; square
renders centre-cropped to the camera's aspect, Gaussian sensor noise added so the JPEG is not unrealistically
flat), encodes them as a camera driver would, and times both paths interleaved, frame by frame:

    decode + resize = decode_compressed_frame(...) then resize_to(policy input), the node's own calls

It reports medians (p10-p90) in ms, the speedup with a 95% bootstrap interval of the ratio of medians, the scale
chosen, and how far the two policy inputs differ (mean and 99th percentile of |difference| in grey levels).

    python benchmarks/frame_decoding.py --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deployment_latency as harness  # noqa: E402  (git_commit, cpu_info, write_json_and_markdown)

from specprune_ros.codecs.image_decoding import decode_compressed_frame, jpeg_scale, resize_to  # noqa: E402
from specprune_ros.command_line import HelpFormatter  # noqa: E402
from specprune_ros.evaluation.statistics import median_ratio, percentile  # noqa: E402

CAMERA_SIZES = ('640x480', '1280x720', '1920x1080', '2560x1440')


def camera_frames(width: int, height: int, count: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    """``count`` RGB frames of ``width`` x ``height``: both cameras along a scripted 'place' episode."""
    from specprune_ros.sim import ScriptedExpert, TabletopEnv   # MuJoCo: only when the benchmark runs
    side = max(width, height)
    env = TabletopEnv(family='place', seed=seed, image_size=side, supersample=1)
    expert = ScriptedExpert(env)
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    observation = env.reset(seed=seed)
    top, left = (side - height) // 2, (side - width) // 2
    while len(frames) < count:
        for image in observation.images.values():
            crop = image[top:top + height, left:left + width].astype(np.float32)
            frames.append(np.clip(crop + rng.normal(0.0, noise, crop.shape), 0, 255).astype(np.uint8))
        for _ in range(3):
            observation, done, _ = env.step(expert.act(observation))
            if done:
                observation = env.reset(seed=seed + len(frames))
    env.close()
    return frames[:count]


def _stats(values: list[float]) -> dict:
    return {'median': float(np.median(values)), 'p10': percentile(values, 10), 'p90': percentile(values, 90)}


def measure(size: str, args: argparse.Namespace) -> dict:
    """Both decode paths of ``args.frames`` JPEG frames of ``size``, interleaved, ``args.repeats`` times each."""
    width, height = (int(side) for side in size.split('x'))
    policy_input = (args.input, args.input)
    encoded = [cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, args.quality])[1].tobytes()
               for rgb in camera_frames(width, height, args.frames, args.noise)]
    paths = {'full': None, 'scaled': policy_input}
    times: dict[str, list[float]] = {name: [] for name in paths}
    differences: list[np.ndarray] = []
    for repeat in range(args.repeats):
        for index, data in enumerate(encoded):
            order = list(paths) if (repeat + index) % 2 == 0 else list(reversed(paths))
            outputs = {}
            for name in order:
                start = time.perf_counter()
                outputs[name] = resize_to(decode_compressed_frame(data, 'jpeg', paths[name]).pixels, policy_input)
                times[name].append((time.perf_counter() - start) * 1e3)
            if repeat == 0:
                differences.append(np.abs(outputs['full'].astype(np.int16) - outputs['scaled'].astype(np.int16)))
    speedup, low, high = median_ratio(times['full'], times['scaled'])
    difference = np.concatenate([d.ravel() for d in differences])
    return {'camera': size, 'jpeg_kB': float(np.mean([len(d) for d in encoded]) / 1e3),
            'scale': jpeg_scale(width, height, policy_input), 'full_ms': _stats(times['full']),
            'scaled_ms': _stats(times['scaled']), 'speedup': speedup, 'speedup_ci95': [low, high],
            'mean_abs_difference': float(difference.mean()),
            'p99_abs_difference': float(np.percentile(difference, 99))}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ['# Compressed frames: full against reduced-scale JPEG decode', '',
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}; date: {meta['date']}  ",
             f"Device: {meta['device']}; OpenCV {meta['opencv']}  ",
             f"Frames: {meta['frames']} per camera size (MuJoCo tabletop, both cameras, Gaussian noise sigma "
             f"{meta['noise']:g}), JPEG quality {meta['quality']}, policy input {meta['input']} x {meta['input']}; "
             f"{meta['repeats']} interleaved repeats", '',
             'Times are medians (p10-p90) in ms of decode + resize to the policy input, as the node does it per '
             'frame. Difference: |full - scaled| of the policy input, in grey levels (0-255).', '',
             '| camera | JPEG kB | scale | full decode | scaled decode | speedup (95% CI) | mean diff | p99 diff |',
             '|---|---|---|---|---|---|---|---|']
    for row in rows:
        full, scaled = row['full_ms'], row['scaled_ms']
        lines.append(f"| {row['camera']} | {row['jpeg_kB']:.0f} | 1/{row['scale']} | {full['median']:.2f} "
                     f"({full['p10']:.2f}-{full['p90']:.2f}) | {scaled['median']:.2f} ({scaled['p10']:.2f}-"
                     f"{scaled['p90']:.2f}) | {row['speedup']:.2f}x ({row['speedup_ci95'][0]:.2f}-"
                     f"{row['speedup_ci95'][1]:.2f}) | {row['mean_abs_difference']:.2f} | "
                     f"{row['p99_abs_difference']:.0f} |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=list(CAMERA_SIZES), help='camera sizes, WIDTHxHEIGHT')
    parser.add_argument('--input', type=int, default=224, help='policy input side (pixels)')
    parser.add_argument('--frames', type=int, default=20, help='frames per camera size')
    parser.add_argument('--repeats', type=int, default=5, help='timed decodes of each frame per path')
    parser.add_argument('--quality', type=int, default=80, help='JPEG quality (image_transport default: 80)')
    parser.add_argument('--noise', type=float, default=4.0, help='sensor noise sigma added to renders (grey levels)')
    parser.add_argument('--threads', type=int, default=1, help='OpenCV threads (the node decodes in one thread)')
    parser.add_argument('--out', type=Path, default=Path('outputs/benchmarks'), help='folder for the JSON and table')
    parser.add_argument('--name', default='frame_decoding', help='output file stem')
    args = parser.parse_args(argv)
    for size in args.sizes:
        if not all(side.isdigit() and int(side) > 0 for side in size.split('x')) or size.count('x') != 1:
            parser.error(f'--sizes: {size!r} is not WIDTHxHEIGHT')
    cv2.setNumThreads(args.threads)
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args))
        row = rows[-1]
        print(f"{size:>10s}: full {row['full_ms']['median']:.2f} ms, 1/{row['scale']} {row['scaled_ms']['median']:.2f}"
              f" ms, {row['speedup']:.2f}x, mean diff {row['mean_abs_difference']:.2f}", flush=True)
    arguments = argv if argv is not None else sys.argv[1:]
    meta = {'command': 'python benchmarks/frame_decoding.py ' + shlex.join(arguments), 'commit': harness.git_commit(),
            'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'device': f"CPU ({harness.cpu_info('model name') or 'unknown'}), {args.threads} OpenCV thread(s)",
            'opencv': cv2.__version__, 'frames': args.frames, 'noise': args.noise, 'quality': args.quality,
            'input': args.input, 'repeats': args.repeats}
    report = {'meta': meta, 'rows': rows}
    harness.write_json_and_markdown(args.out, args.name, report, markdown(meta, rows))
    return report


if __name__ == '__main__':
    main()
