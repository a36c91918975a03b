#!/usr/bin/env python3
"""How much of the push target zone each pruning method keeps in the fixed camera, in closed loop.

The push family needs the painted target zone, a static region of the table. For every policy step of a few
held-out push episodes, the zone (a 7 x 7 grid of points over it) and the target object are projected into the
agentview image; the script prints the fraction of those patches still present at a decoder layer, and how
spread out the kept patches are: the share of the image's 3 x 3-patch cells that keep at least one patch
(a random subset of 25% touches most cells; an attention top-k clusters on a few).

    python scripts/zone_coverage.py --configs none specprune specprune_static 'vla_pruner:{"keep_ratio": 0.25}'
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Optional

import numpy as np
import torch

from specprune_ros.command_line import HelpFormatter, positive_int
from specprune_ros.evaluation.closed_loop import run_episode
from specprune_ros.policy.interface import Observation
from specprune_ros.models.loading import REFERENCE_CHECKPOINT, load_policy
from specprune_ros.policy.reference_checkpoint import read_config
from specprune_ros.sim import EVAL_SEED_START, TabletopEnv
from specprune_ros.sim.projection import project_to_image

CAMERA = 'agentview'
CELL = 3   # patches per side of a spread cell


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


class CoverageProbe:
    """Wraps a policy: after each prediction, notes which zone / target patches survive to ``layer``."""

    def __init__(self, policy, env: TabletopEnv, layer: int) -> None:
        self.policy, self.env, self.layer = policy, env, layer
        self.zone_kept: list[float] = []
        self.object_kept: list[float] = []
        self.cells_touched: list[float] = []
        self._zone_patches: Optional[set[int]] = None   # the zone and the camera are fixed within an episode

    def reset(self) -> None:
        self.policy.reset()
        self._zone_patches = None

    def predict(self, observation: Observation):
        output = self.policy.predict(observation)
        layout = output.record.layout
        kept = set((output.record.kept_per_layer[self.layer] - layout.camera_spans[0][0]).tolist())
        if self._zone_patches is None:
            self._zone_patches = patches_under(self.env, zone_points(self.env), layout.grid_shape)
        target = self.env.sim_state().objects[self.env.task.target].pos[None]
        target_patches = patches_under(self.env, target, layout.grid_shape)
        for patches, out in ((self._zone_patches, self.zone_kept), (target_patches, self.object_kept)):
            if patches:
                out.append(len(patches & kept) / len(patches))
        self.cells_touched.append(cells_touched(kept, layout.grid_shape))
        return output


def cells_touched(kept: set[int], grid: tuple[int, int]) -> float:
    """Share of the camera's CELL x CELL-patch cells holding at least one of the ``kept`` patches.

    ``kept``: row-major indices within the camera; others are ignored.
    """
    rows, cols = grid
    cells = {(k // cols // CELL, k % cols // CELL) for k in kept if 0 <= k < rows * cols}
    return len(cells) / (math.ceil(rows / CELL) * math.ceil(cols / CELL))


def coverage(method: str, config: dict, episodes: int, layer: int) -> dict[str, float]:
    """Mean fraction of the zone's and of the target object's patches present at ``layer`` over all steps."""
    env = TabletopEnv(image_size=96)
    probe = CoverageProbe(load_policy('reference', method, config, seed=0), env, layer)
    for seed in range(EVAL_SEED_START, EVAL_SEED_START + episodes):
        run_episode(env, probe, 'push', seed)
    return {'zone': float(np.mean(probe.zone_kept)), 'object': float(np.mean(probe.object_kept)),
            'cells': float(np.mean(probe.cells_touched)), 'steps': len(probe.zone_kept)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--configs', nargs='+', default=['none', 'specprune', 'specprune_static',
                                                         'vla_pruner:{"keep_ratio": 0.5}',
                                                         'vla_pruner:{"keep_ratio": 0.25}'],
                        help="method names, optionally 'name:{json config}'")
    parser.add_argument('--episodes', type=positive_int, default=8, help='episodes per configuration')
    parser.add_argument('--layer', type=int, default=-1,
                        help='decoder layer whose input is inspected (negative: counted from the last)')
    args = parser.parse_args(argv)
    depth = read_config(REFERENCE_CHECKPOINT)[0].num_layers
    if not -depth <= args.layer < depth:
        parser.error(f'--layer {args.layer}: the reference VLA has {depth} decoder layers')
    torch.set_num_threads(2)
    print('| config | zone patches kept | target patches kept | 3x3 cells touched | steps |\n|---|---|---|---|---|')
    for entry in args.configs:
        name, _, text = entry.partition(':')
        result = coverage(name, json.loads(text) if text else {}, args.episodes, args.layer)
        print(f"| {entry} | {result['zone']:.2f} | {result['object']:.2f} | {result['cells']:.2f} | "
              f"{result['steps']} |")


if __name__ == '__main__':
    main()
