"""Path rules shared by the command line (before TensorFlow loads) and the library."""
from __future__ import annotations

import os
import re

# TF finds a V2 checkpoint by globbing `<prefix>.index`: a name these
# characters make a pattern of is written but never read back.
_GLOB_CHARS = re.compile(r"[\[\]*?\\]")


def is_local(path: str) -> bool:
  """Whether a path is on a local file system (not `gs://` and the like)."""
  return "://" not in path


def strip_file_suffix(path: str) -> str:
  """A checkpoint prefix from one of its files (tab completion gives those)."""
  for suffix in (".index", ".meta"):
    if path.endswith(suffix):
      return path[:-len(suffix)]
  return path


def glob_characters(path: str) -> str:
  """The characters of `path` that TF's checkpoint lookup reads as a pattern."""
  return "".join(sorted(set(_GLOB_CHARS.findall(path))))


def same_directory(a: str, b: str) -> bool:
  """Whether two directories are one (through links, for local paths)."""
  if is_local(a) and is_local(b):
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(
        os.path.expanduser(b))
  return a.rstrip("/") == b.rstrip("/")
