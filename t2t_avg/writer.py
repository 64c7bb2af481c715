"""Atomic checkpoint output: pieces under temporary names, then renames; state files."""
import json
import os
import threading
from typing import Optional, Sequence

from absl import logging
from google.protobuf import text_format
import tensorflow as tf
from tensorflow.python.training import checkpoint_state_pb2

from t2t_avg import bundle
from t2t_avg import checkpoints
from t2t_avg.errors import AveragingError

PIECE_BYTES = 64 << 20
_TMP_MARK = ".t2t_avg-tmp"
_LOCK_MARK = ".t2t_avg-writing"


def is_local(path: str) -> bool:
  return "://" not in path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class CheckpointWriter:
  """Writes one checkpoint in pieces, visible under its name only on commit.

  Whole tensors (`add`) are saved with TF's own `SaveV2` into pieces of about
  `piece_bytes` (a large tensor is a piece of its own); tensors built chunk by
  chunk go into pieces written in TF's format directly (`raw_piece`). The
  pieces, in a temporary directory beside the output, are merged with
  `MergeV2Checkpoints` as TF's sharded saver does, then renamed into place:
  data files first, the index last. A run killed at any
  moment leaves the old checkpoint, none, or the new one; the next run for
  the same output removes the temporary directory it left behind.
  """

  def __init__(self, output_prefix: str, *, piece_bytes: int = PIECE_BYTES):
    self.output_prefix = output_prefix
    self._piece_bytes = piece_bytes
    self._pending = []  # (name, tensor)
    self._pending_bytes = 0
    self._pieces = []
    self._lock = threading.Lock()
    out_dir = os.path.dirname(output_prefix) or "."
    base = os.path.basename(output_prefix)
    _make_dirs(out_dir)
    self._lock_file = _claim(out_dir, base)
    _remove_stale_temporaries(out_dir, base)
    self._tmp_dir = os.path.join(out_dir, f"{_TMP_MARK}.{base}.{os.getpid()}")
    tf.io.gfile.makedirs(self._tmp_dir)

  def add(self, name: str, value) -> None:
    """Queues one tensor; writes a piece once enough bytes are queued."""
    nbytes = getattr(value, "nbytes", 0)
    if nbytes >= self._piece_bytes // 2:
      self._save_piece([(name, value)])
      return
    self._pending.append((name, value))
    self._pending_bytes += nbytes
    if self._pending_bytes >= self._piece_bytes:
      self.flush()

  def flush(self) -> None:
    if self._pending:
      self._save_piece(self._pending)
      self._pending, self._pending_bytes = [], 0

  def raw_piece(self) -> bundle.RawBundleWriter:
    """A piece written directly in TF's format, for tensors built in chunks.

    The caller closes it before `commit`.
    """
    return bundle.RawBundleWriter(self._new_piece_prefix())

  def _new_piece_prefix(self) -> str:
    with self._lock:
      prefix = os.path.join(self._tmp_dir, "pieces",
                            f"piece-{len(self._pieces)}")
      self._pieces.append(prefix)
    tf.io.gfile.makedirs(os.path.dirname(prefix))
    return prefix

  def _save_piece(self, items) -> None:
    prefix = self._new_piece_prefix()
    names, values = zip(*items)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(names),
                      shape_and_slices=[""] * len(names), tensors=list(values))

  def commit(self, *, extra_files: Sequence[tuple] = ()) -> str:
    """Publishes the checkpoint under its name; returns its prefix.

    Args:
      extra_files: (temporary path, final path) pairs renamed before the
        index (a `.meta` graph, the JSON record).
    """
    self.flush()
    merged = os.path.join(self._tmp_dir, "merged")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self._pieces,
                                  destination_prefix=merged,
                                  delete_old_dirs=True)
    out = self.output_prefix
    # Replacing an earlier output: its index goes first, so a crash never
    # leaves new data under an old index.
    if tf.io.gfile.exists(out + ".index"):
      tf.io.gfile.remove(out + ".index")
    for old in tf.io.gfile.glob(out + ".data-*"):
      tf.io.gfile.remove(old)
    for data in sorted(tf.io.gfile.glob(merged + ".data-*")):
      tf.io.gfile.rename(data, out + data[len(merged):], overwrite=True)
    for tmp, final in extra_files:
      tf.io.gfile.rename(tmp, final, overwrite=True)
    tf.io.gfile.rename(merged + ".index", out + ".index", overwrite=True)
    self.abort()
    return out

  def temporary_path(self, name: str) -> str:
    return os.path.join(self._tmp_dir, name)

  def abort(self) -> None:
    """Removes everything written so far (nothing is under the output name)."""
    if tf.io.gfile.exists(self._tmp_dir):
      tf.io.gfile.rmtree(self._tmp_dir)
    if self._lock_file:
      os.remove(self._lock_file)
      self._lock_file = None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.abort()


def _make_dirs(directory: str) -> None:
  try:
    tf.io.gfile.makedirs(directory)
  except (tf.errors.OpError, OSError) as e:
    raise AveragingError(f"cannot create output directory {directory}: "
                         f"{getattr(e, 'message', e)}") from e
  if not tf.io.gfile.isdir(directory):
    raise AveragingError(f"output directory {directory} is not a directory")


def _claim(out_dir: str, base: str) -> Optional[str]:
  """Marks the output name as being written by this process.

  Two runs committing the same output at once could leave one's index over
  the other's data; the second is refused instead. A mark left by a killed
  run (its pid is gone) is taken over. Local paths only.

  Returns:
    The mark's path, to remove when done; None on other file systems.
  """
  if not is_local(out_dir):
    return None
  path = os.path.join(out_dir, f"{_LOCK_MARK}.{base}")
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(path, encoding="utf-8") as f:
          pid = int(f.read().strip() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and pid != os.getpid() and _pid_alive(pid):
        raise AveragingError(  # pylint: disable=raise-missing-from
            f"another t2t_avg run (pid {pid}) is writing "
            f"{os.path.join(out_dir, base)}; wait for it to finish or choose "
            "another output")
      logging.info("Taking over %s, left by an interrupted run", path)
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
      continue
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return path
  raise AveragingError(f"cannot claim {path}: another run keeps creating it")


def _remove_stale_temporaries(out_dir: str, base: str) -> None:
  # This output's temporary directory, and the state file's temporary copy
  # (`_write_atomically`), which a run killed while writing it leaves.
  patterns = (f"{_TMP_MARK}.{base}.*",
              f"{checkpoints.STATE_FILE}{_TMP_MARK}.*")
  for pattern in patterns:
    for tmp in tf.io.gfile.glob(os.path.join(out_dir, pattern)):
      pid = tmp.rsplit(".", 1)[-1]
      if is_local(tmp) and pid.isdigit() and _pid_alive(int(pid)):
        continue  # Another run is writing the same output right now.
      logging.info("Removing %s, left by an interrupted run", tmp)
      if tf.io.gfile.isdir(tmp):
        tf.io.gfile.rmtree(tmp)
      else:
        tf.io.gfile.remove(tmp)


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}{_TMP_MARK}.{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str, record: dict) -> None:
  _write_atomically(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def holds_checkpoints(directory: str, ignore: Sequence[str] = ()) -> bool:
  """Whether a directory holds checkpoints other than `ignore` (our outputs)."""
  ignored = {p + ".index" for p in ignore}
  for index_file in tf.io.gfile.glob(os.path.join(directory, "*.index")):
    if index_file not in ignored and not checkpoints.is_output_of_this_tool(
        index_file[:-len(".index")]):
      return True
  return False


def update_state_file(directory: str, newest: str,
                      all_paths: Optional[Sequence[str]] = None,
                      input_paths: Sequence[str] = ()) -> bool:
  """Points the directory's `checkpoint` state file at `newest` (relative).

  A state file in a directory that holds input checkpoints (a training
  directory) is never rewritten: TF1 `Saver` and `t2t-decoder` read it.

  Returns:
    Whether the state file was written.
  """
  directory = directory or "."
  inputs_here = [p for p in input_paths
                 if os.path.dirname(p) == directory.rstrip("/")]
  if inputs_here or holds_checkpoints(directory, ignore=all_paths or [newest]):
    logging.warning("Not touching %s: that directory holds input checkpoints",
                    os.path.join(directory, checkpoints.STATE_FILE))
    return False
  state = checkpoint_state_pb2.CheckpointState(
      model_checkpoint_path=os.path.basename(newest),
      all_model_checkpoint_paths=[os.path.basename(p)
                                  for p in (all_paths or [newest])])
  _write_atomically(os.path.join(directory, checkpoints.STATE_FILE),
                    text_format.MessageToString(state))
  return True
