"""Typed, validated settings: one copy of each rule, for the command line and the library.

Each group of settings is a frozen dataclass validated in its constructor;
the command line builds them once from its flags (before TensorFlow is
imported) and passes them down. Field names are the flags' names, so an
`ArgumentError` names a parameter to a library caller and a `--flag` on the
command line. No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import string
from typing import Optional, Union
from re import Pattern
from collections.abc import Sequence

from t2t_avg.files import paths
from t2t_avg.errors import ArgumentError

SCHEMES = ("uniform", "softmax", "proportional", "rank", "top_k", "explicit",
           "greedy")
METRIC_SCHEMES = ("softmax", "proportional", "rank", "top_k")
METRIC_MODES = ("auto", "min", "max")
MISSING_METRIC = ("error", "skip")
OUTPUT_STEPS = ("zero", "last")

OutputStep = Union[str, int]

SELECTS = ("last", "best_window")
PLACEHOLDER = "{checkpoint}"  # where --eval_command takes the candidate's path


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
  """The selection flags, validated once.

  Attributes:
    min_step: the lowest step to average (inclusive), or None.
    max_step: the highest step to average (inclusive), or None.
    stride: every k-th checkpoint, counting back from the newest.
    select: 'last' (the last N) or 'best_window' (the N consecutive
      checkpoints ending at the best by the metric).
  """
  min_step: int | None = None
  max_step: int | None = None
  stride: int = 1
  select: str = "last"

  def __post_init__(self) -> None:
    for name in ("min_step", "max_step"):
      value = getattr(self, name)
      if value is not None and value < 0:
        raise ArgumentError("{" + name + "} must be >= 0, not {value}",
                            value=value)
    if (self.min_step is not None and self.max_step is not None and
        self.min_step > self.max_step):
      raise ArgumentError("{min_step}={low} is above {max_step}={high}",
                          low=self.min_step, high=self.max_step)
    check_stride(self.stride)
    if self.select not in SELECTS:
      raise ArgumentError("{select} must be 'last' or 'best_window', not "
                          "{value!r}", value=self.select)

  @property
  def is_default(self) -> bool:
    """True when these options choose nothing beyond the last N."""
    return self == SelectionOptions()


def check_stride(stride: int) -> None:
  if stride < 1:
    raise ArgumentError("{stride} must be >= 1, not {k}", k=stride)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How to score a candidate average: the user's command and its time limit.

  Attributes:
    eval_command: the command line, with `{checkpoint}` where the path of the
      candidate goes (see the module docstring for how it runs).
    eval_timeout: seconds one run may take, or None for no limit.
  """
  eval_command: str
  eval_timeout: float | None = None

  def __post_init__(self) -> None:
    try:
      args = shlex.split(self.eval_command)
    except ValueError as e:  # shlex: "No closing quotation", ...
      raise ArgumentError("{eval_command} cannot be split into arguments "
                          "({error}): {command}", error=e,
                          command=self.eval_command) from e
    if not any(PLACEHOLDER in arg for arg in args):
      raise ArgumentError(
          "{eval_command} must contain {placeholder}, replaced by the path "
          "of each candidate average: {command}", placeholder=PLACEHOLDER,
          command=self.eval_command)
    timeout = self.eval_timeout
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
      raise ArgumentError("{eval_timeout} must be a number of seconds > 0 "
                          "(or none for no limit), not {timeout}",
                          timeout=timeout)


def _one_of(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ArgumentError("{%s} must be one of {choices}, not {value!r}" % name,
                        choices=", ".join(choices), value=value)


def check_weights(weights: Sequence[float], count: Optional[int] = None,
                  *, name: str = "weights") -> tuple[float, ...]:
  """Explicit weights: finite, >= 0, with a positive sum; `count` of them.

  Raises:
    ArgumentError: naming the parameter `name`.
  """
  values = tuple(float(w) for w in weights)
  if not values or not all(math.isfinite(w) and w >= 0 for w in values) or (
      not math.fsum(values) > 0):
    raise ArgumentError("{%s} must be finite and >= 0 with a sum > 0, not "
                        "{given}" % name, given=list(values))
  if count is not None and len(values) != count:
    raise ArgumentError("{%s} gives {given} weights for {count} checkpoints"
                        % name, given=len(values), count=count)
  return values


def parse_weights(text: str) -> tuple[float, ...]:
  """`--weights=w1,w2,...` as numbers (see `check_weights`)."""
  try:
    values = [float(w) for w in text.split(",")]
  except ValueError as e:
    raise ArgumentError("{weights} must be comma-separated numbers, not "
                        "{text!r}", text=text) from e
  try:
    return check_weights(values)
  except ArgumentError as e:
    raise ArgumentError("{weights} must be finite and >= 0 with a sum > 0, "
                        "not {text!r}", text=text) from e


def check_output_step(value: OutputStep) -> OutputStep:
  """'zero', 'last', or an int >= 0 (a decimal string is read as one).

  Raises:
    ArgumentError: anything else.
  """
  if value in OUTPUT_STEPS:
    return value
  if isinstance(value, str) and value.isdigit():
    return int(value)
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  raise ArgumentError("{output_step} must be zero, last or an integer >= 0, "
                      "not {value!r}", value=value)


def compile_exclude(pattern: str) -> Optional[Pattern[str]]:
  """The `exclude_variables` regex, or None when empty.

  Raises:
    ArgumentError: a bad regex.
  """
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ArgumentError("{exclude_variables}: bad regex {pattern!r}: "
                        "{problem}", pattern=pattern, problem=e) from e


def check_output_path(output_path: str) -> None:
  """Refuses an output name TF would write but never read back.

  Raises:
    ArgumentError: the path holds glob characters, or names a directory
      (`avg/` would write a checkpoint named `avg/-0`).
  """
  if output_path.endswith(("/", os.sep)) or not os.path.basename(output_path):
    raise ArgumentError(
        "{output_path} {path!r} names a directory; give the output's name "
        "too, e.g. {example!r}", path=output_path,
        example=os.path.join(output_path, "averaged.ckpt"))
  chars = paths.glob_characters(output_path)
  if chars:
    raise ArgumentError(
        "{output_path} {path!r} contains {chars!r}: TensorFlow finds a "
        "checkpoint by a pattern of its name and could not read it back; "
        "choose a name without [ ] * ? \\", path=output_path, chars=chars)


@dataclasses.dataclass(frozen=True)
class WeightingOptions:
  """How checkpoints are weighted, and where their metric comes from.

  Attributes:
    weighting: one of `SCHEMES`.
    weights: with 'explicit', one weight per checkpoint (see `check_weights`).
    metrics_from_events: TensorBoard event files or directories, or Keras
      CSVLogger files.
    metric: the scalar tag to weigh by.
    metric_mode: 'min', 'max' or 'auto' (from the tag's name).
    temperature: softmax temperature in the metric's units; 0 means the
      standard deviation of the values.
    top_k: with 'top_k', how many of the best to average.
    max_step_gap: 0: a metric at the checkpoint's exact step; g > 0: the
      nearest preceding point within g steps.
    missing_metric: 'error', or 'skip' (leave the checkpoint out).
    greedy_tolerance: with 'greedy', how much worse a soup may score and
      still keep a candidate (in the score's units, >= 0).
  """
  weighting: str = "uniform"
  weights: Optional[tuple[float, ...]] = None
  metrics_from_events: tuple[str, ...] = ()
  metric: str = "loss"
  metric_mode: str = "auto"
  temperature: float = 0.0
  top_k: int = 0
  max_step_gap: int = 0
  missing_metric: str = "error"
  greedy_tolerance: float = 0.0

  def __post_init__(self) -> None:
    _one_of("weighting", self.weighting, SCHEMES)
    _one_of("metric_mode", self.metric_mode, METRIC_MODES)
    _one_of("missing_metric", self.missing_metric, MISSING_METRIC)
    if self.weights is not None and self.weighting != "explicit":
      raise ArgumentError("{weights} needs {weighting}=explicit")
    if self.weights is None and self.weighting == "explicit":
      raise ArgumentError("{weighting}=explicit needs {weights}")
    if self.weights is not None:
      object.__setattr__(self, "weights", check_weights(self.weights))
    object.__setattr__(self, "metrics_from_events",
                       tuple(s for s in self.metrics_from_events if s))
    if self.uses_metric and not self.metrics_from_events:
      raise ArgumentError("{weighting}={scheme} needs {metrics_from_events}",
                          scheme=self.weighting)
    if self.weighting == "top_k" and self.top_k < 1:
      raise ArgumentError("{weighting}=top_k needs {top_k}=k, the number of "
                          "best checkpoints to average (k >= 1), not {k}",
                          k=self.top_k)
    if self.weighting != "top_k" and self.top_k:
      raise ArgumentError("{top_k} goes with {weighting}=top_k")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ArgumentError("{temperature} must be >= 0, not {t}",
                          t=self.temperature)
    if self.temperature and self.weighting != "softmax":
      raise ArgumentError("{temperature} goes with {weighting}=softmax")
    if self.max_step_gap < 0:
      raise ArgumentError("{max_step_gap} must be >= 0, not {g}",
                          g=self.max_step_gap)
    if not (math.isfinite(self.greedy_tolerance) and
            self.greedy_tolerance >= 0):
      raise ArgumentError("{greedy_tolerance} must be >= 0, not {t}",
                          t=self.greedy_tolerance)
    if self.greedy_tolerance and self.weighting != "greedy":
      raise ArgumentError("{greedy_tolerance} goes with {weighting}=greedy")

  @property
  def uses_metric(self) -> bool:
    """Whether the weights come from the metric (not only shown with it)."""
    return self.weighting in METRIC_SCHEMES

  def check_count(self, count: int) -> None:
    """Explicit weights must be one per checkpoint (`count`)."""
    if self.weights is not None:
      check_weights(self.weights, count)


@dataclasses.dataclass(frozen=True)
class InputOptions:
  """Which checkpoints a one-shot run averages (the legacy flags).

  Attributes:
    checkpoints: prefixes or directories; `prefix` is string-prepended.
    prefix: see above; with `num_last_checkpoints`, its dirname holds the
      `checkpoint` state file.
    num_last_checkpoints: average the last N (ignored with `checkpoints`).
  """
  checkpoints: tuple[str, ...] = ()
  prefix: str = ""
  num_last_checkpoints: int = 0

  def __post_init__(self) -> None:
    listed = tuple(c.strip() for c in self.checkpoints if c.strip())
    if self.checkpoints and not listed:
      raise ArgumentError("{checkpoints}: no checkpoints given")
    object.__setattr__(self, "checkpoints", listed)
    if listed:
      return
    if self.num_last_checkpoints < 1:
      raise ArgumentError("give {checkpoints}, or {num_last_checkpoints} >= 1 "
                          "with {prefix}")
    if not self.prefix:
      raise ArgumentError("{num_last_checkpoints} needs {prefix} (its dirname "
                          "holds the `checkpoint` state file)")


@dataclasses.dataclass(frozen=True)
class AveragingOptions:
  """How tensors are averaged, in either mode.

  Attributes:
    exclude_variables: a regex of variables to leave out.
    allow_nonfinite: average NaN/inf instead of refusing.
    step_from: where a checkpoint's step comes from: 'auto', 'name' or a
      tensor key.
    weight_summaries: also write metric and weight as TensorBoard scalars in
      `<output dir>/t2t_avg/`.
    name_pattern: the `ModelCheckpoint` filepath that named the Keras files
      (`s-{epoch:02d}-{batch:03d}.weights.h5`): the number at `{epoch}` is a
      file's epoch. Needed only where a name holds several numbers.
  """
  exclude_variables: str = ""
  allow_nonfinite: bool = False
  step_from: str = "auto"
  weight_summaries: bool = False
  name_pattern: str = ""

  def __post_init__(self) -> None:
    compile_exclude(self.exclude_variables)
    if not self.step_from:
      raise ArgumentError("{step_from} must be auto, name or a tensor key")
    if self.name_pattern:
      check_name_pattern(self.name_pattern)


def check_name_pattern(pattern: str) -> None:
  """Refuses a name pattern that is no format string with one `{epoch}`."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(pattern)
              if f is not None]
  except ValueError as e:
    raise ArgumentError("{name_pattern} {pattern!r} is not a format string "
                        "like ModelCheckpoint's: {why}", pattern=pattern,
                        why=str(e)) from e
  if "epoch" not in fields:
    raise ArgumentError("{name_pattern} {pattern!r} has no {epoch} field, "
                        "e.g. 's-{epoch:02d}-{batch:03d}.weights.h5'",
                        pattern=pattern)


@dataclasses.dataclass(frozen=True)
class OutputOptions:
  """What a one-shot run writes.

  Attributes:
    output_path: the output prefix before `-<step>`.
    output_step: 'zero', 'last' or an int (see `check_output_step`).
    write_meta: also write a `.meta` graph (legacy).
    dry_run: validate and report; write nothing.
  """
  output_path: str = "/tmp/averaged.ckpt"
  output_step: OutputStep = "zero"
  write_meta: bool = False
  dry_run: bool = False

  def __post_init__(self) -> None:
    object.__setattr__(self, "output_step",
                       check_output_step(self.output_step))
    check_output_path(self.output_path)


@dataclasses.dataclass(frozen=True)
class ContinuousOptions:
  """The continuous mode (t2t-avg-all's flags).

  Attributes:
    model_dir: the training directory to watch.
    output_dir: where the averages go; not `model_dir`.
    n: checkpoints per window.
    min_steps: ignore checkpoints with a lower step.
    wait_minutes: how long to wait for a new checkpoint (and a metric).
    poll_seconds: how often to look while waiting.
    recompute: replace existing outputs whose record shows other settings
      (otherwise such outputs are refused).
    max_step: ignore checkpoints above this step.
    stride: windows of checkpoints `stride` apart (every k-th, counting back
      from the newest).
  """
  model_dir: str
  output_dir: str = "avg/"
  n: int = 8
  min_steps: int = 0
  wait_minutes: float = 0
  poll_seconds: float = 10.0
  recompute: bool = False
  max_step: Optional[int] = None
  stride: int = 1

  def __post_init__(self) -> None:
    if not self.model_dir:
      raise ArgumentError("{model_dir} is required")
    if not self.output_dir:
      raise ArgumentError("{output_dir} is required")
    if paths.same_directory(self.model_dir, self.output_dir):
      raise ArgumentError(
          "{output_dir} {output} is the training directory {model_dir} "
          "{model}: the averages would be taken for training checkpoints and "
          "its `checkpoint` state file would change; choose another "
          "{output_dir}", output=self.output_dir, model=self.model_dir)
    if self.n < 1:
      raise ArgumentError("{n} must be >= 1, not {n_value}", n_value=self.n)
    if self.stride < 1:
      raise ArgumentError("{stride} must be >= 1, not {k}", k=self.stride)
    for name in ("min_steps", "wait_minutes", "poll_seconds"):
      if not getattr(self, name) >= 0:
        raise ArgumentError("{%s} must be >= 0, not {value}" % name,
                            value=getattr(self, name))

  def check_weighting(self, weighting: WeightingOptions) -> None:
    """Weighting settings that depend on the window size."""
    if weighting.weighting == "greedy":
      raise ArgumentError("{weighting}=greedy is for one-shot averaging: it "
                          "evaluates many candidates per output")
    if weighting.weights is not None and len(weighting.weights) != self.n:
      raise ArgumentError(
          "{weighting}=explicit in continuous mode needs {n}={count} "
          "{weights}, one per window position (oldest first), not {given}",
          count=self.n, given=len(weighting.weights))
    if weighting.weighting == "top_k" and weighting.top_k > self.n:
      raise ArgumentError("{top_k} must be between 1 and {n}={count}, not "
                          "{k}", count=self.n, k=weighting.top_k)


@dataclasses.dataclass(frozen=True)
class OneShotSettings:
  """Everything a one-shot run was asked to do, typed and validated."""
  inputs: InputOptions
  output: OutputOptions
  averaging: AveragingOptions = AveragingOptions()
  weighting: WeightingOptions = WeightingOptions()
  selection: SelectionOptions = SelectionOptions()
  evaluation: Optional[EvalOptions] = None

  def __post_init__(self) -> None:
    if self.weighting.weighting == "greedy" and self.evaluation is None:
      raise ArgumentError("{weighting}=greedy needs {eval_command}")
    if self.selection.select == "best_window":
      if self.inputs.checkpoints:
        raise ArgumentError("{select}=best_window chooses from {prefix}'s "
                            "directory; it does not go with {checkpoints}")
      if not self.weighting.metrics_from_events:
        raise ArgumentError("{select}=best_window needs "
                            "{metrics_from_events}")
    if self.inputs.checkpoints:
      self.weighting.check_count(len(self.inputs.checkpoints))


CALLBACK_SCHEMES = ("uniform",) + METRIC_SCHEMES
KERAS_OUTPUT_SUFFIXES = (".weights.h5", ".keras")


def _is_count(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class CallbackOptions:
  """What the Keras callback (`t2t_avg.keras.AverageCheckpoints`) averages.

  Attributes:
    output_path: the output, `.weights.h5` or `.keras`, on a local disk.
    last_n: average the last N snapshots (epochs); None: every one from
      `start_epoch` on, as a running sum.
    start_epoch: the first epoch (1-based, as fit's progress bar and
      ModelCheckpoint's `{epoch}` count) to average, or None: the first.
    save_freq: snapshot every this many epochs (from `start_epoch`).
    directory: average ModelCheckpoint's files in this directory instead
      of taking snapshots; None: snapshots of the callback's own.
    restore: load the average into the model when training ends.
    weighting: the weighting settings (`metric` is the monitored log key).
  """
  output_path: str
  last_n: Optional[int] = None
  start_epoch: Optional[int] = None
  save_freq: int = 1
  directory: Optional[str] = None
  restore: bool = True
  weighting: WeightingOptions = WeightingOptions()

  def __post_init__(self) -> None:
    check_output_path(self.output_path)
    if not self.output_path.endswith(KERAS_OUTPUT_SUFFIXES):
      raise ArgumentError("{output_path} must end in .weights.h5 or .keras, "
                          "not {path!r}", path=self.output_path)
    if not paths.is_local(self.output_path):
      raise ArgumentError("{output_path} must be on a local disk (snapshots "
                          "are kept beside it), not {path}",
                          path=self.output_path)
    for name in ("last_n", "start_epoch"):
      value = getattr(self, name)
      if value is not None and not _is_count(value):
        raise ArgumentError("{%s} must be an integer >= 1 or None, not "
                            "{value!r}" % name, value=value)
    if not _is_count(self.save_freq):
      raise ArgumentError("{save_freq} must be a number of epochs >= 1, not "
                          "{value!r}", value=self.save_freq)
    if self.last_n is None and self.start_epoch is None:
      raise ArgumentError("give {last_n} (average the last N epochs) or "
                          "{start_epoch} (average every epoch from k on)")
    if self.directory is not None and self.save_freq != 1:
      raise ArgumentError("{save_freq} is for the callback's own snapshots; "
                          "with {directory}, ModelCheckpoint decides when "
                          "files are saved")
    self._check_weighting()

  def _check_weighting(self) -> None:
    scheme, top_k = self.weighting.weighting, self.weighting.top_k
    _one_of("weighting", scheme, CALLBACK_SCHEMES)
    if self.running_sum and scheme != "uniform":
      raise ArgumentError(
          "{weighting}={scheme} needs {last_n}: without it every epoch from "
          "{start_epoch} on is averaged uniformly, as a running sum",
          scheme=scheme)
    if self.last_n is not None and top_k > self.last_n:
      raise ArgumentError("{top_k} must be between 1 and {last_n}={n}, not "
                          "{k}", n=self.last_n, k=top_k)

  @property
  def running_sum(self) -> bool:
    """Whether every epoch from `start_epoch` on is averaged as it comes."""
    return self.last_n is None and self.directory is None

  def takes(self, epoch: int) -> bool:
    """Whether the epoch (1-based) is snapshotted."""
    start = self.start_epoch or 1
    return epoch >= start and (epoch - start) % self.save_freq == 0
