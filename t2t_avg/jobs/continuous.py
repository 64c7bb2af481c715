"""Continuous mode (t2t-avg-all): watch a training dir, average each window."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time
from typing import Optional
from collections.abc import Callable, Iterable, Iterator, Sequence

from absl import logging

from t2t_avg import formats
from t2t_avg import options
from t2t_avg.engine import averaging
from t2t_avg.errors import ArgumentError, AveragingError, error_text
from t2t_avg.files import filesystem
from t2t_avg.files import publish
from t2t_avg.files import shared_dir
from t2t_avg.files.paths import is_local
from t2t_avg.formats import state_file
from t2t_avg.inputs import checkpoints
from t2t_avg.inputs import naming
from t2t_avg.inputs.naming import Checkpoint
from t2t_avg.metrics import events
from t2t_avg.metrics import keras_logs
from t2t_avg.metrics import points as metric_points
from t2t_avg.metrics import weighting
from t2t_avg.metrics.points import MetricPoint
from t2t_avg.record import RECORD_SUFFIX, AveragingResult

OUTPUT_BASENAME = naming.OUTPUT_BASENAME
OUTPUTS = naming.OutputNames()
# Copied from the training directory for t2t-bleu and t2t-translate-all.
RUN_FILES = ("flags.txt", "hparams.json", "flags_t2t.txt")
WRITTEN, EXISTED, SKIPPED = "written", "existed", "skipped"
# What reading a damaged checkpoint raises (IndexError: a truncated data file;
# TF's errors come as filesystem.GFileError, an OSError).
_READ_ERRORS = (OSError, ValueError, IndexError)

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclasses.dataclass(frozen=True)
class WindowOutcome:
  """What became of one window of n consecutive checkpoints."""
  step: int  # The newest checkpoint's name number: the output's.
  output_path: str  # `<output_dir>/model.ckpt-<step>`.
  inputs: tuple  # The window's Checkpoints as listed, oldest first.
  status: str  # WRITTEN, EXISTED (left as it was) or SKIPPED.
  reason: str = ""  # Why it was skipped.
  result: Optional[AveragingResult] = None  # When written.


def stepfiles(model_dir: str, *, min_steps: int = 0, wait_minutes: float = 0,
              poll_seconds: float = 10.0, clock: Clock = time.time,
              sleep: Sleep = time.sleep, max_step: Optional[int] = None,
              gone: Optional[set[int]] = None) -> Iterator[Checkpoint]:
  """Yields the checkpoints of a directory as they appear, oldest first.

  As T2T's `bleu_hook.stepfiles_iterator`: files `<model_dir>/*-<N>.index`
  (or the directory's Keras files), none skipped, each with a higher step
  than the one before. Once those found are used up, the directory is
  polled for up to `wait_minutes` after the ctime of the last one yielded
  (after the start, before the first), then the generator ends. A
  checkpoint may be deleted (by the trainer's `max_to_keep`) after it was
  yielded: the caller checks.

  Args:
    model_dir: the training directory (local, or any `tf.io.gfile` path).
    min_steps: ignore checkpoints with a lower step.
    wait_minutes: how long to wait for the next checkpoint.
    poll_seconds: how often to look while waiting.
    clock: the wall-clock time in seconds (ctimes are wall-clock times).
    sleep: sleeps for that many seconds.
    max_step: end at the first checkpoint above this step.
    gone: where to add the steps of checkpoints that were listed but
      deleted before they could be yielded.

  Yields:
    Checkpoints as listed (step from the name or, for Keras files, the
    iteration counter; file times), by increasing step.
  """
  found, awaited = _list_stepfiles(model_dir, min_steps, gone)
  logging.info("Found %d checkpoints in %s with steps: %s", len(found),
               model_dir, ", ".join(str(s.step) for s in found) or "none")
  deadline = clock() + wait_minutes * 60
  while True:
    if not found and wait_minutes:
      logging.info("Waiting till %s for %s",
                   time.asctime(time.localtime(deadline)), awaited)
      while True:
        found, awaited = _list_stepfiles(model_dir, min_steps, gone)
        if found or clock() > deadline:
          break
        sleep(poll_seconds)
    if not found:
      logging.info("No new checkpoint in %s%s; done", model_dir,
                   f" for {wait_minutes:g} minutes" if wait_minutes else "")
      return
    step_file = found.popleft()
    if max_step is not None and (step_file.step or 0) > max_step:
      logging.info("%s is above --max_step=%d; done", step_file.path,
                   max_step)
      return
    deadline = step_file.ctime_ns / 1e9 + wait_minutes * 60
    min_steps = (step_file.step or 0) + 1
    yield step_file


def _list_stepfiles(model_dir: str, min_steps: int,
                    gone: Optional[set[int]] = None) -> tuple[
                        collections.deque, str]:
  """The training checkpoints of a directory with a step >= min_steps, by
  step: `<model_dir>/*-<N>` (TF), or its Keras files (one listing); and
  what a new one would be, in words."""
  listing = naming.look(model_dir)
  keras = listing.keras_files() if is_local(model_dir) else []
  tf_pattern = os.path.join(model_dir, "*-[0-9]*" + naming.INDEX_SUFFIX)
  if keras:
    suffixes = sorted({next(s for s in naming.KERAS_SUFFIXES
                            if name.endswith(s)) for name in keras})
    awaited = (f"a new Keras file in {model_dir} "
               f"({', '.join('*' + s for s in suffixes)})")
    return collections.deque(_keras_stepfiles(model_dir, listing,
                                              min_steps)), awaited
  awaited = f"a new checkpoint {tf_pattern}"
  if not listing.tf_prefixes() and is_local(model_dir):
    awaited += f" or Keras file ({naming.KERAS_GLOBS})"
  found = []
  for listed in naming.TFNames().find_all(model_dir, listing):
    if (listed.step or 0) < min_steps:
      continue
    times = filesystem.times(listed.path + naming.INDEX_SUFFIX)
    if times is None:
      logging.info("%s was deleted, so skipping it", listed.path)
      if gone is not None and listed.step is not None:
        gone.add(listed.step)
      continue
    found.append(dataclasses.replace(listed, mtime_ns=times[0],
                                     ctime_ns=times[1]))
  return collections.deque(found), awaited


_UNORDERED: set[str] = set()  # Keras files without a step, warned about once.


def _keras_stepfiles(model_dir: str, listing: naming.Listing,
                     min_steps: int) -> list[Checkpoint]:
  """The Keras files of a directory, their step being their iteration
  counter (else the number in their name). A file that cannot be read yet
  (still being written) is left for the next look."""
  found = []
  for keras_file in naming.KerasNames().find_all(model_dir, listing,
                                                 warn_unreadable=False):
    if keras_file.step is None:
      if keras_file.path not in _UNORDERED:
        _UNORDERED.add(keras_file.path)
        logging.warning("Leaving out %s: it has no optimizer iteration "
                        "counter and no number in its name", keras_file.path)
    elif keras_file.step >= min_steps:
      found.append(keras_file)
  return found


def windows(step_files: Iterable[Checkpoint], n: int,
            stride: int = 1) -> Iterator[tuple]:
  """Yields each window of n checkpoints `stride` apart, once it is complete.

  Args:
    step_files: checkpoints, oldest first (e.g. from `stepfiles`).
    n: the window size, >= 1.
    stride: take every k-th checkpoint, counting back from the newest.

  Yields:
    Tuples of n Checkpoints, oldest first; one per checkpoint from the
    ((n - 1) * stride + 1)-th.

  Raises:
    ArgumentError: n < 1 or stride < 1.
  """
  if n < 1 or stride < 1:
    raise ArgumentError("{n} and {stride} must be >= 1, not {given}",
                        given=f"{n}, {stride}")
  span = (n - 1) * stride + 1
  window: collections.deque[Checkpoint] = collections.deque(maxlen=span)
  for step_file in step_files:
    window.append(step_file)
    if len(window) == span:
      yield tuple(window)[::-1][::stride][::-1]


def average_all(settings: options.ContinuousOptions, *,
                weighting_options: options.WeightingOptions = (
                    options.WeightingOptions()),
                averaging_options: options.AveragingOptions = (
                    options.AveragingOptions()),
                clock: Clock = time.time,
                sleep: Sleep = time.sleep) -> Iterator[WindowOutcome]:
  """Averages every window of n consecutive checkpoints as they appear.

  For each checkpoint from the n-th on (see `stepfiles`), the window of it
  and the n - 1 before it is averaged into `<output_dir>/model.ckpt-<step>`
  (its name number) with `global_step` = step: float tensors exactly as a
  one-shot `average_checkpoints` of the window, other tensors from the
  newest. The output's files get the newest checkpoint's `.index` time;
  `flags.txt`, `hparams.json` and `flags_t2t.txt` are copied with their
  times; the output directory's `checkpoint` state file lists the outputs.

  A window whose output already exists is left as it is (a restart). A
  window with a checkpoint that vanished, is incomplete or cannot be read is
  skipped with a warning naming it. Under a metric scheme, a window waits up
  to `wait_minutes` (after its newest checkpoint's ctime) for that
  checkpoint's metric, then is skipped with a warning.

  Arguments are checked on the call; the work happens as the returned
  iterator is consumed.

  Args:
    settings: the directories, window size and waiting.
    weighting_options: the weighting; explicit weights are one per window
      position, oldest first.
    averaging_options: exclusions, NaN handling, step source, summaries.
    clock: wall-clock seconds; injectable for tests.
    sleep: sleeps for some seconds; injectable for tests.

  Returns:
    An iterator of WindowOutcomes, one per window, oldest first.

  Raises:
    AveragingError: `model_dir` does not exist and there is no time to wait
      for it. While iterating: a window that cannot be averaged for a reason
      other than its inputs going missing or being unreadable (mismatched
      variables, NaN).
    ArgumentError: bad arguments.
  """
  settings.check_weighting(weighting_options)
  mode = None
  if weighting_options.uses_metric:
    mode = metric_points.direction(weighting_options.metric,
                             weighting_options.metric_mode)
  model_dir = os.path.expanduser(settings.model_dir)
  output_dir = os.path.expanduser(settings.output_dir)
  if averaging_options.weight_summaries:
    events.summaries_directory(output_dir)
  if not filesystem.isdir(model_dir) and not settings.wait_minutes:
    raise AveragingError("{model_dir} {path} is not a directory (pass "
                         "{wait_minutes} to wait for it)", path=model_dir)
  settings = dataclasses.replace(settings, model_dir=model_dir,
                                 output_dir=output_dir)
  averager = _Averager(settings, weighting_options, averaging_options, mode,
                       clock=clock, sleep=sleep)
  found = stepfiles(model_dir, min_steps=settings.min_steps,
                    wait_minutes=settings.wait_minutes,
                    poll_seconds=settings.poll_seconds, clock=clock,
                    sleep=sleep, max_step=settings.max_step,
                    gone=averager.series.gone)
  return averager.run(found)


class _Averager:
  """Turns windows into outputs: opens, weighs, averages, finishes each."""

  def __init__(self, settings: options.ContinuousOptions,
               weighting_options: options.WeightingOptions,
               averaging_options: options.AveragingOptions,
               mode: Optional[str], *, clock: Clock, sleep: Sleep):
    self._settings = settings
    self._weighting = weighting_options
    self._averaging = averaging_options
    self._recorded = numbers_settings(settings, weighting_options,
                                      averaging_options)
    self._outputs = _Outputs(settings, self._recorded, averaging_options,
                             weighting_options.metric)
    self._metric = _MetricWait(settings, weighting_options, mode,
                               clock=clock, sleep=sleep)
    self._open = _OpenWindow(averaging_options)
    self.series = _Series()

  def run(self, found: Iterator[Checkpoint]) -> Iterator[WindowOutcome]:
    """The generator behind `average_all`."""
    settings = self._settings
    publish.make_dirs(settings.output_dir)
    if not settings.recompute:
      self._outputs.refuse_other_settings()
    self._outputs.copy_run_files()
    counts: collections.Counter = collections.Counter()
    try:
      for window in windows(self.series.follow(found), settings.n,
                            settings.stride):
        outcome = self._process(window)
        counts[outcome.status] += 1
        yield outcome
    finally:
      self._open.close()
    if not counts:
      logging.warning("No window of --n=%d checkpoints was formed in %s (with "
                      "--min_steps and --wait_minutes as given)", settings.n,
                      settings.model_dir)
    logging.info("Continuous averaging done: %d written, %d existed already, "
                 "%d skipped", counts[WRITTEN], counts[EXISTED],
                 counts[SKIPPED])

  def _process(self, window: tuple[Checkpoint, ...]) -> WindowOutcome:
    newest = window[-1]
    step = newest.step or 0
    prefix = OUTPUTS.name_for(self._settings.output_dir, newest)

    def skipped(reason: str) -> WindowOutcome:
      logging.warning("Skipping %s: %s", prefix, reason)
      return WindowOutcome(step, prefix, window, SKIPPED, reason)

    if checkpoints.exists(prefix) and not self._outputs.differs(prefix):
      logging.info("%s exists; skipped, not recomputed", prefix)
      return WindowOutcome(step, prefix, window, EXISTED)
    members, problem = self._open.open(window)
    if members is None:
      return skipped(problem)
    self.series.warn_of_gaps(window, prefix)
    weighing = None
    if self._weighting.weighting != "uniform":
      weighing, problem = self._metric.weigh(members, newest)
      if weighing is None:
        return skipped(problem)
    try:
      result = self._average(members, weighing, step, prefix)
    except (AveragingError,) + _READ_ERRORS as e:
      self._open.close()  # Read again, from the start, for the next window.
      unreadable = _unreadable_input(window, e)
      if unreadable is None:
        raise
      return skipped(unreadable)
    self._outputs.finish(result, newest, members)
    return WindowOutcome(step, prefix, window, WRITTEN, result=result)

  def _average(self, members: list[Checkpoint],
               weighing: Optional[weighting.Weighing], step: int,
               prefix: str) -> AveragingResult:
    """Averages a window into `prefix` (TF: `<output_dir>/model.ckpt` with
    the step appended by the format; Keras: the file name itself)."""
    extra: dict = {"continuous": {"model_dir": self._settings.model_dir,
                                  "n": self._settings.n},
                   "settings": self._recorded}
    chosen: Sequence[Checkpoint] = members
    weights, values = None, None
    if weighing is None:
      extra["weighting"] = {"scheme": "uniform"}
    else:
      chosen, weights, values = (weighing.checkpoints, weighing.weights,
                                 weighing.metrics)
      extra.update(weighing.record)
    output = prefix
    if members[-1].opened.format.has_state_file:  # Named <path>-<step>.
      output = os.path.join(self._settings.output_dir, OUTPUT_BASENAME)
    return averaging.average_checkpoints(
        chosen, output, weights=weights, metrics=values, output_step=step,
        exclude_variables=self._averaging.exclude_variables,
        allow_nonfinite=self._averaging.allow_nonfinite,
        step_from=self._averaging.step_from, update_state_file=False,
        record_extra=extra)


class _Series:
  """The steps of the checkpoints found so far, to tell a window that spans
  a missing one (deleted before it was found, or after it was listed)."""

  def __init__(self) -> None:
    self.steps: list[int] = []
    self.gone: set[int] = set()  # Listed, then deleted before they were used.

  def follow(self, found: Iterable[Checkpoint]) -> Iterator[Checkpoint]:
    """`found`, each step recorded as it passes."""
    for checkpoint in found:
      self.steps.append(checkpoint.step or 0)
      yield checkpoint

  def spacing(self) -> Optional[int]:
    """The usual difference between consecutive steps: the most common one
    when most are it, else the smallest when every one is a multiple of it;
    None for irregular saves (every N seconds) or fewer than 2."""
    gaps = [b - a for a, b in zip(self.steps, self.steps[1:]) if b > a]
    if len(gaps) < 2:
      return None
    common, count = collections.Counter(gaps).most_common(1)[0]
    if 2 * count > len(gaps):
      return common
    smallest = min(gaps)
    return smallest if all(g % smallest == 0 for g in gaps) else None

  def missing(self, window: Sequence[Checkpoint]) -> dict[int, str]:
    """{step: why it is missing} for the steps missing inside a window."""
    first, last = window[0].step or 0, window[-1].step or 0
    found = [s for s in self.steps if first <= s <= last]
    missing = {s: "listed, then deleted" for s in sorted(self.gone)
               if first < s < last and s not in found}
    spacing = self.spacing() or 0
    for a, b in zip(found, found[1:]) if spacing else ():
      if b - a > spacing and (b - a) % spacing == 0:
        for step in range(a + spacing, b, spacing):
          missing.setdefault(step, f"the others are {spacing} steps apart")
    return dict(sorted(missing.items()))

  def warn_of_gaps(self, window: Sequence[Checkpoint], output: str) -> None:
    """Warns when a window averages across a missing checkpoint."""
    missing = self.missing(window)
    if missing:
      logging.warning(
          "The window of %s (steps %s) spans missing checkpoints: %s; "
          "averaging the %d checkpoints there", output,
          ", ".join(str(c.step) for c in window), "; ".join(
              f"step {step} ({why})" for step, why in missing.items()),
          len(window))


class _OpenWindow:
  """The checkpoints of the current window, open: a checkpoint the next
  window shares is not opened again (with n = 8, each is opened once for its
  8 windows); one that left the window is closed."""

  def __init__(self, averaging_options: options.AveragingOptions):
    self._averaging = averaging_options
    self._held: dict[tuple[str, Optional[int]], Checkpoint] = {}

  def open(self, window: tuple[Checkpoint, ...]) -> tuple[
      Optional[list[Checkpoint]], str]:
    """The window's checkpoints opened, or None and why one cannot be used
    (then none is held)."""
    keys = [(c.path, c.step) for c in window]
    for key in [k for k in self._held if k not in keys]:
      self._held.pop(key).opened.close()
    try:
      for listed, key in zip(window, keys):
        if not checkpoints.exists(listed.path):
          self.close()
          return None, (f"checkpoint {listed.path} vanished (deleted by the "
                        "trainer's max_to_keep?)")
        if key not in self._held:
          opened, problem = self._open_one(listed.path)
          if opened is None:
            self.close()
            return None, problem
          self._held[key] = opened
    except BaseException:
      self.close()
      raise
    return [self._held[key] for key in keys], ""

  def _open_one(self, path: str) -> tuple[Optional[Checkpoint], str]:
    """A checkpoint opened with its step, or None and why it cannot be used."""
    try:
      source = formats.open_source(path)
    except AveragingError as e:
      return None, f"{e} (still being written?)"
    try:
      # An AveragingError here (--step_from naming no tensor) is the
      # user's to fix, not a checkpoint's fault: it propagates.
      return naming.read_step(source, self._averaging.step_from,
                              names=naming.scheme_for(
                                  path, self._averaging.name_pattern)), ""
    except _READ_ERRORS as e:
      source.close()
      return None, f"cannot read checkpoint {path}: {error_text(e)}"
    except BaseException:
      source.close()
      raise

  def close(self) -> None:
    """Closes every checkpoint held (months of windows: handles go back)."""
    held, self._held = self._held, {}
    for checkpoint in held.values():
      checkpoint.opened.close()


class _MetricWait:
  """Weighs a window once its newest checkpoint's metric is logged."""

  def __init__(self, settings: options.ContinuousOptions,
               weighting_options: options.WeightingOptions,
               mode: Optional[str], *, clock: Clock, sleep: Sleep):
    self._settings = settings
    self._weighting = weighting_options
    self._mode = mode
    self._clock = clock
    self._sleep = sleep
    # One reader for the whole run: each poll reads only appended events.
    self._reader = (keras_logs.MetricReader(
        weighting_options.metrics_from_events, weighting_options.metric)
                    if weighting_options.metrics_from_events else None)

  def weigh(self, members: list[Checkpoint],
            newest: Checkpoint) -> tuple[Optional[weighting.Weighing], str]:
    """A Weighing once the newest checkpoint's metric is in, or why not."""
    settings = self._weighting
    if not settings.metrics_from_events:  # Explicit, without metrics to show.
      return weighting.weigh_checkpoints(members, None, settings), ""
    step = members[-1].step
    deadline = newest.ctime_ns / 1e9 + self._settings.wait_minutes * 60
    waiting = False
    while True:
      points, problem = self._metric_points(members[-1])
      if problem is None:
        break
      if self._clock() > deadline:
        return None, (f"the newest checkpoint of its window, {newest.path} "
                      f"(step {step}), has no {settings.metric} metric after "
                      f"--wait_minutes={self._settings.wait_minutes:g}: "
                      f"{problem}")
      if not waiting:
        logging.info("Waiting till %s for the %s metric of step %s",
                     time.asctime(time.localtime(deadline)), settings.metric,
                     step)
        waiting = True
      self._sleep(self._settings.poll_seconds)
    try:
      return weighting.weigh_checkpoints(members, points, settings,
                                         mode=self._mode), ""
    except AveragingError as e:
      return None, ("cannot weigh its checkpoints: " +
                    e.message(as_flags=True))  # The log speaks flags.

  def _metric_points(self, newest: Checkpoint) -> tuple[
      Optional[list[MetricPoint]], Optional[str]]:
    """(the metric's points, None) when `newest` has one; else (None, why)."""
    settings = self._weighting
    if newest.step is None:
      return None, "its step is unknown (see --step_from)"
    assert self._reader is not None
    try:
      points = self._reader.read()
      kind = points[0].kind
      at = keras_logs.checkpoint_positions([newest], kind)[0]
    except AveragingError as e:
      return None, e.message(as_flags=True)
    aligned = weighting.align_metrics_to_checkpoints(
        [at], points, max_step_gap=settings.max_step_gap)
    if aligned[0] is None:
      return None, (f"no point at {keras_logs.position_text(kind, at)} "
                    f"(--max_step_gap={settings.max_step_gap}); the last is "
                    f"at {keras_logs.position_text(kind, points[-1].step)}")
    return points, None


class _Outputs:
  """The output directory: earlier outputs and their settings; the times,
  run files, state file and summaries that go with a new output."""

  def __init__(self, settings: options.ContinuousOptions, recorded: dict,
               averaging_options: options.AveragingOptions, metric: str):
    self._settings = settings
    self._recorded = recorded
    self._summaries = averaging_options.weight_summaries
    self._metric = metric
    self._copied: set[str] = set()
    self._warned_times = False

  def differs(self, prefix: str) -> dict[str, tuple]:
    """{setting: (recorded, now)} where an output's record differs from now."""
    recorded = _recorded_settings(prefix)
    return {key: (recorded[key], value) for key, value in self._recorded.items()
            if key in recorded and recorded[key] != value}

  def refuse_other_settings(self) -> None:
    """Refuses existing outputs made with other settings, before any work."""
    output_dir = self._settings.output_dir
    for output in OUTPUTS.find_all(output_dir):
      differs = self.differs(output.path)
      if differs:
        then = ", ".join(f"{k}={v[0]!r}" for k, v in differs.items())
        now = ", ".join(f"{k}={v[1]!r}" for k, v in differs.items())
        raise AveragingError(
            "{output_dir} {directory} holds {output}, averaged with {then}; "
            "this run asks for {now} (pass {recompute} to replace such "
            "averages, or choose another {output_dir})",
            directory=output_dir, output=output.path, then=then, now=now)

  def finish(self, result: AveragingResult, newest: Checkpoint,
             members: list[Checkpoint]) -> None:
    """Times, run files and the state file, as downstream tools expect."""
    prefix = result.output_path
    fmt = members[-1].opened.format
    # t2t-bleu and t2t-translate-all date an average by its index file.
    for path in fmt.files(prefix):
      self._set_mtime(path, newest.mtime_ns)
    if fmt.has_state_file:
      self.copy_run_files()
      self._list_in_state_file([c.path for c in members])
    if self._summaries:
      events.write_weight_summaries(
          events.summaries_directory(self._settings.output_dir), result.rows,
          self._metric)

  def _list_in_state_file(self, input_paths: list[str]) -> None:
    output_dir = self._settings.output_dir
    outputs = present_outputs(output_dir)
    if checkpoints.holds_inputs(output_dir, input_paths, ignore=outputs):
      logging.warning("Not touching %s: that directory holds input "
                      "checkpoints", os.path.join(output_dir,
                                                  state_file.STATE_FILE))
    else:
      state_file.write(output_dir, outputs[-1], outputs)

  def _set_mtime(self, path: str, mtime_ns: int) -> None:
    if is_local(path):
      os.utime(path, ns=(mtime_ns, mtime_ns))
    elif not self._warned_times:
      logging.warning("Cannot set file times on %s: outputs and copied files "
                      "keep the time they were written (t2t-bleu's relative "
                      "times will be off)", path)
      self._warned_times = True

  def copy_run_files(self) -> None:
    """Copies flags.txt etc. with their times, unless already there."""
    for name in RUN_FILES:
      if name in self._copied:
        continue
      source = os.path.join(self._settings.model_dir, name)
      target = os.path.join(self._settings.output_dir, name)
      try:
        if filesystem.exists(target):
          self._copied.add(name)
          continue
        if not filesystem.exists(source):
          continue
        _copy_with_times(source, target, self._set_mtime)
      except OSError as e:
        logging.warning("Cannot copy %s to %s: %s", source, target,
                        error_text(e))
        continue
      self._copied.add(name)
      logging.info("Copied %s to %s with its times", source, target)


def numbers_settings(settings: options.ContinuousOptions,
                     weighting_options: options.WeightingOptions,
                     averaging_options: options.AveragingOptions) -> dict:
  """The settings that decide an output's numbers, as its record keeps them."""
  fields = dataclasses.asdict(weighting_options)
  del fields["metrics_from_events"]  # Where the metric is read does not count.
  if fields["weights"] is not None:
    fields["weights"] = list(fields["weights"])
  fields.update(n=settings.n, stride=settings.stride,
                exclude_variables=averaging_options.exclude_variables,
                allow_nonfinite=averaging_options.allow_nonfinite,
                step_from=averaging_options.step_from)
  return fields


def _recorded_settings(prefix: str) -> dict:
  """The settings an earlier output of this tool was made with, or {}.

  Records of earlier versions name only the weighting scheme and n.
  """
  try:
    record = json.loads(filesystem.read_text(prefix + RECORD_SUFFIX))
  except (OSError, ValueError):
    return {}  # Not ours (legacy t2t-avg-all), or unreadable.
  if "settings" in record:
    return record["settings"]
  return {"weighting": record.get("weighting", {}).get("scheme"),
          "n": record.get("continuous", {}).get("n")}


def _copy_with_times(source: str, target: str,
                     set_mtime: Callable[[str, int], None]) -> None:
  if is_local(source) and is_local(target):
    shared_dir.copy_atomically(source, target)
    return
  tmp = f"{target}.t2t_avg-tmp.{os.getpid()}"
  filesystem.copy(source, tmp)
  filesystem.rename(tmp, target)
  times = filesystem.times(source)
  if times is not None:
    set_mtime(target, times[0])


def _unreadable_input(window: tuple[Checkpoint, ...],
                      error: Exception) -> Optional[str]:
  """Which input made averaging fail by vanishing or not reading; else None.

  The inputs are checked again rather than the error's wording trusted: any
  that is gone or lacks a file (a TF data shard), then any the error names
  that its format's reader cannot read in full (checksums included). When
  all of them read, the error is the averaging's own (mismatched variables,
  NaN, the output) and is not the inputs' fault.
  """
  for listed in window:
    if not checkpoints.exists(listed.path):
      return f"checkpoint {listed.path} vanished while being averaged"
    missing = formats.missing_file(listed.path)
    if missing:
      return (f"checkpoint {listed.path} became incomplete while being "
              f"averaged: {missing} is missing")
  text = error_text(error)
  for listed in window:
    if re.search(re.escape(listed.path) + r"(?!\d)", text):
      problem = formats.read_in_full(listed.path)
      if problem:
        return (f"checkpoint {listed.path} cannot be read ({problem}): "
                f"{text}")
  return None


def present_outputs(output_dir: str) -> list[str]:
  """The `model.ckpt-<N>` checkpoints in a directory, oldest first."""
  return [c.path for c in naming.TFNames(OUTPUT_BASENAME, ours=None)
          .find_all(output_dir)]


def run(settings: options.ContinuousOptions, *,
        weighting_options: options.WeightingOptions = (
            options.WeightingOptions()),
        averaging_options: options.AveragingOptions = (
            options.AveragingOptions())) -> list[str]:
  """The `t2t-avg-all` job with real time: averages until nothing is new.

  Returns:
    The output prefixes written.

  Raises:
    AveragingError: as `average_all`; also when windows were formed but
      every one of them was skipped.
  """
  outcomes = list(average_all(settings, weighting_options=weighting_options,
                              averaging_options=averaging_options))
  written = [o.output_path for o in outcomes if o.status == WRITTEN]
  skipped = [o for o in outcomes if o.status == SKIPPED]
  if skipped and len(skipped) == len(outcomes):
    raise AveragingError(
        f"no window could be averaged ({len(skipped)} skipped); the last, "
        f"for step {skipped[-1].step}: {skipped[-1].reason}")
  return written
