#!/usr/bin/env python3
"""Collect scripted-expert demonstrations of the simulated tabletop tasks into a dataset directory.

Example:  python scripts/collect_demos.py --out data/demos --episodes-per-family 50 --workers 2
Recovery demonstrations from the states a trained policy reaches (the policy drives, then the expert takes over):
          python scripts/collect_demos.py --out data/recovery --takeover-model reference --seed-start 100000
Rerunning into the same --out with a larger --episodes-per-family collects only the missing episodes, and a rerun
after an interruption continues where it stopped; other --noise or --takeover-model settings are refused there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from specprune_ros.command_line import (HelpFormatter, add_families_argument, non_negative_float, non_negative_int,
                                        positive_int)

os.environ.setdefault('MUJOCO_GL', 'egl')


def main(argv: list[str] | None = None) -> int:
    # imported after MUJOCO_GL is set above: the simulator picks its renderer when it is first imported
    from specprune_ros.training.demonstrations import collect_demonstrations, image_size_problem
    from specprune_ros.sim.tasks import TASK_FAMILIES, TRAIN_SEED_START

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--out', required=True, help='output directory (manifest.json + episodes/*.npz)')
    add_families_argument(p, TASK_FAMILIES, list(TASK_FAMILIES), noun='task families to demonstrate')
    p.add_argument('--episodes-per-family', type=positive_int, default=50, help='demonstrations of each family')
    p.add_argument('--seed-start', type=non_negative_int, default=TRAIN_SEED_START,
                   help='first seed (training seeds start at TRAIN_SEED_START, evaluation at EVAL_SEED_START)')
    p.add_argument('--workers', type=positive_int, default=2, help='worker processes')
    p.add_argument('--noise', type=non_negative_float, default=0.1,
                   help='expert action noise std (normalised units); 0 = none')
    p.add_argument('--image-size', type=positive_int, default=96,
                   help='camera frame side in pixels: a multiple of the reference VLA\'s patch size (8)')
    p.add_argument('--takeover-model', default=None,
                   help='recovery demonstrations: this policy checkpoint drives first, then the expert takes over')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    args = p.parse_args(argv)
    problem = image_size_problem(args.image_size)
    if problem:
        p.error(f'--image-size: {problem}')

    t0 = time.time()
    try:
        manifest = collect_demonstrations(args.out, families=args.families,
                                          episodes_per_family=args.episodes_per_family,
                                          seed_start=args.seed_start, noise=args.noise, workers=args.workers,
                                          image_size=args.image_size, progress=not args.quiet,
                                          takeover_model=args.takeover_model)
    except ValueError as error:       # settings, seeds or a directory of other settings, refused up front
        p.error(str(error))
    summary = {f: sum(1 for e in manifest['episodes'] if e['family'] == f) for f in args.families}
    print(json.dumps({'out': args.out, 'episodes': summary, 'attempts': manifest['attempts'],
                      'seconds': round(time.time() - t0, 1)}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
