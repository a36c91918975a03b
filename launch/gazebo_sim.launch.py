r"""Gazebo (gz sim) instead of the MuJoCo bridge: same topic contract, through ros_gz_bridge.

UNTESTED HERE: Gazebo, ros_gz and ``ros2 launch`` cannot be installed on the development machine; this file
only wires standard pieces together. You need: a world with the arm and the two cameras (``world``), the
topic mapping in ``config/gz_bridge.yaml`` adapted to it, and something that turns the node's end-effector
twist into joint commands (MoveIt Servo reading ``/delta_twist_cmds``, with gz_ros2_control).

    ros2 launch specprune_ros gazebo_sim.launch.py world:=/path/tabletop.sdf model:=reference \
        method:=specprune instruction:="pick up the red cube"
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from specprune_ros.ros.launch_config import PACKAGE, launch_node_arguments, node_setup

ARGUMENTS = (
    ('world', '', 'SDF world with the arm, the agentview and wrist cameras and the objects'),
    ('gz_bridge_config', '', 'ros_gz_bridge YAML (empty: the installed config/gz_bridge.yaml)'),
    ('model', '', "policy: 'reference', 'tiny-random' or a checkpoint directory"),
    ('method', '', 'pruning method'),
    ('method_config', '', "the method's knobs as YAML"),
    ('instruction', '', 'publish this instruction (latched) once the node is up; empty: publish it yourself'),
    ('headless', 'false', 'run gz sim without its GUI (-s)'),
)


def _start(context, *args, **kwargs):
    value = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    share = get_package_share_directory(PACKAGE)
    bridge_config = value['gz_bridge_config'] or os.path.join(share, 'config', 'gz_bridge.yaml')
    gz_args = ('-r -s ' if value['headless'].lower() == 'true' else '-r ') + value['world']
    gz = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(get_package_share_directory('ros_gz_sim'), 'launch',
                                                   'gz_sim.launch.py')),
        launch_arguments={'gz_args': gz_args}.items())
    bridge = Node(package='ros_gz_bridge', executable='parameter_bridge', name='gz_bridge',
                  parameters=[{'config_file': bridge_config, 'use_sim_time': True}], output='screen')
    setup = node_setup({k: value[k] for k in ('model', 'method', 'method_config') if value[k]}
                       | {'twist_topic': 'delta_twist_cmds', 'use_sim_time': 'true'})
    # Gazebo stamps the tool pose in its world frame, which is the base frame with the arm base at the origin
    setup.overrides['ee_pose_frame'] = ''
    policy = LifecycleNode(**launch_node_arguments(setup), output='screen', emulate_tty=True)
    actions = [gz, bridge, policy]
    if value['instruction']:
        actions.append(ExecuteProcess(cmd=['ros2', 'topic', 'pub', '--once', '--qos-durability', 'transient_local',
                                           '--qos-reliability', 'reliable', '/instruction', 'std_msgs/msg/String',
                                           f"{{data: '{value['instruction']}'}}"], output='screen'))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=default, description=description)
          for name, default, description in ARGUMENTS),
        OpaqueFunction(function=_start),
    ])
