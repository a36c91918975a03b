"""The VLA models the package runs, by name: the reference VLA, a tiny random one, or a checkpoint directory."""
