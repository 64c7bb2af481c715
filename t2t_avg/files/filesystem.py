"""Files by path: `os` for local paths, `tf.io.gfile` for others (`gs://`).

Local paths need no TensorFlow (see `tf_loader`); TF's errors about other
paths become `GFileError`, an OSError with TF's message, so callers catch
OSError only.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob as _glob
import os
import re
import shutil
from typing import Any, Optional
from collections.abc import Iterator

from t2t_avg.files import paths
from t2t_avg.files import tf_loader


_WILDCARD = re.compile(r"[*?[\\]")


class GFileError(OSError):
  """A `tf.io.gfile` error (a non-local path, mostly); its text is TF's message."""


class GFileNotFoundError(GFileError, FileNotFoundError):
  """TF's NotFoundError from `tf.io.gfile`."""


@contextlib.contextmanager
def tensorflow() -> Iterator[Any]:
  """The `tensorflow` module, with TF's errors raised as `GFileError`."""
  tf = tf_loader.get()
  try:
    yield tf
  except tf.errors.OpError as e:
    error = (GFileNotFoundError if isinstance(e, tf.errors.NotFoundError)
             else GFileError)
    raise error(e.message) from e


@contextlib.contextmanager
def gfile() -> Iterator[Any]:
  """`tf.io.gfile`, with TF's errors raised as `GFileError`."""
  with tensorflow() as tf:
    yield tf.io.gfile


def exists(path: str) -> bool:
  """Whether something is at `path`."""
  if paths.is_local(path):
    return os.path.exists(path)
  with gfile() as g:
    return g.exists(path)


def isdir(path: str) -> bool:
  """Whether `path` is a directory."""
  if paths.is_local(path):
    return os.path.isdir(path)
  with gfile() as g:
    return g.isdir(path)


def glob(pattern: str) -> list[str]:
  """The paths matching a pattern (`*`, `?`, `[...]`), as TF's glob gives them.

  Local: names starting with a dot match `*` too, and a pattern without a
  directory gives `./name`s, as with TF.
  """
  if not paths.is_local(pattern):
    with gfile() as g:
      return g.glob(pattern)
  if not _WILDCARD.search(pattern):
    return [pattern] if os.path.exists(pattern) else []
  directory, name = os.path.split(pattern)
  if _WILDCARD.search(directory):
    return _glob.glob(pattern)  # Wildcards in directories: rare, by Python.
  try:
    names = os.listdir(directory or ".")
  except OSError:
    return []
  return [os.path.join(directory or ".", n) for n in names
          if fnmatch.fnmatchcase(n, name)]


def read_bytes(path: str) -> bytes:
  """A whole file's bytes."""
  if paths.is_local(path):
    with open(path, "rb") as f:
      return f.read()
  with gfile() as g, g.GFile(path, "rb") as f:
    return f.read()


def makedirs(directory: str) -> None:
  """Creates a directory and its parents; nothing when it exists."""
  if paths.is_local(directory):
    try:
      os.makedirs(directory, exist_ok=True)
      return
    except OSError:
      pass  # TF's own error (and message), below.
  with gfile() as g:
    g.makedirs(directory)


def listdir(directory: str) -> list[str]:
  """The names in a directory (a remote one's subdirectories end in `/`)."""
  if paths.is_local(directory):
    return os.listdir(directory)
  with gfile() as g:
    return g.listdir(directory)


@contextlib.contextmanager
def open_read(path: str) -> Iterator[Any]:
  """A file opened for reading bytes; a remote one's errors as `GFileError`."""
  if paths.is_local(path):
    with open(path, "rb") as f:
      yield f
    return
  with gfile() as g, g.GFile(path, "rb") as f:
    yield f


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file. Local files beside outputs go through
  `shared_dir` instead (never through a planted link)."""
  if paths.is_local(path):
    with open(path, "wb") as f:
      f.write(data)
    return
  with gfile() as g, g.GFile(path, "wb") as f:
    f.write(data)


def times(path: str) -> Optional[tuple[int, int]]:
  """(mtime_ns, ctime_ns) of a file, or None when it is gone.

  Not local: TF gives no ctime, so both are the mtime.
  """
  if paths.is_local(path):
    # tf.io.gfile.stat truncates local mtimes to whole seconds.
    try:
      stat = os.stat(path)
    except FileNotFoundError:
      return None
    return stat.st_mtime_ns, stat.st_ctime_ns
  try:
    with gfile() as g:
      mtime = g.stat(path).mtime_nsec
  except GFileNotFoundError:
    return None
  return mtime, mtime


def read_text(path: str) -> str:
  """A whole text file (UTF-8)."""
  return read_bytes(path).decode("utf-8")


def copy(source: str, target: str) -> None:
  """Copies a file, replacing `target` (not local: through TF)."""
  if paths.is_local(source) and paths.is_local(target):
    shutil.copyfile(source, target)
    return
  with gfile() as g:
    g.copy(source, target, overwrite=True)


def rename(source: str, target: str) -> None:
  """Renames a file, replacing `target`."""
  if paths.is_local(source) and paths.is_local(target):
    os.replace(source, target)
    return
  with gfile() as g:
    g.rename(source, target, overwrite=True)
