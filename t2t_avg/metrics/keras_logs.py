"""Metrics from Keras' own logs, and where a checkpoint sits on their step axis.

Keras' `TensorBoard` callback logs `epoch_<metric>` (in `<log_dir>/train`
and, for validation, `<log_dir>/validation`) at the 0-based epoch, and
`evaluation_<metric>_vs_iterations` and `batch_<metric>` at the optimizer's
iteration count; `CSVLogger` writes one row per epoch, with a 0-based
`epoch` column and `val_*` columns. `ModelCheckpoint` names its files with
the 1-based `{epoch}` and stores the iteration counter inside them. So the
checkpoint saved after epoch e (the number in its name) pairs with the epoch
metric logged at e - 1, and with an iterations metric logged at its counter;
never silently with another epoch's. Every point carries its kind
(`metrics.STEP`, `EPOCH`, `ITERATIONS`), so alignment is explicit.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

from absl import logging

from t2t_avg.metrics import events
from t2t_avg.files import paths
from t2t_avg.formats import detect
from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.metrics.points import EPOCH, ITERATIONS, STEP, MetricPoint

_CSV_HEADER = re.compile(r"\ufeff?epoch(\W|$)")
_MISSING = ("", "NA")  # CSVLogger writes NA for a key missing from a row.
_MAX_LISTED = 40
# Each kind's steps, in words (error messages).
AXES = {STEP: "steps", EPOCH: "epochs (0-based)", ITERATIONS: "iterations"}


def tag_kind(tag: str) -> str:
  """What the step of a TensorBoard tag counts, from Keras' naming."""
  last = tag.rsplit("/", 1)[-1]
  if last.startswith("epoch_"):
    return EPOCH
  if last.endswith("_vs_iterations") or last.startswith("batch_"):
    return ITERATIONS
  return STEP


def is_csv(path: str) -> bool:
  """Whether a path is a CSV log with a header starting `epoch` (CSVLogger)."""
  if not paths.is_local(path) or not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    head = f.read(256)
  try:
    first = head.decode("utf-8").splitlines()[0] if head else ""
  except UnicodeDecodeError:
    return False
  return bool(_CSV_HEADER.match(first))


def read_metric(sources: Sequence[str], tag: str) -> list[MetricPoint]:
  """The metric's points from TensorBoard event files or directories, or from
  CSVLogger files (told apart by content), each point of its step kind.

  Raises:
    ArgumentError: CSV files and event files given together.
    AveragingError: as `events.read_metric` and `read_csv`.
  """
  return MetricReader(sources, tag).read()


class MetricReader:
  """A metric's points, read again as its logs grow (continuous mode).

  Event files are read incrementally (`events.MetricReader`); CSVLogger
  files, one short row per epoch, are read whole each time. Which kind the
  sources are is decided once they all exist (a CSV log may appear only
  when training starts).
  """

  def __init__(self, sources: Sequence[str], tag: str):
    self._sources = list(sources)
    self._tag = tag
    self._tables: Optional[list[str]] = None  # Undecided until they exist.
    self._events: Optional[events.MetricReader] = None

  def read(self) -> list[MetricPoint]:
    """Every point so far, sorted by step, of the metric's step kind.

    Raises:
      ArgumentError: CSV files and event files given together.
      AveragingError: as `events.read_metric` and `read_csv`.
    """
    if self._tables is None and self._events is None:
      self._decide()
    if self._tables:
      return read_csv(self._tables, self._tag)
    if self._events is None:
      self._events = events.MetricReader(self._sources, self._tag)
      kind = tag_kind(self._tag)
      if kind != STEP:
        logging.info("Metric %s is logged by %s (Keras' naming)", self._tag,
                     "0-based epoch" if kind == EPOCH else
                     "optimizer iterations")
    points = self._events.read()
    kind = tag_kind(self._tag)
    return points if kind == STEP else [dataclasses.replace(p, kind=kind)
                                        for p in points]

  def _decide(self) -> None:
    tables = [s for s in self._sources if is_csv(s)]
    if tables and len(tables) != len(self._sources):
      others = [s for s in self._sources if s not in tables]
      raise ArgumentError(
          "{metrics_from_events} mixes CSV logs ({table}) and TensorBoard "
          "events ({other}); give one kind", table=tables[0], other=others[0])
    missing = [s for s in self._sources if paths.is_local(s) and
               not os.path.exists(s)]
    if missing and not tables:
      raise AveragingError(f"Event file or directory {missing[0]} does not "
                           "exist")
    self._tables = tables


def read_csv(paths_: Sequence[str], column: str) -> list[MetricPoint]:
  """Every row's value of a column of CSVLogger files, one point per epoch.

  `NA` (a key missing from that epoch's logs) gives no point; `nan` and
  `inf` are values. An epoch in several rows (a run resumed with
  `append=True`) keeps the last one, with a warning when they differ. A last
  line without its line end (a file being written) is left out. Rows have
  no time: a point's wall_time is its line number.

  Raises:
    AveragingError: no such column (the message lists the columns), or a
      value that is not a number.
  """
  points: dict[int, MetricPoint] = {}
  for path in paths_:
    for point in _csv_points(path, column):
      old = points.get(point.step)
      if old is not None and not (old.value == point.value or (
          math.isnan(old.value) and math.isnan(point.value))):
        logging.warning("%s: epoch %d has two %s values, %r and %r; the later "
                        "row counts", path, point.step, column, old.value,
                        point.value)
      points[point.step] = point
  logging.info("Read %d points of %r from %d CSV files (epochs, 0-based)",
               len(points), column, len(paths_))
  return [points[epoch] for epoch in sorted(points)]


def _csv_points(path: str, column: str) -> list[MetricPoint]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    text = f.read()
  lines = text.splitlines()
  if len(lines) > 1 and not text.endswith(("\n", "\r")):
    logging.debug("%s: leaving out its last line, not ended (still being "
                  "written?)", path)
    lines.pop()  # CSVLogger writes whole lines: this one is being written.
  header_line = lines[0] if lines else ""
  separator = header_line[5:6] or ","
  rows = list(csv.reader(lines, delimiter=separator))
  header = rows[0]
  if column not in header:
    columns = ", ".join(header[1:_MAX_LISTED + 1]) or "none"
    raise AveragingError(f"Metric column {column!r} not found in {path}; "
                         f"columns there: {columns}")
  index = header.index(column)
  points = []
  for line, row in enumerate(rows[1:], start=2):
    if not row or row == header:
      continue  # A header repeated by a second CSVLogger appending.
    if len(row) != len(header) or not row[0].strip().isdigit():
      raise AveragingError(f"{path}: line {line} is not a CSVLogger row "
                           f"({separator.join(row)[:80]!r})")
    value = row[index].strip()
    if value in _MISSING:
      continue
    try:
      number = float(value)
    except ValueError as e:
      raise AveragingError(f"{path}: column {column!r} holds {value[:40]!r} "
                           f"at epoch {row[0]}, not a number") from e
    points.append(MetricPoint(int(row[0]), float(line), number, EPOCH))
  return points


def _is_keras(checkpoint: Any) -> bool:
  """Whether a `Checkpoint` (anything with a path and a source: this module
  does not import TensorFlow) is a Keras file."""
  source = getattr(checkpoint, "source", None)
  if source is not None:
    return source.format.name.startswith("Keras")
  return checkpoint.path.endswith(detect.KERAS_FILE_SUFFIXES)


def checkpoint_positions(checkpoints: Sequence, kind: str, *,
                         log: bool = False) -> list[int]:
  """Where each checkpoint sits on the step axis of a metric of `kind`.

  STEP and ITERATIONS: the checkpoint's step. EPOCH: the number in a Keras
  file's name minus 1 (ModelCheckpoint's `{epoch}` is 1-based, the logs'
  epoch 0-based).

  Args:
    checkpoints: `Checkpoint`s (path, step, step source, source).
    kind: what the metric's steps count.
    log: say how an epoch metric is paired (one INFO line).

  Raises:
    AveragingError: a step that is unknown; a Keras file whose step is the
      number in its name (an epoch) for an iterations metric; for an epoch
      metric, a checkpoint without an epoch in its name, two with the same
      epoch, or names whose numbers do not follow the iteration counters.
  """
  if kind == EPOCH:
    positions = _epoch_positions(checkpoints)
    if log:
      logging.info("The metric is logged per epoch (0-based): pairing each "
                   "file of epoch e with epoch e-1: %s", ", ".join(
                       f"{os.path.basename(c.path)} -> {p}"
                       for c, p in zip(checkpoints, positions)))
    return positions
  positions = []
  for c in checkpoints:
    if c.step is None:
      raise AveragingError("the step of checkpoint {path} is unknown, so no "
                           "metric can be matched to it (see {step_from})",
                           path=c.path)
    if kind == ITERATIONS and c.step_source == "name" and _is_keras(c):
      raise AveragingError(
          f"checkpoint {c.path} has no optimizer iteration counter (its step "
          f"{c.step} is the number in its name, an epoch), so a metric logged "
          "by iterations cannot be matched to it; weigh by an epoch_* tag or "
          "a CSVLogger file")
    positions.append(c.step)
  return positions


def _epoch_positions(checkpoints: Sequence) -> list[int]:
  epochs = []
  for c in checkpoints:
    epoch = c.epoch if _is_keras(c) else None
    numbers = getattr(c, "name_numbers", ())
    if epoch is None and len(numbers) > 1:
      raise ArgumentError(
          "checkpoint {path} has several numbers in its name ({numbers}), so "
          "its epoch is not known for sure and a metric logged per epoch "
          "cannot be matched to it; give the ModelCheckpoint filepath that "
          "named it as {name_pattern} (e.g. {example})", path=c.path,
          numbers=", ".join(str(n) for n in numbers),
          example=_example_pattern(c.path))
    if epoch is None or epoch < 1:
      raise AveragingError(
          f"checkpoint {c.path} has no epoch in its name (only Keras files "
          "named by ModelCheckpoint's {epoch} do), so a metric logged per "
          "epoch (epoch_* tags, CSVLogger rows) cannot be matched to it; "
          "weigh by a metric logged by step, e.g. "
          "evaluation_loss_vs_iterations")
    epochs.append(epoch)
  by_epoch = sorted(zip(epochs, range(len(epochs))))
  for (epoch_a, a), (epoch_b, b) in zip(by_epoch, by_epoch[1:]):
    first, second = checkpoints[a], checkpoints[b]
    if epoch_a == epoch_b:
      raise AveragingError(
          f"checkpoints {first.path} and {second.path} both have epoch "
          f"{epoch_a} in their names (saved within an epoch, save_freq=N?), so "
          "a per-epoch metric cannot tell them apart; weigh by an "
          "evaluation_*_vs_iterations tag")
    counted = all(c.step is not None and c.step_source not in (
        "name", "unknown") for c in (first, second))
    if counted and first.step >= second.step:
      raise AveragingError(
          f"the numbers in the names of {first.path} ({epoch_a}) and "
          f"{second.path} ({epoch_b}) do not follow their iteration counters "
          f"({first.step}, {second.step}), so they are not epochs; weigh by "
          "an evaluation_*_vs_iterations tag")
  return [epoch - 1 for epoch in epochs]


def _example_pattern(path: str) -> str:
  """A name pattern for a file, its first number taken as the epoch (numbers
  glued to a letter only when there are no others)."""
  name = os.path.basename(path)
  suffix = next((s for s in detect.KERAS_FILE_SUFFIXES if name.endswith(s)),
                "")
  stem = name[:len(name) - len(suffix)]
  whole = r"(?<!\d)(?<!\d\.)\d+(?!\d|\.\d)"
  alone = r"(?<![A-Za-z])" + whole
  fields = iter(("{epoch}", "{batch}"))
  return repr(re.sub(alone if re.search(alone, stem) else whole,
                     lambda m: next(fields, m.group()), stem) + suffix)


def position_text(kind: str, position: int) -> str:
  """A position on a metric's step axis, in words."""
  if kind == EPOCH:
    return (f"epoch {position} (0-based, as logged: the file of epoch "
            f"{position + 1})")
  if kind == ITERATIONS:
    return f"iteration {position}"
  return f"step {position}"
