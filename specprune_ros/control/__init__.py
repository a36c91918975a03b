"""ROS-free control logic of the policy node.

Input decoding and validation, input synchronisation, chunk scheduling, the safety filter, run-time statistics and the
node's parameter schema.

Nothing here imports rclpy, so every rule the node applies is unit-tested without DDS.
"""
