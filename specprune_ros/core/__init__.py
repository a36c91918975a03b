"""ROS-free execution core: token layout, the prunable decoder runner, masks and FLOPs accounting."""
