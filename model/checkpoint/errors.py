"""The one error type every checkpoint reader raises; its message names the file and the parameter."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or does not match the config."""
