"""Scalar metrics from TensorBoard event files, every logged point kept.

Event files are decoded and written by `formats.tf_events`, without
TensorFlow; TF is imported only to reach remote paths (`gs://`).
"""
import contextlib
import dataclasses
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Optional

from absl import logging

from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.files import shared_dir
from t2t_avg.formats import tf_events
from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.metrics.points import MetricPoint
from t2t_avg.record import CheckpointRow

_HEADER, _FOOTER = tf_events.HEADER, tf_events.FOOTER
_MAX_TAGS_LISTED = 40
_MAX_CONFLICT_WARNINGS = 10


def read_metric(sources: Sequence[str], tag: str) -> list[MetricPoint]:
  """Reads every logged value of a scalar tag, one point per step.

  Both encodings are read: `simple_value` (TF1 FileWriter, Estimator, T2T)
  and 0-d numeric tensors (TF2 `tf.summary.scalar`, Keras). Nothing is
  sampled and nothing is dropped after restart markers. A step logged more
  than once (restarts, several files) keeps the point with the latest wall
  time. NaN and inf values are returned as they are.

  A truncated last record (a file still being written) ends that file
  quietly; a record whose CRC does not match, or that does not parse, ends
  that file with a warning naming it and the record's byte offset.

  Args:
    sources: event files, or directories whose files with `tfevents` in their
      name are read in name order (not recursively). Local paths, or any
      `tf.io.gfile` path (`gs://`).
    tag: the scalar tag, e.g.
      `metrics-translate_ende/targets/approx_bleu_score`.

  Returns:
    The points, sorted by step.

  Raises:
    AveragingError: a source does not exist or holds no event files, or the
      tag was not logged as a scalar (the message lists the scalar tags that
      were).
    ArgumentError: no sources.
  """
  return MetricReader(sources, tag).read()


@dataclasses.dataclass
class _FileState:
  """How far one event file has been read."""
  offset: int = 0  # Where the next unread record starts.
  ended: bool = False  # A corrupted record: the rest is never read.


class MetricReader:
  """A scalar tag's points, read incrementally as event files grow.

  Each `read` lists the sources again and reads only the records appended
  to each file since the last call, as TensorBoard's loader does: a
  truncated last record is read again, whole, next time; a corrupted one
  ends its file for good, with a warning. For continuous mode, which polls
  the same files for months of training.
  """

  def __init__(self, sources: Sequence[str], tag: str):
    if not sources:
      raise ArgumentError("{metrics_from_events} needs at least one event "
                          "file or directory")
    self._sources = list(sources)
    self._tag = tag
    self._files: dict[str, _FileState] = {}
    self._points: dict[int, MetricPoint] = {}
    self._tags: set[str] = set()
    self._conflicts = 0

  def read(self) -> list[MetricPoint]:
    """Every point of the tag so far, sorted by step (see `read_metric`)."""
    files = [path for source in self._sources for path in _event_files(source)]
    before = len(self._points)
    for path in files:
      state = self._files.setdefault(path, _FileState())
      if not state.ended:
        for point in _read_file(path, self._tag, self._tags, state):
          self._add(point)
    if not self._points:
      raise _unknown_tag(self._tag, self._sources, self._tags)
    if len(self._points) != before:
      logging.info("Read %d points of %r from %d event files",
                   len(self._points), self._tag, len(files))
    return [self._points[step] for step in sorted(self._points)]

  def _add(self, point: MetricPoint) -> None:
    old = self._points.get(point.step)
    if old is not None and not _same_value(old.value, point.value):
      self._conflicts += 1
      if self._conflicts <= _MAX_CONFLICT_WARNINGS:
        logging.warning(
            "Tag %r logged twice at step %d with different values: %r "
            "(wall time %.3f) and %r (wall time %.3f); the later one counts",
            self._tag, point.step, old.value, old.wall_time, point.value,
            point.wall_time)
      elif self._conflicts == _MAX_CONFLICT_WARNINGS + 1:
        logging.warning("Tag %r: more steps were logged twice with different "
                        "values; not listing them", self._tag)
    if old is None or point.wall_time >= old.wall_time:
      self._points[point.step] = point


def _same_value(a: float, b: float) -> bool:
  return a == b or (math.isnan(a) and math.isnan(b))


def _unknown_tag(tag: str, sources: Sequence[str],
                 tags: set[str]) -> AveragingError:
  where = ", ".join(sources)
  hint = "".join(_subdirectories_hint(source, len(sources) > 1)
                 for source in sources)
  if not tags:
    return AveragingError(
        f"Metric tag {tag!r} not found: no scalar tags were found in "
        f"{where}{hint}")
  listed = sorted(tags)
  shown = ", ".join(listed[:_MAX_TAGS_LISTED])
  if len(listed) > _MAX_TAGS_LISTED:
    shown += f", ... ({len(listed) - _MAX_TAGS_LISTED} more)"
  return AveragingError(f"Metric tag {tag!r} not found in {where}; "
                        f"scalar tags there: {shown}{hint}")


def _is_eval(name: str) -> bool:
  """Whether a run directory holds evaluation (Estimator's and T2T's
  `eval*/`, Keras' `validation/`)."""
  return name.startswith("eval") or name == "validation"


def event_subdirectories(directory: str) -> list[str]:
  """The names of a directory's subdirectories that hold event files, eval
  first (`eval*`, `validation`), then by name; [] where it cannot be read."""
  found = []
  try:
    for name in sorted(n.rstrip("/") for n in filesystem.listdir(directory)):
      path = os.path.join(directory, name)
      if filesystem.isdir(path) and any(
          "tfevents" in n for n in filesystem.listdir(path)):
        found.append(name)
  except OSError:
    return []
  return sorted(found, key=lambda name: not _is_eval(name))


def _subdirectories_hint(directory: str, named: bool = False) -> str:
  """'; its subdirectories validation/ and train/ hold event files: pass
  one of them', or '' when none does (or it is no directory)."""
  if not filesystem.isdir(directory):
    return ""
  found = [name + "/" for name in event_subdirectories(directory)]
  if not found:
    return ""
  whose = f"{directory}'s" if named else "its"
  if len(found) == 1:
    return f"; {whose} subdirectory {found[0]} holds event files: pass it"
  listed = ", ".join(found[:-1]) + " and " + found[-1]
  return (f"; {whose} subdirectories {listed} hold event files: pass one of "
          "them")


def _event_files(source: str) -> list[str]:
  """The event files of one source: itself, or a directory's (one run)."""
  if filesystem.isdir(source):
    names = sorted(name.rstrip("/") for name in filesystem.listdir(source))
    found = [os.path.join(source, name) for name in names if "tfevents" in name]
    if not found:
      raise AveragingError(
          f"No TensorBoard event files (*tfevents*) in directory {source}"
          f"{_subdirectories_hint(source)}")
    if any(name.endswith(".index") or name == "checkpoint" for name in names):
      _warn_of_training_events(source)
    return found
  if not filesystem.exists(source):
    raise AveragingError(f"Event file or directory {source} does not exist")
  return [source]


def _warn_of_training_events(directory: str) -> None:
  """Warns that a directory holding checkpoints logs training, not eval,
  naming its eval subdirectories when it has some."""
  evals = [os.path.join(directory, name)
           for name in event_subdirectories(directory) if _is_eval(name)]
  if not evals:
    logging.warning(
        "%s holds checkpoints as well as events: that is usually training "
        "loss, not eval (Estimator and T2T write eval summaries to its "
        "eval/ subdirectory)", directory)
    return
  logging.warning(
      "%s holds checkpoints as well as events: that is usually training "
      "loss, not eval; for the eval metric pass %s instead", directory,
      " or ".join(evals))


def _read_file(path: str, tag: str, tags: set[str],
               state: _FileState) -> Iterator[MetricPoint]:
  """Yields the new points of `tag` in one file; adds scalar tags to `tags`."""
  for offset, record in _records(path, state):
    try:
      event = tf_events.decode_event(record)
    except ValueError:
      logging.warning("%s: record at byte %d is not an Event; ignoring the "
                      "rest of this file", path, offset)
      state.ended = True
      return
    for value in event.summary or ():
      tensor = value.tensor
      if not (value.kind == "simple_value" or (
          tensor is not None and not tensor.shape and
          tf_events.is_numeric(tensor.dtype))):
        continue  # images, histograms, strings (e.g. `checkpoint_path`)...
      tags.add(value.tag)
      if value.tag != tag:
        continue
      # A tensor is converted only when it is the tag asked for.
      number = (value.simple_value if tensor is None else
                _tensor_number(path, offset, tag, tensor))
      if number is not None:
        yield MetricPoint(step=event.step, wall_time=event.wall_time,
                          value=float(number))


def _tensor_number(path: str, offset: int, tag: str,
                   tensor: tf_events.Tensor) -> Optional[float]:
  """A 0-d tensor's number; None, with a warning, for a malformed one."""
  try:
    return tf_events.scalar(tensor)
  except ValueError as e:
    logging.warning("%s: record at byte %d: tag %r is not one number (%s); "
                    "skipped", path, offset, tag, e)
    return None


@contextlib.contextmanager
def _open(path: str) -> Iterator[BinaryIO]:
  """An event file opened for reading; its errors name it."""
  try:
    with filesystem.open_read(path) as f:
      yield f
  except OSError as e:
    raise AveragingError(f"Event file {path} cannot be read: "
                         f"{e.strerror or e}") from e


def _records(path: str, state: _FileState) -> Iterator[tuple[int, bytes]]:
  """Yields (byte offset, data) of each new TFRecord whose two CRCs match.

  Starts at `state.offset` and moves it past each record yielded. Stops
  quietly at a truncated tail (read again next time), and with a warning at
  the first record that fails a CRC (`state.ended`): after that, record
  boundaries cannot be trusted.
  """
  with _open(path) as f:
    f.seek(state.offset)
    while True:
      offset = state.offset
      header = f.read(_HEADER.size)
      if len(header) < _HEADER.size:
        if header:
          logging.debug("%s: truncated record header at byte %d (still being "
                        "written?)", path, offset)
        return
      length, length_crc = _HEADER.unpack(header)
      if tf_events.masked_crc(header[:8]) != length_crc:
        logging.warning("%s: corrupted record (length CRC mismatch) at byte "
                        "%d; ignoring the rest of this file", path, offset)
        state.ended = True
        return
      body = f.read(length + _FOOTER.size)
      if len(body) < length + _FOOTER.size:
        logging.debug("%s: truncated record at byte %d (still being "
                      "written?)", path, offset)
        return
      data = body[:length]
      if tf_events.masked_crc(data) != _FOOTER.unpack(body[length:])[0]:
        logging.warning("%s: corrupted record (data CRC mismatch) at byte %d; "
                        "ignoring the rest of this file", path, offset)
        state.ended = True
        return
      state.offset = offset + _HEADER.size + length + _FOOTER.size
      yield offset, data


SUMMARIES_DIR = "t2t_avg"


def summaries_directory(output_dir: str) -> str:
  """Where weight summaries go beside outputs, checked before any work.

  Raises:
    AveragingError: the name is a link or another user's (see `files.shared_dir`).
  """
  path = os.path.join(output_dir, SUMMARIES_DIR)
  if paths.is_local(path):
    shared_dir.check_own_dir(path)
  return path


def write_weight_summaries(directory: str, rows: Sequence[CheckpointRow],
                           tag: str) -> None:
  """Writes each checkpoint's weight (and metric) as TensorBoard scalars.

  Under `t2t_avg/weight` and `t2t_avg/<tag>` at each checkpoint's step, so
  `tensorboard --logdir` shows on the training curve which checkpoints were
  used, and how much. One new event file, as TF1's `FileWriter` writes it:
  a `file_version` event, then one event of `simple_value`s per step.

  Args:
    directory: where the event file goes (e.g. `<output dir>/t2t_avg`).
    rows: the inputs as averaged (step, weight, metric).
    tag: the metric's tag.
  """
  now = time.time()
  records = [tf_events.encode_event(now, file_version=tf_events.FILE_VERSION)]
  for row in rows:
    if row.step is None:
      continue
    scalars = [("t2t_avg/weight", row.weight)]
    if row.metric is not None:
      scalars.append((f"t2t_avg/{tag}", row.metric))
    records.append(tf_events.encode_event(now, row.step, scalars=scalars))
  data = b"".join(tf_events.frame(record) for record in records)
  # FileWriter's name, whose time is in whole seconds: a suffix keeps a
  # second call within the same second (continuous mode) from replacing the
  # first.
  name = (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}"
          f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
  path = os.path.join(directory, name)
  if paths.is_local(directory):
    shared_dir.make_own_dir(directory)  # Never a planted link.
    shared_dir.write_atomically(path, data)
  else:
    filesystem.makedirs(directory)
    filesystem.write_bytes(path, data)
  logging.info("Wrote the weights as TensorBoard scalars in %s", directory)
