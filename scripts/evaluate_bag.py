#!/usr/bin/env python3
r"""Offline replay evaluation of a recorded bag.

The same camera frames through the unpruned policy and each pruning method; reports action deviation (from unpruned, and
from the recorded commands and chunks when the bag has them), kept tokens, latency and speedup as markdown + JSON + PNG
plots. No ROS needed.

    python scripts/evaluate_bag.py outputs/bags/episode --methods specprune vla_pruner fastv --out outputs/replay
    python scripts/evaluate_bag.py robot_bag --camera agentview=/cam_front/image_raw/compressed \
        --camera wrist=/cam_wrist/image_raw --instruction-topic /task --ee-pose-topic /arm/ee_pose \
        --gripper-state-topic /arm/gripper --commands-topic '' --schedule every --stride 2

``--help`` lists every option (specprune_ros.bags.cli.evaluate_main; console script specprune_evaluate_bag).
"""
import sys

from specprune_ros.bags.cli import evaluate_main

if __name__ == '__main__':
    sys.exit(evaluate_main())
