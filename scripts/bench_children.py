"""Runs one measured child process: wall time, CPU, peak RSS and how it ended.

Used by `bench.py`. What a child may be put through, each optional:

- a cold page cache: `sync` and `echo 3 > /proc/sys/vm/drop_caches` just
  before it starts (not timed), so every byte it reads, TensorFlow's shared
  libraries included, comes from the disk;
- a memory limit: a fresh memory cgroup of its own (cgroup v1 directly, or
  `systemd-run --scope -p MemoryMax=` on cgroup v2), without swap;
- a timeout, after which it is killed (SIGKILL through a pidfd, so a reused
  pid is never hit) and reported as not finished.

Every child's rusage comes from `os.wait4` on that child alone, also after a
kill, so a child killed by its timeout or by the OOM killer still has a wall
time and a peak RSS.

Like `bench.py`, this module imports neither numpy nor TensorFlow: a child's
`ru_maxrss` can never be below the peak RSS of the process that spawned it.
"""
import dataclasses
import os
import resource
import select
import signal
import subprocess
import tempfile
import time
from typing import Optional
from collections.abc import Callable, Sequence

STDERR_TAIL_LINES = 40
MIB = 1 << 20
DROP_CACHES = "/proc/sys/vm/drop_caches"
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
CGROUP_V2_MARKER = "/sys/fs/cgroup/cgroup.controllers"

# What peak RSS means under a memory cgroup (v1 and v2 alike):
#
# `ru_maxrss` is the high-water mark of the pages mapped into the child and
# resident: its anonymous memory (heap, numpy and TF buffers) plus the file
# pages it maps (TensorFlow's ~1 GB of shared libraries, any mmap'ed file).
# It does not count page cache reached through read()/write(): the input
# bytes a tool reads and the output bytes it writes.
#
# The cgroup is charged for more than that: anonymous memory plus every page
# cache page the child brings in (cgroup v1 charges a page to the cgroup that
# first faulted it in: library pages, input pages read, output pages written,
# dirty until written back). At the limit the kernel reclaims clean page
# cache first -- including the mapped library pages, which are faulted back
# in later -- and throttles writers on their dirty pages; only anonymous
# memory that cannot fit gets the child OOM-killed (there is no swap).
# So under a limit a child's RSS can be *below* its unlimited RSS (evicted
# library pages), which is why the benchmark compares a tool with a bare
# `import tensorflow` under the same limit; `memory.max_usage_in_bytes`
# (reported as the cgroup peak) includes page cache and sits at the limit
# for any child that streamed more than the limit through the page cache.
# A page already cached and charged elsewhere (a warm cache) is not charged
# again, which is why a memory limit implies a cold cache in bench.py.


@dataclasses.dataclass(frozen=True)
class ChildRun:
  """What the OS says about one finished (or killed) child process."""
  wall_s: float
  cpu_s: float  # user + system
  peak_rss_mib: float
  exit_code: int  # negative: killed by that signal
  stdout: str
  stderr: str
  # 'ok', 'OOM-killed', 'did not finish in N s', 'exit N', 'killed by SIGx'.
  outcome: str = "ok"
  # The memory cgroup's own peak (memory.max_usage_in_bytes: anonymous
  # memory and page cache), when the child ran in a cgroup v1.
  cgroup_peak_mib: Optional[float] = None

  @property
  def ok(self) -> bool:
    return self.outcome == "ok"

  def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(self.stderr.rstrip().splitlines()[-lines:])


class ChildFailed(Exception):
  """A measured child did not exit 0 where that was not allowed."""


# ----------------------------------------------------------------------------
# A cold page cache.


def drop_caches() -> None:
  """Writes dirty pages back, then drops the page cache, dentries and inodes.

  Raises:
    OSError: not allowed (not root, or a read-only /proc/sys in a container).
  """
  os.sync()
  with open(DROP_CACHES, "w", encoding="ascii") as f:
    f.write("3\n")


def cold_cache_problem() -> Optional[str]:
  """None when `drop_caches` works here (it is tried once), else why not."""
  try:
    drop_caches()
  except OSError as e:
    return f"cannot write {DROP_CACHES} ({e.strerror or e})"
  return None


# ----------------------------------------------------------------------------
# Memory limits.


@dataclasses.dataclass
class Confinement:
  """How to start one child inside a memory limit, and what it left after."""
  argv: list[str]
  preexec_fn: Optional[Callable[[], None]] = None
  # Called once the child is reaped: (cgroup peak MiB or None, OOM kill seen).
  finish: Callable[[], tuple[Optional[float], bool]] = lambda: (None, False)


class MemoryLimit:
  """A memory limit for each child; subclasses know one cgroup flavour."""

  def __init__(self, limit_mb: int):
    self.limit_mb = limit_mb

  @property
  def limit_bytes(self) -> int:
    return self.limit_mb * MIB

  def describe(self) -> str:
    raise NotImplementedError

  def confine(self, argv: Sequence[str]) -> Confinement:
    raise NotImplementedError


def _write(path: str, value: str) -> None:
  with open(path, "w", encoding="ascii") as f:
    f.write(value)


def _read_int(path: str) -> Optional[int]:
  try:
    with open(path, encoding="ascii") as f:
      return int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None


def _oom_kills(cgroup: str) -> int:
  """The `oom_kill` count of a cgroup v1 `memory.oom_control` (0 if none)."""
  try:
    with open(os.path.join(cgroup, "memory.oom_control"),
              encoding="ascii") as f:
      for line in f:
        key, _, value = line.partition(" ")
        if key == "oom_kill":
          return int(value)
  except (OSError, ValueError):
    pass
  return 0


class CgroupV1Limit(MemoryLimit):
  """A fresh `/sys/fs/cgroup/memory/t2t_avg_bench_<pid>_<i>` per child."""

  def __init__(self, limit_mb: int):
    super().__init__(limit_mb)
    self._count = 0

  def describe(self) -> str:
    return (f"cgroup v1 memory.limit_in_bytes = {self.limit_mb} MiB per "
            "child, swap off (memory.swappiness=0, memory.memsw.limit_in_bytes"
            " = the same limit where present)")

  def make_cgroup(self) -> str:
    """Creates and configures the next cgroup; returns its directory."""
    self._count += 1
    cgroup = os.path.join(CGROUP_V1_MEMORY,
                          f"t2t_avg_bench_{os.getpid()}_{self._count}")
    os.mkdir(cgroup)
    try:
      limit = str(self.limit_bytes)
      # Where swap exists, swappiness 0 keeps the cgroup's pages out of it
      # and the memsw limit (memory + swap, set after the memory limit it
      # must not be below) forbids it outright.
      _write(os.path.join(cgroup, "memory.swappiness"), "0")
      _write(os.path.join(cgroup, "memory.limit_in_bytes"), limit)
      memsw = os.path.join(cgroup, "memory.memsw.limit_in_bytes")
      if os.path.exists(memsw):
        _write(memsw, limit)
    except OSError:
      remove_cgroup(cgroup)
      raise
    return cgroup

  def confine(self, argv: Sequence[str]) -> Confinement:
    cgroup = self.make_cgroup()
    procs = os.path.join(cgroup, "cgroup.procs")

    def enter() -> None:
      # Runs in the forked child before exec: only os calls, no allocation
      # worth mentioning (the parent is small; see bench.py's docstring).
      fd = os.open(procs, os.O_WRONLY)
      try:
        os.write(fd, str(os.getpid()).encode("ascii"))
      finally:
        os.close(fd)

    def finish() -> tuple[Optional[float], bool]:
      peak = _read_int(os.path.join(cgroup, "memory.max_usage_in_bytes"))
      oom = _oom_kills(cgroup) > 0
      remove_cgroup(cgroup)
      return (None if peak is None else peak / MIB), oom

    return Confinement(list(argv), enter, finish)


def remove_cgroup(cgroup: str) -> None:
  """Removes an empty cgroup (its page cache charges move to the parent)."""
  for _ in range(50):
    try:
      os.rmdir(cgroup)
      return
    except FileNotFoundError:
      return
    except OSError:
      time.sleep(0.1)  # The reaped child may still be leaving the cgroup.
  print(f"warning: could not remove cgroup {cgroup}")


class SystemdScopeLimit(MemoryLimit):
  """cgroup v2: `systemd-run --scope -p MemoryMax=...` runs each child."""

  def describe(self) -> str:
    return (f"cgroup v2 via systemd-run --scope -p MemoryMax={self.limit_mb}M "
            "-p MemorySwapMax=0 per child")

  def prefix(self) -> list[str]:
    return ["systemd-run", "--scope", "--quiet", "--collect",
            "-p", f"MemoryMax={self.limit_bytes}", "-p", "MemorySwapMax=0",
            "--"]

  def confine(self, argv: Sequence[str]) -> Confinement:
    # In scope mode systemd-run execs the command itself, so the pid waited
    # for is the child's and so is its rusage. The scope's own peak is not
    # read: a SIGKILL under the limit is taken for the OOM killer.
    return Confinement(self.prefix() + list(argv))


def memory_limit(limit_mb: int) -> tuple[Optional[MemoryLimit], str]:
  """The way to limit a child's memory here, or (None, how to get one).

  Tries, in order: cgroup v2 with a working `systemd-run --scope`, a cgroup v1
  memory controller (root creates a test cgroup in it).
  """
  if os.path.exists(CGROUP_V2_MARKER):
    scope = SystemdScopeLimit(limit_mb)
    try:
      probe = subprocess.run(scope.prefix() + ["true"], capture_output=True,
                             timeout=60, check=False)
      if probe.returncode == 0:
        return scope, ""
      problem = probe.stderr.decode("utf-8", "replace").strip()[:200]
    except (OSError, subprocess.TimeoutExpired) as e:
      problem = str(e)
    return None, (f"cgroup v2 without a working `systemd-run --scope` "
                  f"({problem}); run as root on a host where `systemd-run "
                  "--scope -p MemoryMax=1G true` works")
  if os.path.isdir(CGROUP_V1_MEMORY):
    v1 = CgroupV1Limit(limit_mb)
    try:
      remove_cgroup(v1.make_cgroup())
      return v1, ""
    except OSError as e:
      return None, (f"cannot create a cgroup in {CGROUP_V1_MEMORY} "
                    f"({e.strerror or e}); run as root")
  return None, ("no memory cgroup controller (neither /sys/fs/cgroup/memory "
                "nor cgroup v2); run on Linux as root with cgroup v1's "
                "memory controller or cgroup v2 and systemd-run")


# ----------------------------------------------------------------------------
# One child.


@dataclasses.dataclass(frozen=True)
class Isolation:
  """What a measured child is put through (see the module docstring)."""
  cold: bool = False
  memory: Optional[MemoryLimit] = None
  timeout_s: Optional[float] = None


def _wait(pid: int, timeout_s: Optional[float]
          ) -> tuple[int, resource.struct_rusage, bool]:
  """Reaps `pid`; kills it first if it outlives `timeout_s`.

  Returns:
    (wait status, rusage, whether the timeout killed it).
  """
  timed_out = False
  if timeout_s is not None:
    pidfd = os.pidfd_open(pid)
    try:
      ready, _, _ = select.select([pidfd], [], [], timeout_s)
      if not ready:
        timed_out = True
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
      os.close(pidfd)
  _, status, usage = os.wait4(pid, 0)
  return status, usage, timed_out


def _outcome(exit_code: int, timed_out: bool, oom: bool,
             isolation: Isolation) -> str:
  if timed_out:
    return f"did not finish in {isolation.timeout_s:g} s"
  if exit_code == 0:
    return "ok"
  if exit_code == -signal.SIGKILL and (oom or isolation.memory is not None):
    return "OOM-killed"
  if exit_code < 0:
    return f"killed by {signal.Signals(-exit_code).name}"
  return f"exit {exit_code}"


def run_child(argv: Sequence[str], *, env: dict[str, str], cwd: str,
              what: str, isolation: Isolation = Isolation(),
              check: bool = True) -> ChildRun:
  """Runs one child to its end; wall time and peak RSS of it alone.

  Args:
    argv: the command.
    env: its environment.
    cwd: its working directory.
    what: names the child in an error.
    isolation: cold cache, memory limit, timeout.
    check: raise when it does not exit 0 (else the outcome says how it
      ended).

  Returns:
    The measurements and the child's output.

  Raises:
    ChildFailed: `check` and the child did not exit 0 (the message holds its
      stderr tail).
  """
  if isolation.cold:
    drop_caches()  # Before the clock starts.
  confinement = (isolation.memory.confine(argv) if isolation.memory
                 else Confinement(list(argv)))
  oom, cgroup_peak = False, None
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    try:
      start = time.perf_counter()
      # preexec_fn (cgroup v1 entry) is unsafe only in a process with
      # threads; bench.py's parent starts none.
      proc = subprocess.Popen(
          confinement.argv, stdout=out, stderr=err, env=env, cwd=cwd,
          preexec_fn=confinement.preexec_fn)  # noqa: PLW1509
      status, usage, timed_out = _wait(proc.pid, isolation.timeout_s)
      wall = time.perf_counter() - start
    finally:
      cgroup_peak, oom = confinement.finish()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    result = ChildRun(
        wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024.0, exit_code=proc.returncode,
        stdout=out.read().decode("utf-8", "replace"),
        stderr=err.read().decode("utf-8", "replace"),
        outcome=_outcome(proc.returncode, timed_out, oom, isolation),
        cgroup_peak_mib=cgroup_peak)
  if check and not result.ok:
    raise ChildFailed(
        f"FAILED: {what}: {result.outcome} after {result.wall_s:.1f} s.\n"
        f"Command: {shorten(argv)}\n"
        f"--- last {STDERR_TAIL_LINES} lines of its stderr ---\n"
        f"{result.stderr_tail()}")
  return result


def shorten(argv: Sequence[str], limit: int = 400) -> str:
  text = " ".join(argv)
  return text if len(text) <= limit else text[:limit] + " ..."
