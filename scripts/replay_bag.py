#!/usr/bin/env python3
r"""Replay a bag live onto its topics with the original timing.

``ros2 bag play`` is not installable here; on a robot, ``ros2 bag play --clock <bag>`` drives the node the same way.

    # the policy node on sim time, fed from a recorded episode; its actions recorded to a second bag
    python scripts/record_bag.py outputs/bags/actions --use-sim-time \
        --topics /delta_twist_cmds /gripper_command /specprune_node/action_chunk /specprune_node/inference &
    python scripts/replay_bag.py outputs/bags/episode --clock --wait-for-subscribers 30 \
        --topics /camera/agentview/image_raw /camera/wrist/image_raw /instruction /ee_pose /gripper_state

Options: --rate, --loop, --start-offset SECONDS, --remap OLD:=NEW, --clock (from bag time; run the consumer
with use_sim_time:=true), --topics (default: all). Bad bags exit with status 2 and a message saying why.
"""
from __future__ import annotations

import sys

from specprune_ros.ros.bag_player import main

if __name__ == '__main__':
    sys.exit(main())
