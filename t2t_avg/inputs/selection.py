"""Which checkpoints to average: step bounds, stride, the last N or best window.

Pure functions over the candidates' steps (and, for the best window, their
metric values), oldest first. Each returns indices into its input list,
oldest first. `choose` applies them in the order of the flags' meaning:
bounds, then stride, then the last N or the best window.
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import logging

from t2t_avg.metrics import points
from t2t_avg import options
from t2t_avg.errors import ArgumentError, AveragingError, render



def within_bounds(steps: Sequence[int | None], options: options.SelectionOptions,
                  names: Sequence[str] | None = None) -> list[int]:
  """The checkpoints whose step is within `min_step`..`max_step` (inclusive).

  Args:
    steps: each checkpoint's step (None when unknown), oldest first.
    options: the bounds; without any, every checkpoint is within.
    names: each checkpoint's name, for messages.

  Returns:
    Indices into `steps`, oldest first.

  Raises:
    AveragingError: a bound is given and a checkpoint's step is unknown.
  """
  low, high = options.min_step, options.max_step
  if low is None and high is None:
    return list(range(len(steps)))
  chosen = []
  for i, step in enumerate(steps):
    if step is None:
      raise AveragingError(
          "the step of {name} is unknown, so " + _bounds_text(options) +
          " cannot place it (see {step_from})", name=_name(i, names))
    if (low is None or step >= low) and (high is None or step <= high):
      chosen.append(i)
  return chosen


def strided(indices: Sequence[int], stride: int) -> list[int]:
  """Every `stride`-th of `indices`, counting back from the newest (kept).

  Raises:
    ArgumentError: `stride` < 1.
  """
  options.check_stride(stride)
  return list(indices)[::-1][::stride][::-1]


def last_n(indices: Sequence[int], n: int) -> list[int]:
  """The newest `n` of `indices` (all of them when there are fewer).

  Raises:
    ArgumentError: `n` < 1.
  """
  _check_count(n)
  return list(indices)[-n:]


def best_window(indices: Sequence[int], values: Sequence[float | None],
                n: int | None, mode: str,
                steps: Sequence[int | None] | None = None,
                names: Sequence[str] | None = None) -> list[int]:
  """The `n` consecutive checkpoints of `indices` ending at the best value.

  Args:
    indices: the candidates, oldest first (indices into `values`).
    values: one metric value per checkpoint; None, NaN or an infinity is
      never the best.
    n: the window's length, or None for every candidate up to the best. When
      fewer than `n` candidates lead up to the best, the window is shorter,
      with a warning.
    mode: 'max' (higher is better) or 'min'.
    steps: each checkpoint's step, to break ties (to the larger step, then
      the later index) and name the best in the log.
    names: each checkpoint's name, for the log.

  Returns:
    Indices into `values`, oldest first, the best last.

  Raises:
    ArgumentError: an unknown mode, `n` < 1.
    AveragingError: no candidate has a valid value.
  """
  points.check_mode(mode)
  if n is not None:
    _check_count(n)
  sign = 1.0 if mode == "max" else -1.0
  scored = [p for p, i in enumerate(indices) if points.is_valid(values[i])]
  if not scored:
    raise AveragingError(f"no valid metric value among the {len(indices)} "
                         "checkpoints to find the best window in (all NaN, "
                         "inf or missing)")
  best = max(scored, key=lambda p: (sign * float(values[indices[p]] or 0),
                                    _newer(indices[p], steps), indices[p]))
  window = list(indices)[0 if n is None else max(0, best - n + 1):best + 1]
  where = _name(indices[best], names, steps)
  logging.info("--select=best_window: the best metric value, %g, is at %s; "
               "the window ending there holds %d of %d checkpoints",
               values[indices[best]], where, len(window), len(indices))
  if n is not None and len(window) < n:
    logging.warning("--select=best_window: only %d checkpoints lead up to the "
                    "best, %s: the window is shorter than %d", len(window),
                    where, n)
  return window


def choose(steps: Sequence[int | None], *, options: options.SelectionOptions,
           n: int | None, values: Sequence[float | None] | None = None,
           mode: str | None = None,
           names: Sequence[str] | None = None) -> list[int]:
  """Applies the bounds, the stride, then the last `n` or the best window.

  Args:
    steps: each checkpoint's step (None when unknown), oldest first.
    options: the selection flags.
    n: how many checkpoints to average (N); None: all that remain (for an
      explicit list), or every one up to the best for the best window.
    values: one metric value per checkpoint, for 'best_window'.
    mode: 'max' or 'min', for 'best_window'.
    names: each checkpoint's name, for messages.

  Returns:
    Indices into `steps`, oldest first. One INFO line is logged per step
    that leaves something out.

  Raises:
    ArgumentError: 'best_window' without values or mode; as the steps do.
    AveragingError: no checkpoint is within the bounds; as the steps do.
  """
  chosen = within_bounds(steps, options, names)
  if not chosen:
    raise _nothing_within(steps, options)
  _log_left(render(_bounds_text(options), {}, as_flags=True), chosen,
            len(steps))
  chosen = _log_left(f"--stride={options.stride}",
                     strided(chosen, options.stride), len(chosen))
  if options.select == "best_window":
    if values is None or mode is None:
      raise ArgumentError("{select}=best_window needs metric values and a "
                          "{metric_mode}")
    return best_window(chosen, values, n, mode, steps, names)
  if n is None:
    return chosen
  return _log_left(f"--num_last_checkpoints={n}", last_n(chosen, n),
                   len(chosen))



def _check_count(n: int) -> None:
  if n < 1:
    raise ArgumentError("{num_last_checkpoints} must be >= 1, not {n}", n=n)




def _newer(index: int, steps: Sequence[int | None] | None) -> int:
  """A tie-break key: the step, with an unknown one older than any."""
  step = None if steps is None else steps[index]
  return -1 if step is None else step


def _name(index: int, names: Sequence[str] | None,
          steps: Sequence[int | None] | None = None) -> str:
  if names is not None:
    return f"checkpoint {names[index]}"
  if steps is not None and steps[index] is not None:
    return f"step {steps[index]}"
  return f"the checkpoint at position {index} (0 = the oldest)"


def _bounds_text(options: options.SelectionOptions) -> str:
  """The bounds given, as a template naming their parameters."""
  bounds = [f"{{{name}}}={getattr(options, name)}"
            for name in ("min_step", "max_step")
            if getattr(options, name) is not None]
  return " ".join(bounds)


def _nothing_within(steps: Sequence[int | None],
                    options: options.SelectionOptions) -> AveragingError:
  if not steps:
    return AveragingError("no checkpoints to choose from")
  known = [s for s in steps if s is not None]
  return AveragingError("no checkpoint has a step within " +
                        _bounds_text(options) + " (the steps run from {low} "
                        "to {high})", low=min(known), high=max(known))


def _log_left(what: str, chosen: list[int], before: int) -> list[int]:
  """Logs how many checkpoints `what` leaves, when it leaves any out."""
  if len(chosen) < before:
    logging.info("%s leaves %d of %d checkpoints", what, len(chosen), before)
  return chosen
