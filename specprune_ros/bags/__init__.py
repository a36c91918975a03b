"""ROS-free rosbag2 tools on top of the ``rosbags`` library.

Reading and writing (MCAP or sqlite3), pulling observation streams out of a bag, and offline replay evaluation of
pruning methods. The live recorder and replayer (``specprune_ros.ros.bag_recorder`` / ``bag_player``) use this for the
files.
"""
