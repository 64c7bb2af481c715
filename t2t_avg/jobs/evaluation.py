"""Running the user's eval command on a candidate average and reading its score.

The command (`--eval_command`) runs without a shell: it is split into
arguments once with `shlex.split` (POSIX quoting), then `{checkpoint}` is
replaced inside each argument, so `--checkpoint={checkpoint}` works and a path
with spaces stays one argument. Only that exact placeholder is replaced; other
braces are passed through. A command that needs pipes, `&&` or redirections
says so itself: `sh -c 'python eval.py {checkpoint} | tail -n 1'` (there the
path lands in the shell's text as it is, unquoted).

The command inherits the environment and the working directory; its stdin is
/dev/null. It runs in a session (and process group) of its own: a timeout or a
Ctrl-C kills the whole group with SIGKILL, the eval script's own children
included, and Ctrl-C in a terminal reaches only this tool, which does that.

The score is the last non-empty line of the command's stdout, stripped of
surrounding whitespace, and is one of:
  - a number: `0.8312`, `-1.5e-3`, `27.4` (optional sign, digits with an
    optional fraction, optional exponent);
  - a name, a separator and a number: `BLEU = 27.4`, `accuracy: 0.83`,
    `val_loss 0.41`. The name starts with a letter or `_` and holds letters,
    digits and `_ . / -`; the separator is `=` or `:` (spaces around it
    allowed) or whitespace alone.
Nothing else is a score: not `27.4%`, not `BLEU = 27.4, 58.9/33.1`, not two
numbers. NaN or infinity (`nan`, `inf`, `-inf`, also after a name) is read and
refused as an error, as are a non-zero exit status, no score, and running past
the timeout. Earlier lines of stdout and all of stderr are free for the
command's own logging.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import time

from absl import logging

from t2t_avg import options
from t2t_avg.errors import AveragingError

PLACEHOLDER = options.PLACEHOLDER
STDERR_TAIL_LINES = 20
# After a SIGKILL to the group, how long to wait for its pipes to close (a
# process that left the group may still hold them).
_DRAIN_SECONDS = 5.0

_NUMBER = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|infinity)"
_SCORE_LINE = re.compile(
    rf"(?:[A-Za-z_][\w./-]*(?:\s*[=:]\s*|\s+))?(?P<number>{_NUMBER})",
    re.IGNORECASE)


def command_args(options: options.EvalOptions, checkpoint_path: str) -> list[str]:
  """The command's arguments with `{checkpoint}` replaced by a path.

  Args:
    options: the eval command.
    checkpoint_path: the candidate's path (a TF prefix or a Keras file).

  Returns:
    The argument list to run, program first.
  """
  return [arg.replace(PLACEHOLDER, checkpoint_path)
          for arg in shlex.split(options.eval_command)]


def parse_score(line: str) -> float | None:
  """The number on a score line (see the module docstring), or None.

  NaN and infinities are returned as such; the caller refuses them.
  """
  match = _SCORE_LINE.fullmatch(line.strip())
  return float(match.group("number")) if match else None


def evaluate(options: options.EvalOptions, checkpoint_path: str, *,
             candidate: str) -> float:
  """Runs the eval command on one candidate and returns its score.

  Args:
    options: the eval command and its timeout.
    checkpoint_path: the candidate's path, put in place of `{checkpoint}`.
    candidate: what the candidate is, for the log and errors, e.g. "the
      average of model.ckpt-4000, model.ckpt-5000" or "model.ckpt-4000
      alone".

  Returns:
    The finite score read from the last non-empty line of stdout.

  Raises:
    AveragingError: one line naming the candidate and the command, when the
      command cannot start, exits with a status other than 0, runs past the
      timeout, or prints no score or a NaN or infinite one on its last line.
      The last lines of its stderr are logged first.
    KeyboardInterrupt: Ctrl-C while the command ran, after killing it.
  """
  start = time.monotonic()
  status, stdout, stderr = _run(command_args(options, checkpoint_path),
                                options, candidate)
  line = _last_line(stdout)
  score = parse_score(line) if status == 0 else None
  problem = _problem(options, status, line, score)
  if problem:
    _log_stderr_tail(stderr, candidate)
    raise AveragingError(
        "eval command {command} " + problem[0] + " on {candidate}{detail}",
        command=_quote(options.eval_command, 60),
        candidate=_shorten(candidate, 60), detail=problem[1])
  assert score is not None  # `_problem` said so.
  logging.info("Eval score of %s: %g (%.1f s)", candidate, score,
               time.monotonic() - start)
  return score


def _run(args: list[str], options: options.EvalOptions,
         candidate: str) -> tuple[int | None, str, str]:
  """(exit status or None after a timeout, stdout, stderr) of one run."""
  logging.debug("Running the eval command on %s: %s", candidate,
                shlex.join(args))
  try:
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
        start_new_session=True)
  except OSError as e:  # No such program, not executable.
    raise AveragingError(
        f"eval command {_quote(options.eval_command, 60)} cannot start on "
        f"{_shorten(candidate, 60)}: {e.strerror}: {args[0]}") from e
  with proc:
    try:
      stdout, stderr = proc.communicate(timeout=options.eval_timeout)
    except subprocess.TimeoutExpired:
      _kill_group(proc)
      stdout, stderr = _drain(proc)
      return None, stdout, stderr
    except BaseException:  # Ctrl-C: nothing of the command may outlive us.
      _kill_group(proc)
      proc.wait()
      raise
  return proc.returncode, stdout, stderr


def _kill_group(proc: subprocess.Popen) -> None:
  # proc is not reaped yet, so its pid still names its group.
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
  """What a killed command wrote; empty if an escaped child holds the pipes."""
  try:
    return proc.communicate(timeout=_DRAIN_SECONDS)
  except subprocess.TimeoutExpired:
    proc.wait()
    return "", ""


def _problem(options: options.EvalOptions, status: int | None, line: str,
             score: float | None) -> tuple[str, str] | None:
  """(what went wrong, detail after the candidate), or None for a score."""
  if status is None:
    return (f"ran past {{eval_timeout}}={options.eval_timeout:g} seconds", "")
  if status < 0:
    return ("failed", f" (killed by {_signal_name(-status)})")
  if status > 0:
    return ("failed", f" (exit status {status})")
  shown = f" (last line: {_quote(line, 30)})" if line else " (no stdout)"
  if score is None:
    return ("printed no score", shown)
  if not math.isfinite(score):
    return ("gave " + ("NaN" if math.isnan(score) else f"{score:g}"), shown)
  return None


def _signal_name(number: int) -> str:
  try:
    return signal.Signals(number).name
  except ValueError:  # A real-time signal has no name.
    return f"signal {number}"


def _last_line(stdout: str) -> str:
  lines = [line for line in stdout.splitlines() if line.strip()]
  return lines[-1].strip() if lines else ""


def _log_stderr_tail(stderr: str, candidate: str) -> None:
  lines = stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:]
  if lines:
    logging.error("Last %d lines of the eval command's stderr on %s:\n%s",
                  len(lines), candidate, "\n".join(lines))
  else:
    logging.error("The eval command wrote nothing to stderr on %s", candidate)


def _shorten(text: str, limit: int) -> str:
  """`text`, its middle elided to keep it within `limit` characters."""
  if len(text) <= limit:
    return text
  head = (limit - 3) // 2
  return text[:head] + "..." + text[len(text) - (limit - 3 - head):]


def _quote(text: str, limit: int) -> str:
  return repr(_shorten(text, limit))
