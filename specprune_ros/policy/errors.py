"""Errors every model backend raises: the checkpoint cannot be loaded, or the observation cannot be acted on."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing or malformed (the message names the file)."""


class ObservationError(ValueError):
    """An observation the policy refuses to act on (missing camera, wrong shape, NaN state)."""
