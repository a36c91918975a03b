r"""Simulation testing: the policy node and the sim bridge (MuJoCo tabletop tasks) on sim time.

    ros2 launch specprune_ros sim.launch.py model:=reference method:=specprune mode:=sync \
        episodes_per_family:=10 summary_path:=/tmp/sim/specprune_sync
    ros2 launch specprune_ros sim.launch.py method:=none mode:=realtime families:=pick

The launch ends when the bridge has run every episode (it writes ``summary_path``.json/.md), or when the policy
node exits first (the bridge then marks the episode in progress interrupted). Both node
configurations come from ``specprune_ros.ros.sim_launch_config.sim_setup``, which
``scripts/run_sim_closed_loop.py`` also uses: that script is the equivalent command where ``ros2 launch`` is
not installed.
"""
from dataclasses import replace

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from specprune_ros.ros.launch_config import PACKAGE, launch_node_arguments
from specprune_ros.ros.sim_launch_config import ALL_ARGUMENTS, BRIDGE_EXECUTABLE, BRIDGE_NODE_NAME, sim_setup


def _start(context, *args, **kwargs):
    setup = sim_setup({arg.name: LaunchConfiguration(arg.name).perform(context) for arg in ALL_ARGUMENTS})
    policy = setup.policy
    policy_node = LifecycleNode(**launch_node_arguments(replace(policy, overrides=setup.policy_parameters())),
                                output='screen', emulate_tty=True)
    bridge = Node(package=PACKAGE, executable=BRIDGE_EXECUTABLE, name=BRIDGE_NODE_NAME,
                  parameters=[setup.sim_params_file, setup.bridge_overrides], output='screen', emulate_tty=True)
    done = RegisterEventHandler(OnProcessExit(target_action=bridge,
                                              on_exit=[EmitEvent(event=Shutdown(reason='simulation finished'))]))
    # the policy node gone: end the launch (SIGINT to the bridge: the episode in progress is marked interrupted)
    node_gone = RegisterEventHandler(OnProcessExit(target_action=policy_node, on_exit=[
        EmitEvent(event=Shutdown(reason='the policy node exited before the simulation finished'))]))
    return [policy_node, bridge, done, node_gone]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        *(DeclareLaunchArgument(arg.name, default_value=arg.default, description=arg.description)
          for arg in ALL_ARGUMENTS),
        OpaqueFunction(function=_start),
    ])
