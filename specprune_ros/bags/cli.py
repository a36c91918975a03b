"""Command lines of the ROS-free bag tools.

Console scripts ``specprune_evaluate_bag`` and ``specprune_record_sim_bag``; ``scripts/evaluate_bag.py`` and
``scripts/record_bag.py --from-sim`` call them.

``evaluate_main``: offline replay evaluation of a bag. ``record_sim_main``: simulated episodes into a bag, no DDS.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from specprune_ros.codecs.proprio import POSE_LAYOUTS
from specprune_ros.bridge.settings import TASK_FAMILIES
from specprune_ros.command_line import HelpFormatter, add_families_argument, bounded, yaml_mapping

EVALUATE_HELP = """Offline replay evaluation of a recorded bag: the same camera frames through the unpruned policy
and each pruning method; reports action deviation (from unpruned, and from the recorded commands and chunks when the
bag has them), kept tokens, latency and speedup as markdown + JSON + PNG plots. No ROS needed.

    python scripts/evaluate_bag.py outputs/bags/episode --methods specprune vla_pruner fastv --out outputs/replay
    python scripts/evaluate_bag.py robot_bag --camera agentview=/cam_front/image_raw/compressed \\
        --camera wrist=/cam_wrist/image_raw --instruction-topic /task --ee-pose-topic /arm/ee_pose \\
        --gripper-state-topic /arm/gripper --commands-topic '' --schedule every --stride 2

Cameras may be sensor_msgs/Image or CompressedImage. The proprio comes from the pose and gripper-state
topics (the newest message at or before each frame). Exit status 2 with a message for bad bags (missing
topics, wrong or unknown types, truncated files, mismatched image sizes).
"""


def parse_camera(text: str) -> tuple[str, str]:
    name, sep, topic = text.partition('=')
    if not sep or not name or not topic:
        raise argparse.ArgumentTypeError(f'expected name=topic, got {text!r}')
    return name, topic


def parse_method_config(text: str) -> tuple[str, dict]:
    name, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f"expected method='{{json}}', got {text!r}")
    try:
        return name, yaml_mapping(value)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f'{name}: {error}') from None


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=EVALUATE_HELP,
                                     formatter_class=HelpFormatter)
    parser.add_argument('bag', type=Path, help='bag directory (rosbag2, MCAP or sqlite3)')
    parser.add_argument('--model', default='reference', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--methods', nargs='+', default=['specprune', 'vla_pruner'],
                        help="pruning methods to compare with 'none' (always run)")
    parser.add_argument('--method-config', action='append', type=parse_method_config, default=[],
                        metavar="METHOD='{...}'", help="a method's knobs as YAML, e.g. vla_pruner='{keep_ratio: 0.25}'")
    parser.add_argument('--camera', action='append', type=parse_camera, default=[], metavar='NAME=TOPIC',
                        help='camera topic (default agentview=/camera/agentview/image_raw, '
                             'wrist=/camera/wrist/image_raw)')
    parser.add_argument('--instruction-topic', default='/instruction',
                        help='std_msgs/String topic with the instruction')
    parser.add_argument('--instruction', default='', help='use this instruction instead of a topic')
    parser.add_argument('--ee-pose-topic', default='/ee_pose',
                        help='geometry_msgs/PoseStamped topic with the end-effector pose')
    parser.add_argument('--gripper-state-topic', default='/gripper_state',
                        help='sensor_msgs/JointState (finger joints) or std_msgs/Float64 (finger gap) topic')
    parser.add_argument('--pose-layout', choices=tuple(POSE_LAYOUTS), default='reference',
                        help="how pose and gripper state become the policy's state: reference (the reference VLA) "
                             'or libero (OpenVLA-OFT LIBERO checkpoints), as the node\'s pose_layout')
    parser.add_argument('--finger-joints', nargs='+', default=['finger_joint1', 'finger_joint2'],
                        help='joint names of the fingers in the gripper JointState')
    parser.add_argument('--commands-topic', default='/delta_twist_cmds', help="recorded TwistStamped ('' = none)")
    parser.add_argument('--gripper-command-topic', default='/gripper_command',
                        help="recorded std_msgs/Float64 gripper commands ('' = none)")
    parser.add_argument('--chunks-topic', default='/specprune_node/action_chunk', help="recorded chunks ('' = none)")
    parser.add_argument('--inference-topic', default='/specprune_node/inference',
                        help="the node's inference records: which method and model recorded the bag ('' = none)")
    parser.add_argument('--schedule', choices=('auto', 'recorded', 'every'), default='auto',
                        help='auto: where the live node inferred when the bag has its chunks, else every frame set')
    parser.add_argument('--stride', type=bounded(int, 1), default=1,
                        help="schedule 'every': infer every N-th frame set (not used by 'recorded', which auto "
                             'picks for a bag with chunks: give --schedule every with it)')
    parser.add_argument('--max-observations', type=bounded(int, 0), default=0,
                        help='use only the first N frame sets (0: all); reading stops there')
    parser.add_argument('--max-camera-skew', type=bounded(float, 0.0, inclusive=False), default=0.05,
                        help='seconds between paired frames')
    parser.add_argument('--image-size', type=bounded(int, 0), default=0,
                        help="resize frames (0: the policy's input size)")
    parser.add_argument('--action-scale', type=bounded(float, 0.0, inclusive=False), default=1.0,
                        help="the recording node's action_scale (recorded twists back to policy actions)")
    parser.add_argument('--gripper-open-value', type=float, default=-1.0,
                        help="the recording node's gripper_open_value")
    parser.add_argument('--gripper-closed-value', type=float, default=1.0,
                        help="the recording node's gripper_closed_value")
    parser.add_argument('--device', default='cpu', help="torch device ('cpu', 'cuda', ...)")
    parser.add_argument('--seed', type=int, default=0, help='seed of the policy (random pruning, tiny-random weights)')
    parser.add_argument('--threads', type=bounded(int, 1), default=1, help='torch threads')
    parser.add_argument('--no-repeat-baseline', action='store_true', help='skip the determinism re-run of none')
    parser.add_argument('--out', type=Path, default=Path('outputs/replay'),
                        help='directory for the markdown, JSON and PNG files')
    parser.add_argument('--name', default='replay', help='file name stem of the report')
    parser.add_argument('--no-plots', action='store_true', help='write no PNG plots')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    return parser


def evaluate_main(argv: Optional[list[str]] = None) -> int:
    args = evaluate_parser().parse_args(argv)
    # imported when a command runs, not at import: --help answers without loading torch, MuJoCo or rosbags
    from specprune_ros.bags.io import BagError, BagReader
    from specprune_ros.bags.streams import COMPRESSED, IMAGE, StreamTopics, load_streams
    cameras = dict(args.camera) or None
    topics = StreamTopics(instruction=args.instruction_topic, ee_pose=args.ee_pose_topic,
                          gripper_state=args.gripper_state_topic, commands=args.commands_topic,
                          gripper_command=args.gripper_command_topic, chunks=args.chunks_topic,
                          inference=args.inference_topic, finger_joints=tuple(args.finger_joints),
                          pose_layout=args.pose_layout)
    if cameras:
        topics.cameras = cameras
    if args.out.exists() and not args.out.is_dir():
        print(f'error: --out {args.out} is a file; give a directory for the report', file=sys.stderr)
        return 2
    if args.gripper_open_value == args.gripper_closed_value:
        print('error: --gripper-open-value and --gripper-closed-value must differ', file=sys.stderr)
        return 2
    try:   # the bag first (fast): a broken bag should not wait for torch and the model to load
        with BagReader(args.bag) as bag:
            for name, topic in topics.normalized().cameras.items():
                bag.require(topic, (IMAGE, COMPRESSED), f'camera {name!r}')
    except BagError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    # the evaluation loads torch and the models: only when the command runs
    from specprune_ros.bags.replay_eval import (ReplayConfig, check_instructions, evaluate_streams,
                                                unused_stride_note)
    from specprune_ros.bags.report import markdown, write_report  # lazy, see above
    from specprune_ros.bridge.conversions import CommandUnits  # lazy, see above
    from specprune_ros.models.loading import load_policy   # lazy, see above
    from specprune_ros.policy.errors import CheckpointError  # lazy, see above
    from specprune_ros.pruning import build_method  # lazy, see above
    config = ReplayConfig(model=args.model, methods=tuple(args.methods), method_configs=dict(args.method_config),
                          seed=args.seed, device=args.device, schedule=args.schedule, stride=args.stride,
                          repeat_baseline=not args.no_repeat_baseline, progress=not args.quiet)
    try:
        device_error = unusable_device(args.device)
        if device_error:
            raise ValueError(device_error)
        for method in dict.fromkeys(['none', *config.methods]):     # every name and config before any run
            build_method(method, config.method_configs.get(method), seed=args.seed)
        unknown = sorted(set(config.method_configs) - {'none', *config.methods})
        if unknown:
            raise ValueError(f'--method-config names {unknown}, which --methods does not run')
        # the unpruned policy (its input size and action units; it then runs the baseline)
        baseline = load_policy(args.model, 'none', config.method_configs.get('none'), device=args.device,
                               dtype=config.dtype, seed=args.seed)
        spec = baseline.action_spec
        size = (args.image_size, args.image_size) if args.image_size else tuple(baseline.image_size)
        units = CommandUnits(translation_scale_m=spec.translation_scale_m * args.action_scale,
                             rotation_scale_rad=spec.rotation_scale_rad * args.action_scale,
                             period_s=spec.control_period_s, gripper_open_value=args.gripper_open_value,
                             gripper_closed_value=args.gripper_closed_value)
        streams = load_streams(args.bag, topics, image_size=size, max_camera_skew_s=args.max_camera_skew,
                               units=units, instruction=args.instruction, max_observations=args.max_observations,
                               image_fit=getattr(baseline, 'image_fit', 'stretch'))
        check_instructions(streams, baseline)
        report = evaluate_streams(streams, config, baseline_policy=baseline)
        stride_note = unused_stride_note(report['schedule'], args.stride)
        if stride_note:
            print(f'note: {stride_note}', file=sys.stderr)
        paths = write_report(report, args.out, args.name, plots=not args.no_plots)
    except (BagError, CheckpointError, ValueError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(markdown(report))
    print('wrote ' + ', '.join(str(p) for p in paths.values()))
    return 0


def unusable_device(device: str) -> str:
    """Why torch cannot run on ``device`` here ('' when it can)."""
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        return f'--device {device!r}: {error}'
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        return f'--device {device!r}: this torch has no usable CUDA device'
    if parsed.type == 'cuda' and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f'--device {device!r}: only {torch.cuda.device_count()} CUDA devices'
    if parsed.type == 'mps' and not torch.backends.mps.is_available():
        return f'--device {device!r}: MPS is not available'
    return ''


RECORD_SIM_HELP = """Record simulated episodes straight into a bag, no DDS: the sim bridge's topics and stamps (bag
time = sim time), acted by the scripted expert or by a policy executing its chunks as the ROS-free harness does.
A policy's bag also holds its chunks and, as the node publishes them, inference records naming method and model.

    specprune_record_sim_bag outputs/bags/expert_pick --families pick --seeds 1000000 1000001
    specprune_record_sim_bag outputs/bags/policy --actor policy --model reference --method none --storage sqlite3
"""


def record_sim_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=RECORD_SIM_HELP,
                                     formatter_class=HelpFormatter)
    parser.add_argument('output', type=Path, help='bag directory to create (must not exist)')
    parser.add_argument('-s', '--storage', choices=('mcap', 'sqlite3'), default='mcap', help='bag storage format')
    add_families_argument(parser, TASK_FAMILIES, ['pick'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[1_000_000],
                        help='episode seeds; every family runs every seed')
    parser.add_argument('--actor', choices=('expert', 'policy'), default='expert',
                        help='who acts: the scripted expert, or a policy executing its chunks')
    parser.add_argument('--model', default='reference', help='policy actor: model')
    parser.add_argument('--method', default='none', help='policy actor: pruning method')
    parser.add_argument('--method-config', default='', help='policy actor: the method knobs as YAML')
    parser.add_argument('--execute-steps', type=int, default=0, help='policy actor: actions per chunk (0: all)')
    parser.add_argument('--max-steps', type=int, default=0, help='per episode (0: the task limit)')
    parser.add_argument('--image-size', type=int, default=96, help='camera frame side in pixels')
    parser.add_argument('--compressed', action='store_true', help='JPEG CompressedImage on <camera topic>/compressed')
    return parser


def record_sim_main(argv: Optional[list[str]] = None) -> int:
    args = record_sim_parser().parse_args(argv)
    if args.output.exists():
        print(f'error: {args.output} exists already; bags are never overwritten', file=sys.stderr)
        return 2
    # imported when the command runs: --help answers without loading torch or MuJoCo
    from specprune_ros.bags.io import BagError
    from specprune_ros.bags.sim_bag import SimBagOptions, record_sim_bag
    from specprune_ros.policy.errors import CheckpointError  # lazy, see above
    policy = None
    try:
        if args.actor == 'policy':
            import torch
            import yaml
            torch.set_num_threads(1)
            from specprune_ros.models.loading import load_policy   # torch: only when a model is needed
            config = yaml.safe_load(args.method_config) if args.method_config else None
            policy = load_policy(args.model, args.method, config)
        options = SimBagOptions(families=args.families, seeds=args.seeds, actor=args.actor, max_steps=args.max_steps,
                                image_size=args.image_size, compressed=args.compressed, storage=args.storage,
                                execute_steps=args.execute_steps,
                                method=args.method if args.actor == 'policy' else '',
                                model=args.model if args.actor == 'policy' else '')
        result = record_sim_bag(args.output, options, policy=policy)
    except (BagError, CheckpointError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    for family, seed, success, steps in result.episodes:
        print(f"{family} seed {seed}: {'success' if success else 'failure'} in {steps} steps")
    print(f'wrote {sum(result.counts.values())} messages to {args.output}: '
          + ', '.join(f'{t} {n}' for t, n in sorted(result.counts.items())))
    return 0
