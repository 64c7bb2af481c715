"""Which checkpoints: a list, a directory's last N, a directory given as one; opening them."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional
from collections.abc import Sequence

from absl import logging
import numpy as np

from t2t_avg import formats
from t2t_avg.errors import AveragingError
from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.formats import detect
from t2t_avg.formats import tf_bundle
from t2t_avg.inputs import naming
from t2t_avg.inputs.naming import Checkpoint
from t2t_avg.record import RECORD_SUFFIX

STATE_FILE = naming.STATE_FILE
GLOBAL_STEP = tf_bundle.GLOBAL_STEP
OBJECT_GRAPH_KEY = tf_bundle.OBJECT_GRAPH_KEY
__all__ = ["Checkpoint", "RECORD_SUFFIX"]  # Named here for the engine.


def exists(prefix: str) -> bool:
  """Whether a checkpoint (V2, or V1) is at `prefix`."""
  return tf_bundle.is_v2(prefix) or tf_bundle.is_v1(prefix)


def is_output_of_this_tool(prefix: str) -> bool:
  """Whether t2t_avg wrote the checkpoint at `prefix` (its record is there)."""
  return filesystem.exists(prefix + RECORD_SUFFIX)


def resolve(path: str) -> str:
  """A checkpoint prefix from a prefix, one of its files, or a directory.

  A directory means its latest checkpoint, as in legacy T2T (for a
  directory of Keras files without a state file: its newest file).

  Raises:
    AveragingError: nothing is there, or a directory that is a model.
  """
  if filesystem.isdir(path):
    path = _latest_in(path)
  path = paths.strip_file_suffix(path)
  if not exists(path):
    missing = ("" if naming.is_keras_name(path) else
               f" (no {path}{tf_bundle.INDEX_SUFFIX})")
    raise AveragingError(f"checkpoint {path} does not exist{missing}; "
                         f"{_what_is_there(os.path.dirname(path))}")
  return path


_NAMES_SHOWN = 10  # Checkpoints named when a mistyped one is not there.


def _what_is_there(directory: str) -> str:
  """The checkpoints a directory holds, in words, for a name that is not
  there: up to `_NAMES_SHOWN` names, the newest."""
  where = directory or "."
  if not filesystem.isdir(where):
    return f"directory {where} does not exist"
  listing = naming.look(directory)
  suffix = tf_bundle.INDEX_SUFFIX
  tf_names = sorted((n[:-len(suffix)] for n in listing.names
                     if n.endswith(suffix)),
                    key=lambda n: (naming.split_tf_name(n) or (n, -1), n))
  keras = sorted((n for n in listing.names
                  if naming.is_keras_name(n) and n not in listing.shards),
                 key=lambda n: (naming.name_number(n) or -1, n))
  names = tf_names + keras
  if not names:
    return f"{where} holds no checkpoint"
  if len(names) <= _NAMES_SHOWN:
    return f"{where} holds {', '.join(names)}"
  return (f"{where} holds {len(names)} checkpoints, the last "
          f"{_NAMES_SHOWN} {', '.join(names[-_NAMES_SHOWN:])}")


def _latest_in(directory: str) -> str:
  """The latest checkpoint of a directory: its state file's, or its newest
  Keras file's when it has no state file."""
  detect.refuse_directory(directory)
  state = naming.read_state(directory)
  if paths.is_local(directory) and (state is None or
                                    not state.model_checkpoint_path):
    listing = naming.look(directory)
    if listing.keras_files():
      files = naming.KerasNames().find_all(directory, listing, strict=True)
      if not files:
        raise AveragingError(f"directory {directory} holds no readable Keras "
                             f"file ({naming.KERAS_GLOBS})")
      return files[-1].path
  if state is None or not state.model_checkpoint_path:
    raise AveragingError(f"directory {directory} holds no checkpoint (no "
                         f"'{STATE_FILE}' state file naming one)")
  return naming.relocate(state.model_checkpoint_path, directory)


def from_list(checkpoints: Sequence[str], prefix: str = "") -> list[str]:
  """The `--checkpoints` list: `prefix` string-prepended to each (legacy)."""
  return [resolve(prefix + c) for c in checkpoints]


def choose_last(prefix: str, n: Optional[int], *,
                name_pattern: str = "") -> list[Checkpoint]:
  """The last `n` checkpoints of `dirname(prefix)` (None: all of them, the
  pool that selection flags choose from), oldest first.

  The directory is listed once. With a `checkpoint` state file: its last
  `n` TF checkpoints (see `naming.tf_last_n`), not yet opened. Without one,
  a local directory of Keras files gives its last `n` files named
  `basename(prefix)*`, opened (see `naming.KerasNames`).

  Raises:
    AveragingError: no state file and no Keras files, or a listed
      checkpoint is missing.
  """
  state_dir = os.path.dirname(prefix) or "."
  state = naming.read_state(state_dir)
  listing = naming.look(state_dir)
  if (state is None or not state.model_checkpoint_path) and paths.is_local(
      state_dir) and listing.keras_files():
    names = naming.KerasNames(os.path.basename(prefix), name_pattern)
    return naming.keras_last_n(names, state_dir, n, listing)
  return [Checkpoint(path, naming.tf_name_step(path), "name")
          for path in naming.tf_last_n(prefix, n, state, listing)]


def last_n(prefix: str, n: Optional[int]) -> list[str]:
  """The paths `choose_last` gives (nothing is left open)."""
  chosen = choose_last(prefix, n)
  for c in chosen:
    if c.source is not None:
      c.source.close()
  return [c.path for c in chosen]


def load(item: str | Checkpoint, step_from: str = "auto", *,
         name_pattern: str = "") -> Checkpoint:
  """A checkpoint opened, with its step: a path is resolved and opened; a
  Checkpoint found open is not reopened (its step is read as asked)."""
  if isinstance(item, Checkpoint) and item.source is not None:
    item.source.verify()
    found = naming.read_step(item.source, step_from, names=naming.scheme_for(
        item.path, name_pattern))
    return dataclasses.replace(found, mtime_ns=item.mtime_ns,
                               ctime_ns=item.ctime_ns)
  path = item.path if isinstance(item, Checkpoint) else item
  return naming.read_step(formats.open_source(resolve(path)), step_from,
                          names=naming.scheme_for(path, name_pattern))


def open_all(items: Sequence, step_from: str) -> list[Checkpoint]:
  """Checkpoints (opened) from paths or Checkpoints; each listed once.

  Raises:
    AveragingError: one is missing or unreadable, or listed twice.
  """
  opened: list[Checkpoint] = []
  for item in items:
    if not isinstance(item, Checkpoint):
      checkpoint = load(item, step_from)
    elif item.source is None:
      checkpoint = dataclasses.replace(
          item, source=formats.open_source(resolve(item.path)))
    else:
      item.source.verify()
      checkpoint = item
    if any(c.path == checkpoint.path for c in opened):
      raise AveragingError(f"checkpoint {checkpoint.path} is listed twice")
    opened.append(checkpoint)
  return opened


def newest_of(inputs: Sequence[Checkpoint], active: Sequence[int]) -> int:
  """Index of the newest input among `active`: the highest step.

  Inputs that share the highest step, or whose steps are unknown, cannot be
  told apart: the last listed of them counts as newest, with a warning
  naming them (non-float tensors are copied from it).
  """
  if any(inputs[i].step is None for i in active):
    logging.warning("Cannot tell which checkpoint is newest (a step is "
                    "unknown); taking the last listed, %s, as newest (its "
                    "non-float tensors are copied)", inputs[active[-1]].path)
    return active[-1]
  top = max(inputs[i].step or 0 for i in active)
  tied = [i for i in active if inputs[i].step == top]
  if len(tied) > 1:
    logging.warning("Checkpoints %s share step %d; taking the last listed, "
                    "%s, as newest (its non-float tensors are copied)",
                    ", ".join(inputs[i].path for i in tied), top,
                    inputs[tied[-1]].path)
  return tied[-1]


def holds_inputs(directory: str, input_paths: Sequence[str],
                 ignore: Sequence[str] = ()) -> bool:
  """Whether a directory holds input checkpoints, or any checkpoint not ours.

  `ignore` lists outputs of this run; outputs of earlier runs (with a
  record) do not count either.
  """
  directory = directory.rstrip("/") or "."
  if any((os.path.dirname(p) or ".") == directory for p in input_paths):
    return True
  ignored = set(ignore)
  listing = naming.look(directory)
  return any(listing.path(p) not in ignored for p in listing.tf_prefixes())


def scalar_bytes(value: int, dtype: np.dtype) -> np.ndarray:
  """`value` as a 0-d array of an integer dtype, or an AveragingError."""
  info = np.iinfo(dtype)
  if not info.min <= value <= info.max:
    raise AveragingError("{output_step}={value} does not fit the "
                         "{tensor} tensor's dtype {dtype} (at most {most})",
                         value=value, tensor=GLOBAL_STEP, dtype=dtype.name,
                         most=info.max)
  return np.asarray(value, dtype)
