"""The one error every checkpoint reader raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the model its config describes."""
