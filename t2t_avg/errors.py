"""The package's two error types: bad arguments, and inputs that cannot be averaged."""
import string
from collections.abc import Mapping


class AveragingError(Exception):
  """Checkpoints, events or outputs that cannot be averaged as asked.

  The message names the file, variable, step or flag at fault; the command
  line prints it as one line and exits with status 1.
  """


class _Names(dict):
  """Values given by keyword; any other name in braces is a parameter."""

  def __init__(self, values: Mapping[str, object], prefix: str):
    super().__init__(values)
    self._prefix = prefix

  def __missing__(self, key: str) -> str:
    return self._prefix + key


class ArgumentError(ValueError):
  """A bad argument: a parameter of the library, a flag of the command line.

  The message is a template naming parameters in braces, with the values it
  quotes given by keyword (so braces in a value are never read as names):
  `ArgumentError("{top_k} must be >= 1, not {k}", k=0)` reads `top_k must be
  >= 1, not 0` to a library caller and `--top_k must be >= 1, not 0` on the
  command line (parameters carry their flag's name).
  """

  def __init__(self, template: str, **values: object):
    super().__init__(template)
    self.template = template
    self.values = values

  def message(self, *, as_flags: bool = False) -> str:
    """The message, naming parameters bare or as `--flags`."""
    names = _Names(self.values, "--" if as_flags else "")
    return string.Formatter().vformat(self.template, (), names)

  def __str__(self) -> str:
    return self.message()


def error_text(error: Exception) -> str:
  """The first line of an error's message (TF errors carry long stacks)."""
  text = getattr(error, "message", None) or str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__
