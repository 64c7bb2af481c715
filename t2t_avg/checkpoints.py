"""Finding checkpoints, reading their metadata and their step numbers."""
import dataclasses
import os
import re
from typing import Optional, Sequence

from absl import logging
import tensorflow as tf

from t2t_avg.errors import AveragingError

STATE_FILE = "checkpoint"
# Written beside every output of this tool; marks it so it is never taken as
# an input by the discovery of unlisted checkpoints.
RECORD_SUFFIX = ".t2t_avg.json"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
GLOBAL_STEP = "global_step"
ITERATION_COUNTERS = ("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE",
                      "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")

_NAME_STEP = re.compile(r"-(\d+)$")
_DATA_SHARD = re.compile(r"\.data-(\d{5})-of-(\d{5})$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One input checkpoint: its prefix and the step it was saved at."""
  path: str
  step: Optional[int]
  step_source: str  # 'global_step', an iteration counter key, 'name', ...


@dataclasses.dataclass(frozen=True)
class VariableSpec:
  name: str
  shape: tuple
  dtype: tf.DType


def name_step(path: str) -> Optional[int]:
  """The trailing -N of a checkpoint prefix, or None."""
  match = _NAME_STEP.search(path)
  return int(match.group(1)) if match else None


def exists(prefix: str) -> bool:
  return tf.io.gfile.exists(prefix + ".index")


def is_output_of_this_tool(prefix: str) -> bool:
  return tf.io.gfile.exists(prefix + RECORD_SUFFIX)


def _strip_file_suffix(path: str) -> str:
  # Tab completion gives `model.ckpt-100.index`; the checkpoint is the prefix.
  for suffix in (".index", ".meta"):
    if path.endswith(suffix):
      return path[:-len(suffix)]
  return path


def resolve(path: str) -> str:
  """A checkpoint prefix from a prefix, one of its files, or a directory.

  A directory means its latest checkpoint, as in legacy T2T.

  Raises:
    AveragingError: nothing is there.
  """
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise AveragingError(f"directory {path} holds no checkpoint (no "
                           f"'{STATE_FILE}' state file naming one)")
    path = latest
  path = _strip_file_suffix(path)
  if not exists(path):
    raise AveragingError(f"checkpoint {path} does not exist "
                         f"(no {path}.index)")
  return path


def from_list(checkpoints: Sequence[str], prefix: str = "") -> list:
  """The `--checkpoints` list: `prefix` string-prepended to each (legacy)."""
  names = [c.strip() for c in checkpoints]
  names = [c for c in names if c]
  if not names:
    raise ValueError("--checkpoints: no checkpoints given")
  return [resolve(prefix + c) for c in names]


def _relocate(listed: str, state_dir: str, state_file: str) -> str:
  """A state-file entry, or the same basename in the state file's directory."""
  if exists(listed):
    return listed
  moved = os.path.join(state_dir, os.path.basename(listed))
  if moved != listed and exists(moved):
    logging.warning("%s lists %s, which does not exist; using %s (the "
                    "training directory was moved)", state_file, listed, moved)
    return moved
  raise AveragingError(f"checkpoint {listed} listed in {state_file} does not "
                       "exist")


def last_n(prefix: str, n: int) -> list:
  """The last `n` checkpoints of the state file in `dirname(prefix)`.

  TF2's `tf.train.Checkpoint.save` lists only its newest checkpoint: when
  fewer than `n` are listed, unlisted checkpoints of the same basename with a
  step number no higher than the newest listed one count too, highest first
  (never an output of this tool).

  Raises:
    AveragingError: no state file, or a listed checkpoint is missing.
  """
  state_dir = os.path.dirname(prefix) or "."
  state_file = os.path.join(state_dir, STATE_FILE)
  try:
    state = tf.train.get_checkpoint_state(state_dir)
  except (tf.errors.OpError, ValueError) as e:  # A garbled state file.
    raise AveragingError(f"cannot read {state_file}: {e}") from e
  if state is None or not state.model_checkpoint_path:
    raise AveragingError(f"no checkpoint state file {state_file} (the "
                         "directory of --prefix)")
  listed = list(state.all_model_checkpoint_paths)
  if not listed or listed[-1] != state.model_checkpoint_path:
    listed.append(state.model_checkpoint_path)
  chosen = [_relocate(p, state_dir, state_file) for p in listed[-n:]]
  if len(chosen) < n:
    chosen = _unlisted(chosen, n - len(chosen)) + chosen
    logging.info("%s lists %d checkpoints; using %d: %s", state_file,
                 len(listed), len(chosen), ", ".join(chosen))
  if len(chosen) < n:
    logging.warning("--num_last_checkpoints=%d but only %d checkpoints were "
                    "found in %s", n, len(chosen), state_dir)
  return chosen


def _unlisted(listed: list, wanted: int) -> list:
  """Up to `wanted` unlisted checkpoints older than the newest listed one."""
  newest = listed[-1]
  newest_step = name_step(newest)
  if newest_step is None:
    return []
  base = newest[:-len(f"-{newest_step}")]
  found = []
  for index_file in tf.io.gfile.glob(base + "-*.index"):
    path = index_file[:-len(".index")]
    step = name_step(path)
    if (step is not None and step <= newest_step and path not in listed and
        path[len(base):] == f"-{step}" and not is_output_of_this_tool(path)):
      found.append((step, path))
  found.sort(reverse=True)
  return [path for _, path in sorted(found[:wanted])]


def open_reader(path: str):
  """A `CheckpointReader`, or an AveragingError naming the checkpoint."""
  missing = missing_data_files(path)
  if missing:
    raise AveragingError(f"checkpoint {path} is incomplete: {missing} is "
                         "missing")
  try:
    return tf.train.load_checkpoint(path)
  except (tf.errors.OpError, ValueError) as e:
    raise AveragingError(f"cannot read checkpoint {path}: "
                         f"{error_text(e)}") from e


def missing_data_files(path: str) -> Optional[str]:
  """The first missing `.data-*` shard of a checkpoint, or None."""
  shards = {}
  for name in tf.io.gfile.glob(path + ".data-*"):
    match = _DATA_SHARD.search(name)
    if match:
      shards[int(match.group(1))] = int(match.group(2))
  if not shards:
    return f"{path}.data-00000-of-00001"
  total = max(shards.values())
  for i in range(total):
    if i not in shards:
      return f"{path}.data-{i:05d}-of-{total:05d}"
  return None


def error_text(error: Exception) -> str:
  text = getattr(error, "message", None) or str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def variable_specs(reader) -> dict:
  """{name: VariableSpec} of a checkpoint."""
  shapes = reader.get_variable_to_shape_map()
  dtypes = reader.get_variable_to_dtype_map()
  return {name: VariableSpec(name, tuple(shapes[name]), dtypes[name])
          for name in shapes}


def read_step(reader, path: str, step_from: str = "auto") -> Checkpoint:
  """The checkpoint with its step, from `step_from` or the first source found.

  `auto` looks at, in order: a `global_step` tensor, an optimizer iteration
  counter, the trailing -N of the name (TF2 numbers files by save count, not
  training step, which is why the name comes last).

  Raises:
    AveragingError: the asked-for source is not there.
  """
  if step_from == "name":
    step = name_step(path)
    if step is None:
      raise AveragingError(f"--step_from=name: checkpoint {path} has no "
                           "trailing -N in its name")
    return Checkpoint(path, step, "name")
  keys = reader.get_variable_to_shape_map()
  if step_from != "auto":
    if step_from not in keys:
      raise AveragingError(f"--step_from={step_from}: checkpoint {path} has "
                           "no such tensor")
    return Checkpoint(path, _scalar_int(reader, path, step_from), step_from)
  for key in (GLOBAL_STEP,) + ITERATION_COUNTERS:
    if key in keys:
      return Checkpoint(path, _scalar_int(reader, path, key), key)
  step = name_step(path)
  return Checkpoint(path, step, "name" if step is not None else "unknown")


def read_tensor(reader, path: str, name: str):
  """One whole tensor through TF's reader, or an AveragingError naming it."""
  try:
    return reader.get_tensor(name)
  # A truncated data file (still being copied) raises IndexError.
  except (tf.errors.OpError, ValueError, IndexError) as e:
    raise AveragingError(f"cannot read variable {name} from checkpoint {path}: "
                         f"{error_text(e)}") from e


def _scalar_int(reader, path: str, key: str) -> int:
  value = read_tensor(reader, path, key)
  if getattr(value, "shape", ()) != () or not hasattr(value, "dtype") or (
      value.dtype.kind not in "iu"):
    raise AveragingError(f"tensor {key} in checkpoint {path} is not an "
                         "integer scalar, so it cannot give the step")
  return int(value)


def load(path: str, step_from: str = "auto") -> Checkpoint:
  """Resolves a checkpoint path, checks it is readable, and reads its step."""
  path = resolve(path)
  return read_step(open_reader(path), path, step_from)
