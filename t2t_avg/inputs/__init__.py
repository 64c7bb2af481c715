"""Which checkpoints, in which order, with which step."""
