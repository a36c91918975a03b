#!/usr/bin/env python3
r"""Record a rosbag2 (MCAP by default, sqlite3 on request) without ``ros2 bag``.

Live, from DDS (what ``ros2 bag record`` does; specprune_ros.ros.bag_recorder):
    python scripts/record_bag.py outputs/bags/run1 --topics /camera/agentview/image_raw /camera/wrist/image_raw \
        /instruction /ee_pose /gripper_state /delta_twist_cmds /gripper_command /specprune_node/action_chunk
    python scripts/record_bag.py outputs/bags/all --all --storage sqlite3 --use-sim-time --duration 60

Straight from the simulator, no DDS (specprune_ros.bags.cli.record_sim_main):
    python scripts/record_bag.py outputs/bags/expert_pick --from-sim --families pick --seeds 1000000 1000001
    python scripts/record_bag.py outputs/bags/policy --from-sim --actor policy --model reference --method none

``--help`` and ``--from-sim --help`` list the options of each mode.
"""
import sys

if __name__ == '__main__':
    argv = sys.argv[1:]
    if '--from-sim' in argv:
        argv.remove('--from-sim')
        from specprune_ros.bags.cli import record_sim_main
        sys.exit(record_sim_main(argv))
    if '-h' in argv or '--help' in argv:    # the recorder's options follow; name the other mode first
        print(__doc__)
    from specprune_ros.ros.bag_recorder import main
    sys.exit(main(argv))
