"""ROS-free evaluation: closed-loop episodes in the simulator, statistics and reports."""
