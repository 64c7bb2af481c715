"""The `checkpoint` state file, read and written as TensorFlow does, without it.

TF writes the file as a text-format `CheckpointState` proto, one field a
line; for local directories this module reads that (and exactly what
`tf.train.get_checkpoint_state` would return) and writes the bytes TF's
`text_format.MessageToString` would with the protobuf TF 2.21 installs
(TF 2.16's protobuf 4 escapes non-ASCII and control characters otherwise;
TF reads both alike). A file it does not understand is left to TF's own reader;
other file systems always go through TF.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional
from collections.abc import Sequence

from absl import logging

from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.files import shared_dir

STATE_FILE = "checkpoint"
_PATH_FIELDS = ("model_checkpoint_path", "all_model_checkpoint_paths")
_LINE = re.compile(
    r'(model_checkpoint_path|all_model_checkpoint_paths): "((?:[^"\\\n]|\\.)*)"'
    r'|(all_model_checkpoint_timestamps|last_preserved_timestamp): '
    r'([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)')
_ESCAPE = re.compile(r"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, '"': 34, "'": 39, "\\": 92,
                   "a": 7, "b": 8, "f": 12, "v": 11}
# protobuf's text_encoding (as_utf8): what `MessageToString` escapes.
_TEXT_ESCAPES = {i: f"\\{i:03o}" for i in [*range(32), 127]}
_TEXT_ESCAPES.update({9: r"\t", 10: r"\n", 13: r"\r", 34: r"\"", 39: r"\'",
                      92: r"\\"})


class NotUnderstood(Exception):
  """The state file holds something this module does not parse (TF may)."""


@dataclasses.dataclass
class CheckpointState:
  """The fields of TF's `CheckpointState` proto."""
  model_checkpoint_path: str = ""
  all_model_checkpoint_paths: list[str] = dataclasses.field(
      default_factory=list)
  all_model_checkpoint_timestamps: list[float] = dataclasses.field(
      default_factory=list)
  last_preserved_timestamp: float = 0.0


def _unescape(text: str) -> str:
  """A C-escaped string literal's text (protobuf's `CUnescape`, then UTF-8)."""
  def byte(match: re.Match) -> str:
    code = match.group(1)
    if code in _SIMPLE_ESCAPES:
      value = _SIMPLE_ESCAPES[code]
    elif code[0] in "01234567":
      value = int(code, 8)
    elif code[0] == "x" and len(code) > 1:
      value = int(code[1:], 16)
    else:
      raise NotUnderstood(f"escape \\{code}")
    if value > 0xff:
      raise NotUnderstood(f"escape \\{code}")
    return chr(value)
  # Unescaped characters stand for their UTF-8 bytes, escapes for one byte.
  raw = "".join(
      part if i % 2 else part.encode("utf-8").decode("latin-1")
      for i, part in enumerate(_split_escapes(text, byte)))
  try:
    return raw.encode("latin-1").decode("utf-8")
  except UnicodeDecodeError as e:
    raise NotUnderstood("not UTF-8") from e


def _split_escapes(text: str, byte: object) -> list[str]:
  """Plain text and decoded escapes, alternating (plain first)."""
  parts, last = [], 0
  for match in _ESCAPE.finditer(text):
    parts += [text[last:match.start()], byte(match)]  # type: ignore[operator]
    last = match.end()
  return parts + [text[last:]]


def parse(data: bytes) -> CheckpointState:
  """A state file's fields as TF writes them (paths as written, not joined).

  Raises:
    NotUnderstood: anything but one known field a line, a path missing.
  """
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise NotUnderstood("not UTF-8") from e
  state = CheckpointState()
  for line in text.split("\n"):
    if not line.strip():
      continue
    match = _LINE.fullmatch(line.strip())
    if match is None:
      raise NotUnderstood(line)
    path_field, value, number_field, number = match.groups()
    if path_field == "model_checkpoint_path":
      state.model_checkpoint_path = _unescape(value)
    elif path_field:
      state.all_model_checkpoint_paths.append(_unescape(value))
    elif number_field == "last_preserved_timestamp":
      state.last_preserved_timestamp = float(number)
    else:
      state.all_model_checkpoint_timestamps.append(float(number))
  if not state.model_checkpoint_path:
    raise NotUnderstood("no model_checkpoint_path")  # TF's error then.
  return state


def read_without_tf(directory: str) -> Optional[CheckpointState]:
  """A local directory's state file, relative paths joined to `directory`.

  Returns:
    The state, or None when there is no state file.

  Raises:
    NotUnderstood: the file cannot be read or parsed here.
  """
  try:
    with open(os.path.join(directory, STATE_FILE), "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise NotUnderstood(str(e)) from e
  state = parse(data)
  # As `get_checkpoint_state`: relative paths are joined to the directory.
  state.model_checkpoint_path = _joined(directory, state.model_checkpoint_path)
  state.all_model_checkpoint_paths = [
      _joined(directory, p) for p in state.all_model_checkpoint_paths]
  return state


def _joined(directory: str, path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(directory, path)


def read(directory: str) -> Optional[CheckpointState]:
  """What `tf.train.get_checkpoint_state(directory)` returns, as a dataclass.

  Returns:
    The state, or None without a (readable) state file.

  Raises:
    ValueError: the state file names no checkpoint (TF's error).
    OSError: TF cannot read it (another file system).
  """
  if paths.is_local(directory):
    try:
      return read_without_tf(directory)
    except NotUnderstood:
      pass  # TF's reader decides, with its own errors.
  with filesystem.tensorflow() as tf:
    proto = tf.train.get_checkpoint_state(directory)
  if proto is None:
    return None
  return CheckpointState(
      proto.model_checkpoint_path, list(proto.all_model_checkpoint_paths),
      list(proto.all_model_checkpoint_timestamps),
      proto.last_preserved_timestamp)


def text(newest: str, all_paths: Sequence[str]) -> str:
  """A state file listing `all_paths` (newest last) with `newest` as latest.

  The text TF writes for `generate_checkpoint_state_proto("/", newest,
  all_paths)`: the names as given.
  """
  listed = list(all_paths)
  if not listed or listed[-1] != newest:
    listed.append(newest)
  lines = [f'model_checkpoint_path: "{_escape(newest)}"\n'] if newest else []
  lines += [f'all_model_checkpoint_paths: "{_escape(p)}"\n' for p in listed]
  return "".join(lines)


def _escape(value: str) -> str:
  return value.translate(_TEXT_ESCAPES)


def write(directory: str, newest: str,
                     all_paths: Sequence[str]) -> bool:
  """Writes the directory's `checkpoint` state file (relative paths).

  A state file that is a link or another user's file is left alone with a
  warning.

  Returns:
    Whether the state file was written.
  """
  path = os.path.join(directory, STATE_FILE)
  problem = shared_dir.replaceable(path) if paths.is_local(path) else None
  if problem:
    logging.warning("Not touching %s: it is %s (t2t_avg replaces only its "
                    "own files)", path, problem)
    return False
  content = text(os.path.basename(newest),
                 [os.path.basename(p) for p in all_paths])
  if paths.is_local(path):
    shared_dir.write_atomically(path, content.encode("utf-8"))
  else:
    tmp = f"{path}{shared_dir.TMP_MARK}.{os.getpid()}"
    with filesystem.gfile() as gfile:
      with gfile.GFile(tmp, "w") as f:
        f.write(content)
      gfile.rename(tmp, path, overwrite=True)
  return True


def listed_outputs(directory: str) -> list[str]:
  """The checkpoints the directory's state file lists, or none."""
  try:
    state = read(directory)
  except (OSError, ValueError):
    return []
  if state is None:
    return []
  return list(state.all_model_checkpoint_paths)
