#!/usr/bin/env python3
r"""Train the reference VLA on a demonstration directory (see specprune_ros.training.demonstrations) and export it.

    python scripts/train_reference_vla.py --data data/demos --out outputs/train \
        --export specprune_ros/assets/reference_vla --steps 6000 --max-minutes 110
Resumable: rerun with --resume to continue from outputs/train/train_state.pt (--max-minutes limits each run, so
the same command continues for as long again), or --init-from a checkpoint directory to continue from exported
weights (fresh optimizer) when the training state is gone. A run without --resume refuses an --out that holds a
training state unless --overwrite is given.
Several --data directories train on their union (e.g. expert demos plus recovery demos, see collect_demos.py). The
validation set is whole layouts: every episode of a held-out (family, seed), from any directory, is left out of
training, so expert and recovery demonstrations of one layout never sit on both sides.
All settings are checked before any episode is loaded.

CPU notes (measured on a 2-core machine): fp32 is faster than bf16 autocast without native bf16 support;
on an otherwise idle machine leave OpenMP's default spin-waiting (0.76 s/step at batch 16 vs 1.05 s with
OMP_WAIT_POLICY=PASSIVE), but set OMP_WAIT_POLICY=PASSIVE when other work shares the cores, since
spinning threads then slow everything down ~3x.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from specprune_ros.command_line import (HelpFormatter, boolean, float_in, non_negative_float, non_negative_int,
                                        positive_float, positive_int)
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.reference_checkpoint import read_config
from specprune_ros.policy.reference_vla import ReferenceVLAConfig
from specprune_ros.training.trainer import TrainConfig, check_run_directory, split_by_layout, train
from specprune_ros.training.demonstrations import check_sim_fingerprint, read_episode, read_manifest, select_entries


TRAIN_HELP = {   # TrainConfig fields
    'steps': 'optimisation steps', 'batch_size': 'samples per batch', 'lr': 'peak learning rate (cosine schedule)',
    'weight_decay': 'AdamW weight decay', 'warmup_steps': 'linear learning-rate warm-up steps',
    'shift_pixels': 'random image shift augmentation, in pixels', 'bf16': 'bf16 autocast (pays only with native bf16)',
    'threads': 'torch threads', 'seed': 'random seed',
    'val_fraction': 'share of the episodes held out for validation, as whole layouts (family, seed) across all '
                    '--data directories; 0 = none',
    'log_every': 'steps between log lines', 'save_every': 'steps between checkpoints',
    'max_minutes': 'stop (and save) after this run has trained this many minutes; --resume continues for as long '
                   'again (the learning-rate schedule counts the minutes of all runs); 0 = no limit',
    'localisation_weight': 'auxiliary loss: where the named object and the goal are; 0 = off',
    'pointing_weight': 'auxiliary loss: which patches of camera 0 show them; 0 = off',
    'token_drop_probability': 'share of batches with randomly dropped visual tokens; 0 = off',
    'token_drop_min_keep': 'each drop stage keeps at least this share of the tokens it sees, in (0, 1]',
    'token_drop_families': 'kinds of token drop, comma-separated: uniform, clustered, regions, ranked, diverse; '
                           'or all (the fair yardstick: no method\'s selections favoured)',
}
TRAIN_TYPES = {   # argparse types of the TrainConfig fields; the rest take their default's type
    'steps': positive_int, 'batch_size': positive_int, 'log_every': positive_int, 'save_every': positive_int,
    'threads': positive_int, 'warmup_steps': non_negative_int, 'shift_pixels': non_negative_int,
    'seed': non_negative_int, 'lr': positive_float, 'weight_decay': non_negative_float,
    'max_minutes': non_negative_float, 'localisation_weight': non_negative_float,
    'pointing_weight': non_negative_float, 'val_fraction': float_in(0, 1, high_open=True),
    'token_drop_probability': float_in(0, 1), 'token_drop_min_keep': float_in(0, 1, low_open=True),
}
SIZE_FLAGS = ('hidden_size', 'num_layers', 'mlp_size', 'num_heads')


def writable_problem(path: Path) -> Optional[str]:
    """Why a directory could not be created or written at ``path``; None if it can."""
    if path.exists() and not path.is_dir():
        return f'{path} exists and is not a directory'
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f'{existing} is not a directory'
    if not os.access(existing, os.W_OK | os.X_OK):
        return f'{existing} is not writable'
    return None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--data', type=Path, nargs='+', required=True,
                        help='one or more demonstration directories (e.g. expert demos + recovery demos)')
    parser.add_argument('--out', type=Path, default=Path('outputs/train'),
                        help='directory for checkpoints and the exported model')
    parser.add_argument('--export', type=Path, default=None, help='where the final checkpoint goes')
    start = parser.add_mutually_exclusive_group()
    start.add_argument('--resume', action='store_true', help='continue from <out>/train_state.pt (must exist)')
    start.add_argument('--overwrite', action='store_true',
                       help='start over in an --out that holds a training state, replacing it and its loss log')
    parser.add_argument('--init-from', type=Path, default=None,
                        help='start from an exported checkpoint (e.g. specprune_ros/assets/reference_vla); the model '
                             'sizes are the checkpoint\'s')
    parser.add_argument('--max-episodes', type=non_negative_int, default=0,
                        help='use at most this many episodes, the same number from every family of every --data '
                             'directory, lowest seeds first (0: all)')
    parser.add_argument('--allow-sim-mismatch', action='store_true',
                        help='train on demonstrations recorded by another version of the simulator')
    defaults = TrainConfig()
    for name, value in vars(defaults).items():
        flag = '--' + name.replace('_', '-')
        if isinstance(value, bool):
            parser.add_argument(flag, type=boolean, nargs='?', const=True, default=value,
                                help=TRAIN_HELP.get(name, '') + ' (alone or true / false)')
        else:
            parser.add_argument(flag, type=TRAIN_TYPES.get(name, type(value)), default=value,
                                help=TRAIN_HELP.get(name, ''))
    parser.add_argument('--blind-proprio', default='tcp_x,tcp_y,sin_yaw,cos_yaw',
                        help='comma-separated proprio entries hidden from the policy (copycat guard); "" for none')
    for name, text in (('hidden_size', 'decoder width'), ('num_layers', 'decoder layers'),
                       ('mlp_size', 'decoder MLP width'), ('num_heads', 'attention heads')):
        parser.add_argument('--' + name.replace('_', '-'), type=positive_int, default=None,
                            help=f'{text} (default: {getattr(ReferenceVLAConfig, name)}; not with --init-from)')
    args = parser.parse_args(argv)

    if len({root.resolve() for root in args.data}) < len(args.data):
        parser.error('--data names a directory twice; its episodes would count twice')
    train_config = TrainConfig(**{name: getattr(args, name) for name in vars(defaults)})
    try:
        train_config.check()
        check_run_directory(args.out, args.resume, args.overwrite)
    except ValueError as error:
        parser.error(str(error))
    for flag, path in (('--out', args.out), ('--export', args.export)):
        problem = path is not None and writable_problem(path)
        if problem:
            parser.error(f'{flag}: {problem}')
    manifests = []
    for root in args.data:
        try:
            manifests.append(read_manifest(root))
        except (OSError, ValueError) as error:
            parser.error(f'--data {root}: {error}')
    manifest = manifests[0]
    for root, other in zip(args.data, manifests):
        if not args.allow_sim_mismatch:
            try:
                check_sim_fingerprint(other, root)
            except ValueError as error:
                parser.error(str(error))
        for key in ('image_size', 'cameras', 'proprio_layout', 'vocabulary'):
            if other[key] != manifest[key]:
                parser.error(f'{root} and {args.data[0]} differ in {key}: {other[key]} vs {manifest[key]}')
    model_config = model_settings(parser, args, manifest)
    chosen = select_entries(list(zip(args.data, manifests)), args.max_episodes)
    try:
        split_by_layout([(entry['family'], entry['seed']) for _, entry in chosen], train_config.val_fraction,
                        train_config.seed)
    except ValueError as error:
        parser.error(f'{len(chosen)} episodes: {error}')
    episodes = [read_episode(root / entry['file']) for root, entry in tqdm(chosen, desc='load')]
    exported = train(model_config, train_config, episodes, args.out, resume=args.resume, export_dir=args.export,
                     init_from=args.init_from, overwrite=args.overwrite)
    print(f'checkpoint written to {exported}')


def model_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, manifest: dict) -> ReferenceVLAConfig:
    """The model config the data and flags ask for; parser.error for one the data or --init-from cannot serve."""
    layout = list(manifest['proprio_layout'])
    blind = [name for name in args.blind_proprio.split(',') if name]
    unknown = sorted(set(blind) - set(layout))
    if unknown:
        parser.error(f'--blind-proprio: {unknown} not in the proprio layout {layout}')
    data = dict(vocabulary=tuple(manifest['vocabulary']), camera_names=tuple(manifest['cameras']),
                image_size=manifest['image_size'], proprio_dim=len(layout))
    if args.init_from is not None:
        given = ['--' + name.replace('_', '-') for name in SIZE_FLAGS if getattr(args, name) is not None]
        if given:
            parser.error(f'--init-from takes the model sizes from the checkpoint; drop {" ".join(given)}')
        try:
            ancestor, _ = read_config(args.init_from)
        except CheckpointError as error:
            parser.error(f'--init-from: {error}')
        for key, value in data.items():
            if getattr(ancestor, key) != value:
                parser.error(f'--init-from {args.init_from} has {key} {getattr(ancestor, key)}, the data {value}')
    sizes = {name: getattr(args, name) or getattr(ReferenceVLAConfig, name) for name in SIZE_FLAGS}
    if sizes['hidden_size'] % sizes['num_heads']:
        parser.error(f'--hidden-size {sizes["hidden_size"]} is not a multiple of --num-heads {sizes["num_heads"]}')
    try:
        return ReferenceVLAConfig(**data, hidden_size=sizes['hidden_size'], num_heads=sizes['num_heads'],
                                  num_kv_heads=sizes['num_heads'], num_layers=sizes['num_layers'],
                                  mlp_size=sizes['mlp_size'], blind_proprio=tuple(layout.index(n) for n in blind))
    except ValueError as error:
        parser.error(f'the data ({manifest["image_size"]} px) and the model do not fit: {error}')


if __name__ == '__main__':
    main()
