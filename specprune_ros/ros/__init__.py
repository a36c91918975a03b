"""ROS 2 glue: the lifecycle policy node, its launch configuration and test tools.

Importing this package does not import rclpy; only ``policy_node``, ``parameter_declaration``,
``messages`` and ``tools`` do.
"""
