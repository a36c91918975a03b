r"""Start specprune_node on a robot: params file, model, method, cameras, namespace and topic remappings.

    ros2 launch specprune_ros specprune.launch.py model:=reference method:=specprune \
        camera_topics:=/cam_front/image_raw,/cam_wrist/image_raw namespace:=arm \
        twist_topic:=/servo_node/delta_twist_cmds use_sim_time:=false

The node configuration itself is built by ``specprune_ros.ros.launch_config.node_setup`` (tested without
``ros2 launch``); ``ros2 launch specprune_ros specprune.launch.py --show-args`` lists every argument.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

from specprune_ros.ros.launch_config import LAUNCH_ARGUMENTS, launch_node_arguments, node_setup


def _start_node(context, *args, **kwargs):
    setup = node_setup({arg.name: LaunchConfiguration(arg.name).perform(context) for arg in LAUNCH_ARGUMENTS})
    return [LifecycleNode(**launch_node_arguments(setup), output='screen', emulate_tty=True)]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        *(DeclareLaunchArgument(arg.name, default_value=arg.default, description=arg.description)
          for arg in LAUNCH_ARGUMENTS),
        OpaqueFunction(function=_start_node),
    ])
