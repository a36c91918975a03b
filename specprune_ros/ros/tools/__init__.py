"""Small ROS tools for tests and benchmarks (synthetic inputs for the policy node)."""
