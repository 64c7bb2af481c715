"""Atomic, durable output: a private temporary directory, fsync, renames; state files.

An output is written whole under temporary names in a directory of its own
beside it (see `files.shared_dir`), flushed to disk, then published by renames in
an order the caller gives (for a TF checkpoint: data files, record, index
last), and the directory is flushed again. A run killed at any moment leaves
the old output, none, or the new one; the next run removes what it left.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional
from collections.abc import Sequence


from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.files import shared_dir
from t2t_avg.errors import AveragingError



class Output:
  """One output being written; use as a context manager, then `publish`.

  Local outputs get a private temporary directory beside them and a claim
  mark (a second run writing the same output is refused). Outputs on object
  stores (`gs://`) are staged in a local temporary directory and copied.
  """

  def __init__(self, output: str):
    self.output = output
    self.directory = os.path.dirname(output) or "."
    self._claim: Optional[str] = None
    self._tmp_dir: Optional[str] = None

  def __enter__(self) -> Output:
    make_dirs(self.directory)
    if not paths.is_local(self.directory):
      self._tmp_dir = tempfile.mkdtemp(prefix="t2t_avg-staging.")
      return self
    name = os.path.basename(self.output)
    self._claim = shared_dir.claim(self.directory, name)
    try:
      shared_dir.remove_stale_temporaries(self.directory)
      self._tmp_dir = shared_dir.make_temporary_dir(self.directory, name)
    except BaseException:
      self.abort()
      raise
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.abort()

  def temporary_path(self, name: str) -> str:
    """A path in this output's private temporary directory."""
    assert self._tmp_dir is not None
    return os.path.join(self._tmp_dir, name)

  def publish(self, files: Sequence[tuple[str, str]],
              replaced: Sequence[str] = ()) -> None:
    """Flushes the files, removes `replaced`, renames each into place in order.

    Args:
      files: (temporary path, final path) pairs; the last one makes the
        output visible (a TF checkpoint's index).
      replaced: files of an earlier output under the same name, the one
        that makes it visible first.
    """
    if not paths.is_local(self.directory):
      self._publish_remote(files, replaced)
      return
    for tmp, _ in files:
      _fsync_file(tmp)
    _fsync_dir(os.path.dirname(files[-1][0]))
    for old in replaced:
      if os.path.lexists(old):
        os.remove(old)
    for tmp, final in files:
      os.replace(tmp, final)
    _fsync_dir(self.directory)

  def _publish_remote(self, files: Sequence[tuple[str, str]],
                      replaced: Sequence[str]) -> None:
    with filesystem.gfile() as gfile:
      for old in replaced:
        if gfile.exists(old):
          gfile.remove(old)
      for tmp, final in files:
        gfile.copy(tmp, final, overwrite=True)

  def abort(self) -> None:
    """Removes the temporary directory and the claim (idempotent)."""
    if self._tmp_dir is not None:
      shutil.rmtree(self._tmp_dir, ignore_errors=True)
      self._tmp_dir = None
    if self._claim is not None:
      shared_dir.release(self._claim)
      self._claim = None


def _fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_dir(path: str) -> None:
  if os.name != "posix":  # Windows cannot open a directory to flush it.
    return
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def make_dirs(directory: str) -> None:
  """Creates an output directory, or an AveragingError naming it."""
  try:
    filesystem.makedirs(directory)
  except OSError as e:
    raise AveragingError(f"cannot create output directory {directory}: "
                         f"{e}") from e
  if not filesystem.isdir(directory):
    raise AveragingError(f"output directory {directory} is not a directory")


def write_json(path: str, record: dict) -> None:
  """Writes a JSON record to a new file (in an output's temporary directory)."""
  text = json.dumps(record, indent=2, sort_keys=True) + "\n"
  if paths.is_local(path):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    return
  with filesystem.gfile() as gfile, gfile.GFile(path, "w") as f:
    f.write(text)


def check_replaceable(names: Sequence[str],
                      parameter: str = "output_path") -> None:
  """Refuses output files that are links or other users' files, before any work.

  Publishing renames over these names, which never writes through a link;
  refusing here also keeps a planted link from being removed or a stranger's
  file from being replaced.

  Raises:
    AveragingError: naming the first such file.
  """
  for name in names:
    if not paths.is_local(name):
      return
    problem = shared_dir.replaceable(name)
    if problem:
      raise AveragingError(
          "output file {name} is {problem}; t2t_avg will not replace it: "
          "remove it or choose another {%s}" % parameter, name=name,
          problem=problem)
