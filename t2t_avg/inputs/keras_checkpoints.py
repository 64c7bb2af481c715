"""Keras 3 files (`.weights.h5`, `.keras`) in a directory, oldest first; their names' numbers.

Keras' `ModelCheckpoint` writes no state file and Keras files hold no
`global_step`, so a directory is listed by file name suffix and ordered by,
in this order: the optimizer's iteration counter inside each file; the
number `ModelCheckpoint` put in each name (`{epoch}`, 1-based); the files'
modification times. The log says which.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Optional

from absl import logging

from t2t_avg.errors import AveragingError
from t2t_avg.formats import detect

SUFFIXES = detect.KERAS_SUFFIXES
RECORD_SUFFIX = ".t2t_avg.json"  # As checkpoints.RECORD_SUFFIX: our outputs.
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")
# How each directory was last ordered, so the log says it once per change.
_ORDER_LOGGED: dict[str, str] = {}
# (path, size, mtime_ns) -> (step, step key): files are not re-read per poll.
_STEP_CACHE: dict[tuple[str, int, int], tuple[Optional[int], str]] = {}

BY_COUNTER, BY_NAME, BY_MTIME = "counter", "name", "mtime"


@dataclasses.dataclass(frozen=True)
class KerasFile:
  """A Keras checkpoint file found in a directory.

  Attributes:
    path: the file.
    step: its optimizer iteration counter, else the number in its name, else
      None.
    step_source: the counter's dataset path, 'name', or 'unknown'.
    mtime_ns, ctime_ns: of the file.
  """
  path: str
  step: Optional[int]
  step_source: str
  mtime_ns: int
  ctime_ns: int


def is_keras_name(path: str) -> bool:
  """Whether a path ends in `.weights.h5` or `.keras`."""
  return path.endswith(SUFFIXES)


def name_number(path: str) -> Optional[int]:
  """The number `ModelCheckpoint` put in a file's name, or None.

  That is the last whole number of the name without its suffix; decimals
  such as `0.52` from `{val_loss:.2f}` do not count, so `w-03.weights.h5`,
  `weights.03-0.52.keras` and `resnet50-03.weights.h5` all give 3.
  """
  name = os.path.basename(path)
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      name = name[:-len(suffix)]
      break
  whole = [int(n) for n in _NUMBERS.findall(name) if "." not in n]
  return whole[-1] if whole else None


def candidates(directory: str, name_prefix: str = "") -> list[str]:
  """The Keras files in a directory whose names start with `name_prefix`.

  Outputs of t2t_avg (with a record beside them) are not candidates.
  """
  found = []
  for suffix in SUFFIXES:
    pattern = os.path.join(glob.escape(directory),
                           glob.escape(name_prefix) + "*" + suffix)
    found += [p for p in glob.glob(pattern)
              if os.path.isfile(p) and not os.path.exists(p + RECORD_SUFFIX)]
  return sorted(found)


def outputs_in(directory: str) -> list[str]:
  """The Keras files of a directory that are outputs of t2t_avg (a record
  beside them), by name."""
  return sorted(p for suffix in SUFFIXES for p in glob.glob(os.path.join(
      glob.escape(directory), "*" + suffix)) if os.path.exists(
          p + RECORD_SUFFIX))


def holds_keras_files(directory: str) -> bool:
  """Whether a local directory holds Keras checkpoint files."""
  return os.path.isdir(directory) and bool(candidates(directory))


def check_one_kind(directory: str) -> None:
  """Refuses a directory holding both TF checkpoints and Keras files.

  Raises:
    AveragingError: naming one of each.
  """
  keras = candidates(directory)
  tf_indexes = [p for p in sorted(glob.glob(os.path.join(
      glob.escape(directory), "*.index"))) if not os.path.exists(
          p[:-len(".index")] + RECORD_SUFFIX)]
  if keras and tf_indexes:
    raise AveragingError(
        "directory {directory} holds both TF checkpoints ({tf}) and Keras "
        "files ({keras}); t2t_avg lists one kind per directory: move one "
        "kind elsewhere, or name the files with {checkpoints}",
        directory=directory,
        tf=os.path.basename(tf_indexes[0])[:-len(".index")],
        keras=os.path.basename(keras[0]))


def _step_of(path: str, stat: os.stat_result) -> tuple[Optional[int], str]:
  """(the file's iteration counter, its dataset path), or (None, '')."""
  key = (path, stat.st_size, stat.st_mtime_ns)
  if key not in _STEP_CACHE:
    # pylint: disable-next=import-outside-toplevel
    from t2t_avg.formats import keras_h5
    if len(_STEP_CACHE) > 4096:
      _STEP_CACHE.clear()
    _STEP_CACHE[key] = keras_h5.read_counter(path)
  return _STEP_CACHE[key]


def _read(path: str) -> tuple[Optional[KerasFile], str]:
  """The file with its step, or (None, why it cannot be read now)."""
  try:
    stat = os.stat(path)
    counter, counter_key = _step_of(path, stat)
  except FileNotFoundError:
    return None, "it was deleted"
  except AveragingError as e:
    return None, str(e)
  step: Optional[int] = counter
  if counter is not None:
    source = counter_key
  else:
    step = name_number(path)
    source = "name" if step is not None else "unknown"
  return KerasFile(path, step, source, stat.st_mtime_ns, stat.st_ctime_ns), ""


def list_directory(directory: str, *, name_prefix: str = "",
                   warn_unreadable: bool = True) -> list[KerasFile]:
  """The Keras checkpoint files of a directory, oldest first.

  Ordered by the optimizer's iteration counter when every file has one,
  else by the number in the names when every name has one, else by
  modification time (ties: modification time, then name). The log says
  which, once per directory and change.

  Args:
    directory: a local directory.
    name_prefix: only files whose names start with it.
    warn_unreadable: warn about files that cannot be read (else DEBUG: a
      file still being written, in continuous mode).

  Raises:
    AveragingError: the directory holds TF checkpoints too.
  """
  check_one_kind(directory)
  files = []
  for path in candidates(directory, name_prefix):
    found, problem = _read(path)
    if found is None:
      (logging.warning if warn_unreadable else logging.debug)(
          "Leaving out %s: %s", path, problem)
      continue
    files.append(found)
  if not files:
    return []
  basis = _ordering(files)
  if basis == BY_COUNTER:
    files.sort(key=lambda f: (f.step, f.mtime_ns, f.path))
  elif basis == BY_NAME:
    files.sort(key=lambda f: (name_number(f.path), f.mtime_ns, f.path))
  else:
    files.sort(key=lambda f: (f.mtime_ns, f.path))
  _log_ordering(directory, basis, files)
  return files


def _ordering(files: list[KerasFile]) -> str:
  if all(f.step_source not in ("name", "unknown") for f in files):
    return BY_COUNTER
  if all(name_number(f.path) is not None for f in files):
    return BY_NAME
  return BY_MTIME


def _log_ordering(directory: str, basis: str, files: list[KerasFile]) -> None:
  text = {BY_COUNTER: "their optimizer iteration counters (%s)" % ", ".join(
              sorted({f.step_source for f in files})),
          BY_NAME: "the numbers in their names (ModelCheckpoint's {epoch})",
          BY_MTIME: "modification time (not every file has an iteration "
                    "counter or a number in its name)"}[basis]
  if _ORDER_LOGGED.get(directory) != text:
    _ORDER_LOGGED[directory] = text
    logging.info("Ordering the Keras files in %s by %s", directory, text)


def last_n(prefix: str, n: Optional[int]) -> list[str]:
  """The newest `n` (None: all) Keras files in `dirname(prefix)` named
  `basename(prefix)*`, oldest first.

  Raises:
    AveragingError: there are none.
  """
  directory = os.path.dirname(prefix) or "."
  files = list_directory(directory, name_prefix=os.path.basename(prefix))
  if not files:
    raise AveragingError(f"no Keras files (*.weights.h5, *.keras) named "
                         f"{os.path.basename(prefix)}* in {directory}")
  chosen = [f.path for f in (files if n is None else files[-n:])]
  logging.info("Using the last %d of %d Keras files in %s: %s", len(chosen),
               len(files), directory, ", ".join(chosen))
  if n is not None and len(chosen) < n:
    logging.warning("--num_last_checkpoints=%d but only %d Keras files were "
                    "found in %s", n, len(chosen), directory)
  return chosen


def latest(directory: str) -> str:
  """The newest Keras file of a directory (a directory given as a checkpoint).

  Raises:
    AveragingError: there is none.
  """
  files = list_directory(directory)
  if not files:
    raise AveragingError(f"directory {directory} holds no readable Keras "
                         "file (*.weights.h5, *.keras)")
  return files[-1].path
