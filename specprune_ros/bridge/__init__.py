"""ROS-free core of the simulation bridge.

Command <-> action conversion, the step-synchronous tick gate, the real-time command timeline, and episode bookkeeping
and summaries (``specprune_ros.ros.sim_bridge_node`` is the thin rclpy layer on top).
"""
