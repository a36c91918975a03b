"""The pruning methods, one module each; build them by name with ``specprune_ros.pruning.build_method``."""
