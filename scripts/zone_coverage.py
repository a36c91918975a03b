#!/usr/bin/env python3
"""How much of the push target zone each pruning method keeps in the fixed camera, in closed loop.

The push family needs the painted target zone, a static region of the table. For every policy step of a few
held-out push episodes, the zone (a 7 x 7 grid of points over it) and the target object are projected into the
agentview image; the script prints the fraction of those patches still present at a decoder layer.

    python scripts/zone_coverage.py --configs none specprune specprune_static 'vla_pruner:{"keep_ratio": 0.25}'
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from specprune_ros.policy.interface import Observation
from specprune_ros.policy.loading import load_policy
from specprune_ros.sim import EVAL_SEED_START, TabletopEnv
from specprune_ros.sim.projection import project_to_image

CAMERA = 'agentview'


def patches_under(env: TabletopEnv, points: np.ndarray, grid: tuple[int, int]) -> set[int]:
    """Indices (row-major, within the camera) of the patches the world ``points`` fall into."""
    size = env.image_size
    pixels = project_to_image(env.model, env.data, CAMERA, points, size)
    inside = np.isfinite(pixels).all(1) & (pixels >= 0).all(1) & (pixels < size).all(1)
    column, row = (pixels[inside] * np.array(grid[::-1]) / size).astype(int).T
    return set((row * grid[1] + column).tolist())


def zone_points(env: TabletopEnv, per_side: int = 7) -> np.ndarray:
    zone = env.sim_state().zones[env.task.zone]
    (cx, cy), (hx, hy) = zone.centre, zone.half_size
    return np.array([[x, y, 0.0] for x in np.linspace(cx - hx, cx + hx, per_side)
                     for y in np.linspace(cy - hy, cy + hy, per_side)])


def coverage(method: str, config: dict, episodes: int, layer: int) -> dict[str, float]:
    """Mean fraction of the zone's and of the target object's patches present at ``layer`` over all steps."""
    policy = load_policy('reference', method, config, seed=0)
    env = TabletopEnv(image_size=96)
    zone_kept: list[float] = []
    object_kept: list[float] = []
    for seed in range(EVAL_SEED_START, EVAL_SEED_START + episodes):
        observation = env.reset(seed=seed, family='push')
        policy.reset()
        executed, done = None, False
        while not done:
            output = policy.predict(Observation(images=observation.images, instruction=observation.instruction,
                                                proprio=observation.proprio, executed_actions=executed))
            record = output.record
            layout = record.layout
            first = layout.camera_spans[0][0]
            kept = set((record.kept_per_layer[layer] - first).tolist())
            for points, out in ((zone_points(env), zone_kept),
                                (env.sim_state().objects[env.task.target].pos[None], object_kept)):
                patches = patches_under(env, points, layout.grid_shape)
                if patches:
                    out.append(len(patches & kept) / len(patches))
            for index, action in enumerate(output.actions):
                observation, done, _ = env.step(action, render=index == len(output.actions) - 1)
                if done:
                    break
            executed = output.actions
    return {'zone': float(np.mean(zone_kept)), 'object': float(np.mean(object_kept)), 'steps': len(zone_kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='+', default=['none', 'specprune', 'specprune_static',
                                                         'vla_pruner:{"keep_ratio": 0.5}',
                                                         'vla_pruner:{"keep_ratio": 0.25}'],
                        help="method names, optionally 'name:{json config}'")
    parser.add_argument('--episodes', type=int, default=8)
    parser.add_argument('--layer', type=int, default=-1, help='decoder layer whose input is inspected')
    args = parser.parse_args()
    torch.set_num_threads(2)
    print('| config | zone patches kept | target patches kept | steps |\n|---|---|---|---|')
    for entry in args.configs:
        name, _, text = entry.partition(':')
        result = coverage(name, json.loads(text) if text else {}, args.episodes, args.layer)
        print(f"| {entry} | {result['zone']:.2f} | {result['object']:.2f} | {result['steps']} |")


if __name__ == '__main__':
    main()
