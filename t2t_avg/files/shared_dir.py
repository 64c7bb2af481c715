"""Files beside an output in a shared directory: never follow a planted name.

The legacy default output is `/tmp/averaged.ckpt`, so outputs often go to a
world-writable directory where anyone can create any name first. Every file
t2t_avg makes there is therefore either created exclusively under an
unpredictable name (`tempfile.mkdtemp`, mode 0700), or opened with
`O_NOFOLLOW | O_EXCL`; published files replace their target by rename, which
replaces a link rather than writing through it; and a temporary directory
left by a killed run is removed only when it is certainly ours: a real
directory (checked on an open descriptor, never through a link), owned by
this user, holding the owner file this module wrote, whose process is gone
(an owner file not yet written counts as a run starting, for a minute),
and containing only regular files and directories. Anything else is left
alone with a warning naming it.

Local paths only: object stores (`gs://`) have no links, so `publish` keeps
its plain names there.
"""
import os
import shutil
import socket
import stat
import tempfile
import time
from typing import Optional

from absl import logging

from t2t_avg.errors import AveragingError

TMP_MARK = ".t2t_avg-tmp"
CLAIM_MARK = ".t2t_avg-writing"
_OWNER_FILE = "t2t_avg-owner"
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
# An owner file still empty this long after its creation was never written.
_UNWRITTEN_SECONDS = 60.0
_OPEN_EXISTING = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(
    os, "O_NONBLOCK", 0)
# Temporary directories this process made and still uses: its own pid in an
# owner file otherwise means a run that was killed (a pid reused, as in a
# container), but a long-lived temporary (the Keras callback's snapshots)
# lives while this process writes outputs beside it.
_IN_USE: set[str] = set()


def _owner_text() -> str:
  return f"{os.getpid()} {socket.gethostname()}\n"


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _holder_alive(text: str, mtime: float) -> bool:
  """Whether the process an owner text names may still be running.

  A process on another host (a shared network file system) cannot be checked,
  so it counts as running. A text naming no process is a run between
  creating its file and writing it, unless the file is older than
  `_UNWRITTEN_SECONDS` (a run killed right then).
  """
  fields = text.split()
  try:
    pid = int(fields[0])
  except (IndexError, ValueError):
    return time.time() - mtime < _UNWRITTEN_SECONDS
  if len(fields) > 1 and fields[1] != socket.gethostname():
    return True
  return pid != os.getpid() and _process_alive(pid)


def make_temporary_dir(directory: str, name: str) -> str:
  """A new directory `.t2t_avg-tmp.<name>.<random>` in `directory`, mode 0700.

  Created exclusively (never an existing directory or link), with an owner
  file naming this process, so that `remove_stale_temporaries` can tell it
  from anything someone else put there.
  """
  path = tempfile.mkdtemp(prefix=f"{TMP_MARK}.{name}.", dir=directory)
  try:
    fd = os.open(os.path.join(path, _OWNER_FILE), _OPEN_NEW, 0o600)
    with os.fdopen(fd, "w") as f:
      f.write(_owner_text())
  except BaseException:
    shutil.rmtree(path, ignore_errors=True)
    raise
  _IN_USE.add(os.path.realpath(path))
  return path


def remove_temporary_dir(path: str) -> None:
  """Removes a directory `make_temporary_dir` made (idempotent)."""
  shutil.rmtree(path, ignore_errors=True)
  _IN_USE.discard(os.path.realpath(path))


def remove_stale_temporaries(directory: str) -> None:
  """Removes temporary directories that killed runs of t2t_avg left behind.

  Only those that are certainly ours (see the module docstring); a
  temporary of a run still going is left as it is, and anything that merely
  looks like one is left alone with a warning.
  """
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return
  for name in sorted(names):
    if not name.startswith(TMP_MARK + "."):
      continue
    path = os.path.join(directory, name)
    if os.path.realpath(path) in _IN_USE:
      continue  # This process is using it.
    problem, holder, mtime = _inspect_temporary(path)
    if problem:
      logging.warning("Leaving %s alone: %s, so it may not be a temporary of "
                      "t2t_avg", path, problem)
      continue
    if _holder_alive(holder, mtime):
      continue  # Another run is writing right now.
    logging.info("Removing %s, left by an interrupted run", path)
    if not shutil.rmtree.avoids_symlink_attacks:
      logging.warning("Leaving %s alone: this platform cannot remove a "
                      "directory without risk of following links", path)
      continue
    shutil.rmtree(path)


def _inspect_temporary(path: str) -> tuple:
  """(why it is not certainly ours or None, its owner file's text, mtime)."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) |
                 getattr(os, "O_NOFOLLOW", 0))
  except OSError:
    kind = _kind(path)
    return f"it is {kind}, not a directory", "", 0.0
  try:
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
      return f"it is owned by another user (uid {info.st_uid})", "", 0.0
    try:
      owner_fd = os.open(_OWNER_FILE, _OPEN_EXISTING, dir_fd=fd)
    except OSError:
      return f"it holds no regular file {_OWNER_FILE}", "", 0.0
    with os.fdopen(owner_fd) as f:
      owner = os.fstat(f.fileno())
      if not stat.S_ISREG(owner.st_mode):
        return f"its {_OWNER_FILE} is not a regular file", "", 0.0
      holder = f.read(200)
    odd = _odd_entry(path)
    if odd:
      return f"it holds {odd}, which is neither a file nor a directory", "", 0.0
    return None, holder, owner.st_mtime
  finally:
    os.close(fd)


def _kind(path: str) -> str:
  try:
    mode = os.lstat(path).st_mode
  except OSError:
    return "gone"
  if stat.S_ISLNK(mode):
    return "a symbolic link"
  return "a file" if stat.S_ISREG(mode) else "a special file"


def _odd_entry(directory: str) -> Optional[str]:
  """The first entry below `directory` that is not a regular file or dir."""
  with os.scandir(directory) as entries:
    for entry in entries:
      if entry.is_dir(follow_symlinks=False):
        odd = _odd_entry(entry.path)
        if odd:
          return odd
      elif not entry.is_file(follow_symlinks=False):
        return entry.path
  return None


def claim(directory: str, name: str) -> str:
  """Marks output `name` in `directory` as being written by this process.

  Two runs committing the same output at once could leave one's index over
  the other's data; the second is refused instead. A mark left by a run of
  this user that is gone is taken over.

  Returns:
    The mark's path, for `release`.

  Raises:
    AveragingError: another run holds the mark, or something that is not a
      mark of this user (a link, a directory, another user's file) has its
      name.
  """
  path = os.path.join(directory, f"{CLAIM_MARK}.{name}")
  for _ in range(2):
    try:
      fd = os.open(path, _OPEN_NEW, 0o644)
    except FileExistsError:
      _check_stale_claim(path, os.path.join(directory, name))
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
      logging.info("Took over %s, left by an interrupted run", path)
      continue
    with os.fdopen(fd, "w") as f:
      f.write(_owner_text())
    return path
  raise AveragingError(f"cannot claim {path}: another run keeps creating it")


def _check_stale_claim(path: str, output: str) -> None:
  """Returns when `path` is this user's mark of a run that is gone."""
  refusal = (f"{path} is {{}}, not a mark t2t_avg left; remove it or choose "
             "another output")
  try:
    fd = os.open(path, _OPEN_EXISTING)
  except FileNotFoundError:
    return
  except OSError:
    raise AveragingError(refusal.format(_kind(path))) from None
  with os.fdopen(fd) as f:
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
      raise AveragingError(refusal.format("not a regular file"))
    if info.st_uid != os.geteuid():
      raise AveragingError(
          f"{path} marks {output} as being written by another user (uid "
          f"{info.st_uid}); choose another output")
    holder = f.read(200)
  if _holder_alive(holder, info.st_mtime):
    who = f"pid {holder.split()[0]}" if holder.split() else "just started"
    raise AveragingError(
        f"another t2t_avg run ({who}) is writing {output}; "
        "wait for it to finish or choose another output")


def release(mark: str) -> None:
  """Removes a mark made by `claim`."""
  try:
    os.remove(mark)
  except FileNotFoundError:
    pass


def replaceable(path: str) -> Optional[str]:
  """Why an existing file at `path` must not be replaced, or None.

  A link is never replaced (its target is someone's file and the link may
  be theirs too), nor a file of another user.
  """
  try:
    info = os.lstat(path)
  except (FileNotFoundError, NotADirectoryError):
    return None
  if stat.S_ISLNK(info.st_mode):
    return "a symbolic link"
  if not stat.S_ISREG(info.st_mode):
    return "not a regular file"
  if info.st_uid != os.geteuid():
    return f"owned by another user (uid {info.st_uid})"
  return None


def write_atomically(path: str, data: bytes) -> None:
  """Replaces `path` by a new file holding `data`: written aside, renamed.

  The new file is made in a temporary directory of its own, so a run killed
  meanwhile leaves nothing but that directory, which the next run removes.
  """
  directory = os.path.dirname(path) or "."
  tmp_dir = make_temporary_dir(directory, os.path.basename(path))
  try:
    tmp = os.path.join(tmp_dir, "new")
    fd = os.open(tmp, _OPEN_NEW, 0o666)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def copy_atomically(source: str, target: str) -> None:
  """Copies `source` with its times to `target`, replacing it by rename."""
  directory = os.path.dirname(target) or "."
  tmp_dir = make_temporary_dir(directory, os.path.basename(target))
  try:
    tmp = os.path.join(tmp_dir, "new")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def check_own_dir(path: str) -> None:
  """Refuses `path` when it exists as anything but this user's directory.

  For directories t2t_avg writes new files into, such as the `t2t_avg/`
  summaries beside an output: checked before any work, and again by
  `make_own_dir`.

  Raises:
    AveragingError: `path` is a link, not a directory, or another user's.
  """
  try:
    info = os.lstat(path)
  except FileNotFoundError:
    return
  if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
    raise AveragingError(f"{path} is {_kind(path)}, not a directory; remove "
                         "it or write elsewhere")
  if info.st_uid != os.geteuid():
    raise AveragingError(f"{path} belongs to another user (uid "
                         f"{info.st_uid}); write elsewhere")


def make_own_dir(path: str) -> None:
  """Creates directory `path`, or checks it as `check_own_dir` does."""
  try:
    os.mkdir(path)
  except FileExistsError:
    check_own_dir(path)
