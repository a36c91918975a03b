"""ROS-free codecs of what the policy node and bag replay read and draw.

Camera images, robot state, instruction strings, kept-patch overlays. No rclpy; the ROS layer and bag tools use them,
the node logic does not.
"""
