"""specprune_ros: visual-token pruning for Vision-Language-Action policies, with a thin ROS 2 layer.

The pruning core (``core``, ``pruning``, ``policy``, ``sim``) is plain PyTorch / NumPy and never imports
rclpy; ROS glue lives in ``specprune_ros.ros``.
"""

__version__ = '0.1.0'
