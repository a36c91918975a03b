"""Training the reference VLA and collecting its demonstrations in the simulator."""
