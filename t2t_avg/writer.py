"""Atomic checkpoint output: pieces under temporary names, then renames; state files."""
import json
import os
import shutil
import threading
from typing import Optional, Sequence

from absl import logging
from google.protobuf import text_format
import tensorflow as tf
from tensorflow.python.training import checkpoint_state_pb2

from t2t_avg import bundle
from t2t_avg import checkpoints
from t2t_avg import safe_files
from t2t_avg.errors import AveragingError

PIECE_BYTES = 64 << 20
is_local = safe_files.is_local


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
    self._claim = None
    if not safe_files.is_local(out_dir):
      _remove_stale_remote_temporaries(out_dir, base)
      self._tmp_dir = os.path.join(out_dir,
                                   f"{safe_files.TMP_MARK}.{base}.{os.getpid()}")
      tf.io.gfile.makedirs(self._tmp_dir)
      return
    self._claim = safe_files.claim(out_dir, base)
    try:
      safe_files.remove_stale_temporaries(out_dir)
      self._tmp_dir = safe_files.make_temporary_dir(out_dir, base)
    except BaseException:
      safe_files.release(self._claim)
      raise

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
    if safe_files.is_local(self._tmp_dir):
      shutil.rmtree(self._tmp_dir, ignore_errors=True)
    elif tf.io.gfile.exists(self._tmp_dir):
      tf.io.gfile.rmtree(self._tmp_dir)
    if self._claim:
      safe_files.release(self._claim)
      self._claim = None

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


def _remove_stale_remote_temporaries(out_dir: str, base: str) -> None:
  # Object stores have no links and no pids of ours to check: whatever
  # temporary of this output a killed run left is removed.
  for tmp in tf.io.gfile.glob(os.path.join(out_dir,
                                           f"{safe_files.TMP_MARK}.{base}.*")):
    logging.info("Removing %s, left by an interrupted run", tmp)
    tf.io.gfile.rmtree(tmp)


def _write_atomically(path: str, text: str) -> None:
  if safe_files.is_local(path):
    safe_files.write_atomically(path, text.encode("utf-8"))
    return
  tmp = f"{path}{safe_files.TMP_MARK}.{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str, record: dict) -> None:
  """Writes a JSON record to a new file (in this run's temporary directory)."""
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")


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
  path = os.path.join(directory, checkpoints.STATE_FILE)
  problem = safe_files.replaceable(path) if is_local(path) else None
  if problem:
    logging.warning("Not touching %s: it is %s (t2t_avg replaces only its "
                    "own files)", path, problem)
    return False
  state = checkpoint_state_pb2.CheckpointState(
      model_checkpoint_path=os.path.basename(newest),
      all_model_checkpoint_paths=[os.path.basename(p)
                                  for p in (all_paths or [newest])])
  _write_atomically(path, text_format.MessageToString(state))
  return True


def check_output_names(output_prefix: str) -> None:
  """Refuses an output whose file names hold links or other users' files.

  Publishing renames over these names, which never writes through a link;
  refusing here, before any work, also keeps a planted link from being
  removed or a stranger's file from being replaced.

  Raises:
    AveragingError: naming the first such file.
  """
  if not is_local(output_prefix):
    return
  directory = os.path.dirname(output_prefix) or "."
  base = os.path.basename(output_prefix)
  try:
    names = os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return
  own = {base + suffix for suffix in (".index", ".meta",
                                      checkpoints.RECORD_SUFFIX)}
  for name in sorted(names):
    if name in own or name.startswith(base + ".data-"):
      problem = safe_files.replaceable(os.path.join(directory, name))
      if problem:
        raise AveragingError(
            f"output file {os.path.join(directory, name)} is {problem}; "
            "t2t_avg will not replace it: remove it or choose another "
            "--output_path")
