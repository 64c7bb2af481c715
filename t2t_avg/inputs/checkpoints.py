"""Finding checkpoints (state files, directories, numbered names) and their steps."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional
from collections.abc import Sequence

from absl import logging
import numpy as np

from t2t_avg.files import filesystem
from t2t_avg import formats
from t2t_avg.inputs import keras_checkpoints
from t2t_avg.files import paths
from t2t_avg.formats import state_file
from t2t_avg.errors import AveragingError, error_text
from t2t_avg.formats import base
from t2t_avg.formats import detect
from t2t_avg.formats import tf_bundle

STATE_FILE = state_file.STATE_FILE
# Written beside every output of this tool; marks it so it is never taken as
# an input by the discovery of unlisted checkpoints.
RECORD_SUFFIX = ".t2t_avg.json"
GLOBAL_STEP = tf_bundle.GLOBAL_STEP
OBJECT_GRAPH_KEY = tf_bundle.OBJECT_GRAPH_KEY


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One input checkpoint: its path, the step it was saved at, and its source.

  Attributes:
    path: the checkpoint prefix (or file).
    step: its step, or None when unknown.
    step_source: where the step came from: a tensor key, 'name', 'unknown'.
    source: the opened checkpoint, when it was opened to read the step.
  """
  path: str
  step: Optional[int]
  step_source: str
  source: Optional[base.Source] = dataclasses.field(default=None,
                                                    compare=False, repr=False)

  @property
  def opened(self) -> base.Source:
    """The source, for a checkpoint `open_all` or `load` opened."""
    if self.source is None:
      raise AveragingError(f"checkpoint {self.path} was never opened")
    return self.source


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
    missing = ("" if keras_checkpoints.is_keras_name(path) else
               f" (no {path}{tf_bundle.INDEX_SUFFIX})")
    raise AveragingError(f"checkpoint {path} does not exist{missing}")
  return path


def _latest_in(directory: str) -> str:
  """The latest checkpoint of a directory: its state file's, or its newest
  Keras file's when it has no state file."""
  detect.refuse_directory(directory)
  if paths.is_local(directory) and _state(directory) is None and (
      keras_checkpoints.holds_keras_files(directory)):
    return keras_checkpoints.latest(directory)
  return _latest(directory)


def _latest(directory: str) -> str:
  """The checkpoint a directory's state file names (TF's reader, no noise)."""
  state = _state(directory)
  state_file = os.path.join(directory, STATE_FILE)
  if state is None or not state.model_checkpoint_path:
    raise AveragingError(f"directory {directory} holds no checkpoint (no "
                         f"'{STATE_FILE}' state file naming one)")
  return _relocate(state.model_checkpoint_path, directory, state_file)


def _state(directory: str) -> Optional[state_file.CheckpointState]:
  try:
    return state_file.read(directory)
  except (OSError, ValueError) as e:  # A garbled state file.
    raise AveragingError(f"cannot read {os.path.join(directory, STATE_FILE)}: "
                         f"{error_text(e)}") from e


def from_list(checkpoints: Sequence[str], prefix: str = "") -> list[str]:
  """The `--checkpoints` list: `prefix` string-prepended to each (legacy)."""
  return [resolve(prefix + c) for c in checkpoints]


def _relocate(listed: str, state_dir: str, state_file: str) -> str:
  """A state-file entry, or the same basename in the state file's directory.

  (TF's reader has already joined a relative entry to the directory.)
  """
  if exists(listed):
    return listed
  moved = os.path.join(state_dir, os.path.basename(listed))
  if moved != listed and exists(moved):
    logging.warning("%s lists %s, which does not exist; using %s (the "
                    "training directory was moved)", state_file, listed, moved)
    return moved
  raise AveragingError(f"{state_file} names checkpoint {listed}, whose files "
                       f"are missing (no {listed}{tf_bundle.INDEX_SUFFIX})")


def last_n(prefix: str, n: Optional[int]) -> list[str]:
  """The last `n` checkpoints of the state file in `dirname(prefix)`.

  TF2's `tf.train.Checkpoint.save` lists only its newest checkpoint: when
  fewer than `n` are listed, unlisted checkpoints of the same basename with a
  step number no higher than the newest listed one count too, highest first
  (never an output of this tool). `n=None` means all of them (the pool that
  selection flags choose from). A directory of Keras files has no state
  file: its last `n` files named `basename(prefix)*` are taken, see
  `keras_checkpoints.list_directory`.

  Raises:
    AveragingError: no state file, or a listed checkpoint is missing.
  """
  state_dir = os.path.dirname(prefix) or "."
  state_file = os.path.join(state_dir, STATE_FILE)
  state = _state(state_dir)
  if (state is None or not state.model_checkpoint_path) and paths.is_local(
      state_dir) and keras_checkpoints.holds_keras_files(state_dir):
    return keras_checkpoints.last_n(prefix, n)
  listed = _listed(prefix, state_dir, state_file)
  wanted = len(listed) if n is None else n
  chosen = [_relocate(p, state_dir, state_file) for p in listed[-wanted:]]
  if n is None or len(chosen) < n:
    unlisted = _unlisted(chosen, None if n is None else n - len(chosen))
    if unlisted:
      chosen = unlisted + chosen
      logging.info("%s lists %d checkpoints; using %d: %s", state_file,
                   len(listed), len(chosen), ", ".join(chosen))
  if n is not None and len(chosen) < n:
    logging.warning("--num_last_checkpoints=%d but only %d checkpoints were "
                    "found in %s", n, len(chosen), state_dir)
  return chosen


def _listed(prefix: str, state_dir: str, state_file: str) -> list[str]:
  """The paths a state file lists, oldest first, its newest last."""
  state = _state(state_dir)
  if state is None or not state.model_checkpoint_path:
    hint = ""
    if not prefix.endswith("/") and filesystem.exists(
        os.path.join(prefix, STATE_FILE)):
      hint = "; did you mean {prefix}={directory}/?"
    raise AveragingError("no checkpoint state file {state_file} (the "
                         "directory of {prefix})" + hint,
                         state_file=state_file, directory=prefix)
  listed = list(state.all_model_checkpoint_paths)
  if not listed or listed[-1] != state.model_checkpoint_path:
    listed.append(state.model_checkpoint_path)
  return listed


def _unlisted(listed: list[str], wanted: Optional[int]) -> list[str]:
  """Up to `wanted` (None: all) unlisted checkpoints older than the newest."""
  newest = listed[-1]
  newest_step = paths.name_step(newest)
  if newest_step is None or wanted == 0:
    return []
  base_name = os.path.basename(newest[:-len(f"-{newest_step}")])
  found = [(step, path) for step, path in numbered(os.path.dirname(newest),
                                                   base_name)
           if step <= newest_step and path not in listed and
           not is_output_of_this_tool(path)]
  return [path for _, path in (found if wanted is None else found[-wanted:])]


def numbered(directory: str, basename: str = "*") -> list[tuple[int, str]]:
  """(step, prefix) of the V2 checkpoints `<basename>-<N>` in a directory.

  Sorted by step (then name). `basename` may be a glob pattern ('*': any).
  """
  found = []
  pattern = os.path.join(directory, f"{basename}-[0-9]*{tf_bundle.INDEX_SUFFIX}")
  for index_file in _glob(pattern):
    path = index_file[:-len(tf_bundle.INDEX_SUFFIX)]
    step = paths.name_step(path)
    if step is not None:
      found.append((step, path))
  return sorted(found)


def _glob(pattern: str) -> list[str]:
  # GCS globbing can fail on a temporary file deleted meanwhile (T2T's
  # `_try_twice_tf_glob`).
  try:
    return filesystem.glob(pattern)
  except FileNotFoundError:
    return filesystem.glob(pattern)


def read_step(source: base.Source, step_from: str = "auto") -> Checkpoint:
  """The checkpoint with its step, from `step_from` or the first source found.

  `auto` looks at, in order: the format's step counters (for TF: a
  `global_step` tensor, then an optimizer's iteration counter, the inner
  optimizer's first for a Keras LossScaleOptimizer), then the trailing -N of
  the name (TF2 numbers files by save count, not training step, which is
  why the name comes last; for Keras files, ModelCheckpoint's `{epoch}`).

  Raises:
    AveragingError: the asked-for source is not there.
  """
  path = source.path
  if step_from == "name":
    step = source.name_step()
    if step is None:
      raise AveragingError("{step_from}=name: checkpoint {path} has no "
                           "trailing -N in its name", path=path)
    return Checkpoint(path, step, "name", source)
  tensors = source.tensors()
  if step_from != "auto":
    if step_from not in tensors:
      raise AveragingError("{step_from}={key}: checkpoint {path} has no "
                           "such tensor", key=step_from, path=path)
    return Checkpoint(path, _scalar_int(source, step_from), step_from, source)
  for key in source.step_keys:
    if key in tensors:
      return Checkpoint(path, _scalar_int(source, key), key, source)
  step = source.name_step()
  return Checkpoint(path, step, "name" if step is not None else "unknown",
                    source)


def _scalar_int(source: base.Source, key: str) -> int:
  tensor = source.tensors()[key]
  if not tensor.is_integer_scalar:
    raise AveragingError(f"tensor {key} in checkpoint {source.path} is not an "
                         "integer scalar, so it cannot give the step")
  return int(base.read_array(source, tensor))


def load(path: str, step_from: str = "auto") -> Checkpoint:
  """Resolves a checkpoint path, opens it, and reads its step."""
  return read_step(formats.open_source(resolve(path)), step_from)


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
  for index_file in _glob(os.path.join(directory,
                                       "*" + tf_bundle.INDEX_SUFFIX)):
    path = index_file[:-len(tf_bundle.INDEX_SUFFIX)]
    if path not in ignored and not is_output_of_this_tool(path):
      return True
  return False


def scalar_bytes(value: int, dtype: np.dtype) -> np.ndarray:
  """`value` as a 0-d array of an integer dtype, or an AveragingError."""
  info = np.iinfo(dtype)
  if not info.min <= value <= info.max:
    raise AveragingError("{output_step}={value} does not fit the "
                         "{tensor} tensor's dtype {dtype} (at most {most})",
                         value=value, tensor=GLOBAL_STEP, dtype=dtype.name,
                         most=info.max)
  return np.asarray(value, dtype)
