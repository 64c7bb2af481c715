"""Reading the inputs ahead from the moment the flags are checked.

Right after the flags are checked, the command line finds the checkpoints it
will read (`state_file` reads the `checkpoint` state file) and asks the
kernel to read their files into the page cache (`posix_fadvise(WILLNEED)`,
file after file, from a thread), so that the disk is busy while the run
imports numpy, opens the indexes and plans. It is a hint, never an error:
anything it cannot find is left to the real run, and it does nothing when
the files would not fit in the memory this process may use (a cgroup limit,
or little free memory), where reading ahead would only evict itself.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from absl import logging

from t2t_avg import options
from t2t_avg.files import paths
from t2t_avg.formats import state_file

# Read ahead only when the files take at most this share of the memory left.
_ROOM_SHARE = 0.5


def input_prefixes(inputs: options.InputOptions) -> list[str]:
  """The checkpoint prefixes a one-shot run will read, found without TF.

  Best effort: what cannot be found here is found (or refused) later.
  """
  if inputs.checkpoints:
    found = [_prefix_of(inputs.prefix + c) for c in inputs.checkpoints]
    return [p for p in found if p]
  directory = os.path.dirname(inputs.prefix) or "."
  listed = _listed(directory)
  if not listed and paths.is_local(directory) and os.path.isdir(directory):
    # Keras files (no state file): by the numbers in their names, a guess.
    # (Imported here: this module starts reading before numpy is imported.)
    from t2t_avg.inputs import naming  # pylint: disable=import-outside-toplevel
    listing = naming.look(directory)
    listed = sorted((listing.path(n) for n in listing.keras_files(
        os.path.basename(inputs.prefix))), key=lambda p: (
            naming.name_number(p) or -1, p))
  return listed[-inputs.num_last_checkpoints:]


def _prefix_of(path: str) -> Optional[str]:
  if os.path.isdir(path):
    listed = _listed(path)
    return listed[-1] if listed else None
  return paths.strip_file_suffix(path)


def _listed(directory: str) -> list[str]:
  """The checkpoints a local state file lists, its newest last."""
  if not paths.is_local(directory):
    return []
  try:
    state = state_file.read_without_tf(directory)
  except state_file.NotUnderstood:
    return []  # Left to the real run.
  if state is None:
    return []
  newest, listed = state.model_checkpoint_path, state.all_model_checkpoint_paths
  if not listed or listed[-1] != newest:
    listed.append(newest)
  return listed


def start(prefixes: list[str]) -> Optional[threading.Thread]:
  """Starts reading the checkpoints' files ahead, when they fit in memory.

  Returns:
    The reading thread (a daemon), or None when nothing is read ahead.
  """
  if not hasattr(os, "posix_fadvise"):
    return None
  files = [f for p in prefixes if paths.is_local(p) for f in _files_of(p)]
  total = sum(size for _, size in files)
  room = available_memory()
  if not files or room is None or total > room * _ROOM_SHARE:
    logging.debug("Not reading ahead %d bytes (room: %s)", total, room)
    return None
  thread = threading.Thread(target=_read_ahead, args=([f for f, _ in files],),
                            name="t2t_avg-prefetch", daemon=True)
  thread.start()
  return thread


def _files_of(prefix: str) -> list[tuple[str, int]]:
  if os.path.isfile(prefix):  # A Keras file (or a V1 checkpoint): itself.
    return [(prefix, os.path.getsize(prefix))]
  directory = os.path.dirname(prefix) or "."
  base = os.path.basename(prefix)
  found = []
  try:
    with os.scandir(directory) as entries:
      for entry in entries:
        if entry.name == base + ".index" or entry.name.startswith(
            base + ".data-"):
          found.append((entry.path, entry.stat().st_size))
  except OSError:
    return []
  return sorted(found)


def _read_ahead(files: list[str]) -> None:
  for path in files:
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      continue
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
      pass
    finally:
      os.close(fd)


def available_memory() -> Optional[int]:
  """Bytes this process may still fill: free memory, or its cgroup's room."""
  room = _meminfo_available()
  limit = _cgroup_room()
  if limit is not None:
    room = limit if room is None else min(room, limit)
  return room


def _meminfo_available() -> Optional[int]:
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _cgroup_room() -> Optional[int]:
  """The memory cgroup's limit minus its usage (v1 or v2), or None."""
  try:
    with open("/proc/self/cgroup", encoding="ascii") as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  for line in lines:
    _, controllers, path = line.split(":", 2)
    if controllers == "":  # cgroup v2
      base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
      limit, usage = _read_int(base, "memory.max"), _read_int(
          base, "memory.current")
    elif "memory" in controllers.split(","):
      base = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
      limit, usage = _read_int(base, "memory.limit_in_bytes"), _read_int(
          base, "memory.usage_in_bytes")
    else:
      continue
    if limit is not None and usage is not None and limit < 1 << 60:
      return max(0, limit - usage)
  return None


def _read_int(directory: str, name: str) -> Optional[int]:
  try:
    with open(os.path.join(directory, name), encoding="ascii") as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None
