#!/usr/bin/env python3
r"""Train the reference VLA on a demonstration directory (see specprune_ros.training.demonstrations) and export it.

    python scripts/train_reference_vla.py --data data/demos --out outputs/train \
        --export specprune_ros/assets/reference_vla --steps 6000 --max-minutes 110
Resumable: rerun with --resume to continue from outputs/train/train_state.pt, or --init-from a checkpoint
directory to continue from exported weights (fresh optimizer) when the training state is gone.
Several --data directories train on their union (e.g. expert demos plus recovery demos, see collect_demos.py).

CPU notes (measured on a 2-core machine): fp32 is faster than bf16 autocast without native bf16 support;
on an otherwise idle machine leave OpenMP's default spin-waiting (0.76 s/step at batch 16 vs 1.05 s with
OMP_WAIT_POLICY=PASSIVE), but set OMP_WAIT_POLICY=PASSIVE when other work shares the cores, since
spinning threads then slow everything down ~3x.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from specprune_ros.command_line import HelpFormatter
from specprune_ros.policy.reference_vla import ReferenceVLAConfig
from specprune_ros.training.trainer import TrainConfig, train
from specprune_ros.training.demonstrations import check_sim_fingerprint, iter_episodes, read_manifest


TRAIN_HELP = {   # TrainConfig fields
    'steps': 'optimisation steps', 'batch_size': 'samples per batch', 'lr': 'peak learning rate (cosine schedule)',
    'weight_decay': 'AdamW weight decay', 'warmup_steps': 'linear learning-rate warm-up steps',
    'shift_pixels': 'random image shift augmentation, in pixels', 'bf16': 'bf16 autocast (pays only with native bf16)',
    'threads': 'torch threads', 'seed': 'random seed', 'val_fraction': 'share of the episodes held out for validation',
    'log_every': 'steps between log lines', 'save_every': 'steps between checkpoints',
    'max_minutes': 'stop (and save) after this wall time in minutes; 0 = no limit',
    'localisation_weight': 'auxiliary loss: where the named object and the goal are; 0 = off',
    'pointing_weight': 'auxiliary loss: which patches of camera 0 show them; 0 = off',
    'token_drop_probability': 'share of batches with randomly dropped visual tokens; 0 = off',
    'token_drop_min_keep': 'each drop stage keeps at least this share of the tokens it sees',
    'token_drop_families': 'kinds of token drop, comma-separated: uniform, clustered, regions, ranked, diverse; '
                           'or all (the fair yardstick: no method\'s selections favoured)',
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--data', type=Path, nargs='+', required=True,
                        help='one or more demonstration directories (e.g. expert demos + recovery demos)')
    parser.add_argument('--out', type=Path, default=Path('outputs/train'),
                        help='directory for checkpoints and the exported model')
    parser.add_argument('--export', type=Path, default=None, help='where the final checkpoint goes')
    parser.add_argument('--resume', action='store_true', help='continue from <out>/train_state.pt')
    parser.add_argument('--init-from', type=Path, default=None,
                        help='start from an exported checkpoint (e.g. specprune_ros/assets/reference_vla)')
    parser.add_argument('--max-episodes', type=int, default=0, help='use at most this many episodes (0: all)')
    parser.add_argument('--allow-sim-mismatch', action='store_true',
                        help='train on demonstrations recorded by another version of the simulator')
    defaults = TrainConfig()
    for name, value in vars(defaults).items():
        flag = '--' + name.replace('_', '-')
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ('1', 'true', 'yes'), default=value,
                                help=TRAIN_HELP.get(name, '') + ' (true / false)')
        else:
            parser.add_argument(flag, type=type(value), default=value, help=TRAIN_HELP.get(name, ''))
    parser.add_argument('--blind-proprio', default='tcp_x,tcp_y,sin_yaw,cos_yaw',
                        help='comma-separated proprio entries hidden from the policy (copycat guard); "" for none')
    parser.add_argument('--hidden-size', type=int, default=ReferenceVLAConfig.hidden_size, help='decoder width')
    parser.add_argument('--num-layers', type=int, default=ReferenceVLAConfig.num_layers, help='decoder layers')
    parser.add_argument('--mlp-size', type=int, default=ReferenceVLAConfig.mlp_size, help='decoder MLP width')
    parser.add_argument("--num-heads", type=int, default=ReferenceVLAConfig.num_heads, help='attention heads')
    args = parser.parse_args()

    manifests = [read_manifest(root) for root in args.data]
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
    episodes = []
    for root, other in zip(args.data, manifests):
        for episode in tqdm(iter_episodes(root), total=len(other['episodes']), desc=f'load {root}'):
            if args.max_episodes and len(episodes) >= args.max_episodes:
                break
            episodes.append(episode)
    layout = list(manifest['proprio_layout'])
    blind = [name for name in args.blind_proprio.split(',') if name]
    unknown = sorted(set(blind) - set(layout))
    if unknown:
        parser.error(f'--blind-proprio: {unknown} not in the proprio layout {layout}')
    model_config = ReferenceVLAConfig(vocabulary=tuple(manifest['vocabulary']),
                                      camera_names=tuple(manifest['cameras']), image_size=manifest['image_size'],
                                      proprio_dim=len(manifest['proprio_layout']), hidden_size=args.hidden_size,
                                      num_heads=args.num_heads, num_kv_heads=args.num_heads,
                                      num_layers=args.num_layers, mlp_size=args.mlp_size,
                                      blind_proprio=tuple(layout.index(name) for name in blind))
    train_config = TrainConfig(**{name: getattr(args, name) for name in vars(defaults)})
    exported = train(model_config, train_config, episodes, args.out, resume=args.resume, export_dir=args.export,
                     init_from=args.init_from)
    print(f'checkpoint written to {exported}')


if __name__ == '__main__':
    main()
