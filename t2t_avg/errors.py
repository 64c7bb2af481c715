"""The package's one error type for domain failures."""


class AveragingError(Exception):
  """Checkpoints, events or outputs that cannot be averaged as asked.

  The message names the file, variable, step or flag at fault; the command
  line prints it as one line and exits with status 1.
  """
