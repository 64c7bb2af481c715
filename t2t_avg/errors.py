"""The package's two error types: bad arguments, and inputs that cannot be averaged.

Both carry a template that names parameters in braces, so one error reads in
its caller's words: `{step_from}` is `step_from` to a library caller and
`--step_from` on the command line (parameters carry their flag's name).
"""
import re
import string
from collections.abc import Mapping

# The parameters a template may name: the library's keyword arguments, each
# also a flag of a command line (averaging, compare) but `newer`,
# `poll_seconds` and the Keras callback's own (`last_n`, `start_epoch`,
# `save_freq`, `directory`, `bn_batch_size`, `monitor`, `mode`); tests
# check this list against the flags and the messages.
PARAMETERS = frozenset((
    "allow_nonfinite", "atol", "bn_batch_size", "checkpoints", "directory",
    "dry_run", "eval_command", "eval_timeout", "exclude_variables",
    "greedy_tolerance", "last_n", "max_step", "max_step_gap", "metric",
    "metric_mode", "metrics_from_events", "min_step", "min_steps",
    "missing_metric", "mode", "model_dir", "monitor", "n", "name_pattern",
    "newer",
    "num_last_checkpoints", "output_dir", "output_path", "output_step",
    "poll_seconds", "prefix", "recompute", "rtol", "save_freq", "select",
    "start_epoch", "step_from", "stride", "temperature", "top_k",
    "wait_minutes", "weight_summaries", "weighting", "weights", "write_meta"))
# A field of a template: {name}, {name!r}, {name:g}. Any other brace is text.
_FIELD = re.compile(r"\{([A-Za-z_]\w*)(?:!([rsa]))?(?::([^{}]*))?\}")


def render(template: str, values: Mapping[str, object], *,
           as_flags: bool = False) -> str:
  """A template with its values filled in and other names as parameters.

  A name given in `values` is replaced by its value (an error among the
  values reads in the same words); a name in PARAMETERS is read as `name`,
  or `--name` with `as_flags`. Other braces are text: a path, a command
  (`{checkpoint}`) or a message written into the template stays as it is.
  """
  formatter = string.Formatter()

  def field(match: re.Match) -> str:
    name, conversion, spec = match.groups()
    if name not in values:
      if name not in PARAMETERS:
        return match.group(0)
      return ("--" if as_flags else "") + name
    value = values[name]
    if isinstance(value, Phrase):
      value = value.message(as_flags=as_flags)
    value = formatter.convert_field(value, conversion)
    return formatter.format_field(value, spec or "")

  return _FIELD.sub(field, template)


class Phrase:
  """A part of a message that names parameters, given to an error as a value."""

  def __init__(self, template: str, **values: object):
    self.template = template
    self.values = values

  def message(self, *, as_flags: bool = False) -> str:
    """The text, naming parameters bare or as `--flags`."""
    return render(self.template, self.values, as_flags=as_flags)

  def __str__(self) -> str:
    return self.message()


class WordedError(Phrase, Exception):
  """An error whose message is a template naming parameters in braces.

  Values it quotes are given by keyword, so braces in a value are never read
  as names: `ArgumentError("{top_k} must be >= 1, not {k}", k=0)` reads
  `top_k must be >= 1, not 0` to a library caller and `--top_k must be >= 1,
  not 0` on the command line.
  """

  def __init__(self, template: str, **values: object):
    Exception.__init__(self, template)
    Phrase.__init__(self, template, **values)


class AveragingError(WordedError):
  """Checkpoints, events or outputs that cannot be averaged as asked.

  The message names the file, variable, step or parameter at fault; the
  command line prints it as one line (parameters as flags) and exits with
  status 1.
  """


class ArgumentError(WordedError, ValueError):
  """A bad argument: a parameter of the library, a flag of the command line."""


def error_text(error: BaseException) -> str:
  """The first line of an error's message (TF errors carry long stacks)."""
  text = getattr(error, "message", None)
  if not isinstance(text, str) or not text:
    text = str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__
