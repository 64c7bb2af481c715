"""A shared output directory: planted names are never followed, nothing of ours is left.

A hostile neighbour who can write to the output directory (the legacy
default is /tmp) plants a symbolic link, to a directory and to a file outside
it, at every name t2t_avg uses there. Nothing outside the output directory may
change, and the run either succeeds or refuses in one line; a run that fails
for any reason leaves no file of its own behind.
"""
import os
import pwd
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (REPO, call_cli, error_line, read_checkpoint, run_cli,
                      step_valued, tree_fingerprint, write_tf1_series)

OUTPUT = "averaged.ckpt"  # The legacy default's basename.
PRODUCT = f"{OUTPUT}-0"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("shared_inputs")
  return write_tf1_series(str(root / "train"), [10, 20, 30],
                          step_valued({"body/w": (3, 4), "body/b": (4,)}))


@pytest.fixture
def victim(tmp_path):
  """Someone else's directory and file, outside the output directory."""
  home = tmp_path / "victim"
  (home / "work").mkdir(parents=True)
  (home / "work" / "thesis.txt").write_text("years of work\n")
  (home / "precious.txt").write_text("do not touch\n")
  return home


def _entries(directory):
  return sorted(os.listdir(directory))


def _links(out, names, target):
  for name in names:
    os.symlink(target, out / name)


def _next_pids(count=64):
  """Pids the next processes will probably get (Linux hands them out in turn)."""
  start = os.getpid()
  return range(start + 1, start + count)


# (the planted names, whether the run is expected to succeed)
PLANTED = {
    "stale_temporary_dead_pid": ([f".t2t_avg-tmp.{PRODUCT}.999999"], True),
    "temporaries_under_next_pids": (
        [f".t2t_avg-tmp.{PRODUCT}.{p}" for p in _next_pids()] +
        [f"checkpoint.t2t_avg-tmp.{p}" for p in _next_pids()], True),
    "claim_mark": ([f".t2t_avg-writing.{PRODUCT}"], False),
    "output_index": ([f"{PRODUCT}.index"], False),
    "output_data": ([f"{PRODUCT}.data-00000-of-00001"], False),
    "output_record": ([f"{PRODUCT}.t2t_avg.json"], False),
    "state_file": (["checkpoint"], True),
    "summaries_directory": (["t2t_avg"], False),
}


@pytest.mark.parametrize("target", ["directory", "file"])
@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_link_is_never_followed(inputs, victim, tmp_path, case,
                                        target):
  names, succeeds = PLANTED[case]
  out = tmp_path / "shared"
  out.mkdir()
  os.chmod(out, 0o1777)  # As /tmp.
  _links(out, names, victim / "work" if target == "directory"
         else victim / "precious.txt")
  victim_before = tree_fingerprint(victim)
  inputs_before = tree_fingerprint(os.path.dirname(inputs[0]))

  # Temporaries under the next pids: a real process, to get one of them.
  run = run_cli if case == "temporaries_under_next_pids" else call_cli
  result = run(f"--checkpoints={','.join(inputs)}",
               f"--output_path={out}/{OUTPUT}", "--weight_summaries")

  assert tree_fingerprint(victim) == victim_before
  assert tree_fingerprint(os.path.dirname(inputs[0])) == inputs_before
  for name in names:  # The planted links are left as they were.
    assert os.path.islink(out / name), name
  if not succeeds:
    line = error_line(result)
    assert str(out) in line and "t2t_avg will not" in line or (
        "is a symbolic link" in line), line
    assert _entries(out) == sorted(names), "a failed run left files behind"
    return
  assert result.returncode == 0, result.stderr[-2000:]
  values = read_checkpoint(str(out / PRODUCT))
  np.testing.assert_array_equal(values["body/w"], np.full((3, 4), 20.0))
  ours = set(_entries(out)) - set(names)
  assert not [n for n in ours if n.startswith(".t2t_avg")], ours
  if case == "state_file":
    assert "Not touching" in result.stderr and "symbolic link" in (
        result.stderr)


def test_planted_link_refusals_say_what_is_wrong(inputs, victim, tmp_path):
  out = tmp_path / "shared"
  out.mkdir()
  os.symlink(victim / "precious.txt", out / f"{PRODUCT}.index")
  line = error_line(call_cli(f"--checkpoints={','.join(inputs)}",
                             f"--output_path={out}/{OUTPUT}"))
  assert line == (f"t2t_avg: error: output file {out}/{PRODUCT}.index is a "
                  "symbolic link; t2t_avg will not replace it: remove it or "
                  "choose another --output_path")
  os.remove(out / f"{PRODUCT}.index")
  os.symlink(victim / "precious.txt", out / f".t2t_avg-writing.{PRODUCT}")
  line = error_line(call_cli(f"--checkpoints={','.join(inputs)}",
                             f"--output_path={out}/{OUTPUT}"))
  assert line == (f"t2t_avg: error: {out}/.t2t_avg-writing.{PRODUCT} is a "
                  "symbolic link, not a mark t2t_avg left; remove it or "
                  "choose another output")


def _stale_temporary(out, name, *, pid=999999, host=None):
  """A directory exactly as a killed run of t2t_avg would have left it."""
  tmp = out / f".t2t_avg-tmp.{PRODUCT}.{name}"
  (tmp / "pieces").mkdir(parents=True)
  (tmp / "t2t_avg-owner").write_text(f"{pid} {host or socket.gethostname()}\n")
  (tmp / "pieces" / "piece-0.index").write_bytes(b"x" * 10)
  return tmp


def test_stale_temporary_of_ours_is_removed_and_a_lookalike_left(
    inputs, victim, tmp_path):
  out = tmp_path / "shared"
  out.mkdir()
  ours = _stale_temporary(out, "abc123")
  running = _stale_temporary(out, "run456", pid=os.getpid())
  elsewhere = _stale_temporary(out, "far789", host="another-host")
  no_owner_file = out / f".t2t_avg-tmp.{PRODUCT}.old"
  no_owner_file.mkdir()
  with_link = _stale_temporary(out, "lnk000")
  os.symlink(victim / "work", with_link / "pieces" / "evil")
  victim_before = tree_fingerprint(victim)

  result = run_cli(f"--checkpoints={','.join(inputs)}",
                   f"--output_path={out}/{OUTPUT}")

  assert result.returncode == 0, result.stderr[-2000:]
  assert not ours.exists()
  for kept in (running, elsewhere, no_owner_file, with_link):
    assert kept.exists(), kept
  assert tree_fingerprint(victim) == victim_before
  assert f"Leaving {no_owner_file} alone: it holds no regular file" in (
      result.stderr)
  assert f"Leaving {with_link} alone: it holds {with_link}/pieces/evil" in (
      result.stderr)


def test_owner_file_not_yet_written_is_a_run_starting(inputs, tmp_path):
  """A run between creating its owner file (or claim mark) and writing it:
  its temporary is kept and its mark refuses; a minute later, never written,
  both count as left by a killed run."""
  out = tmp_path / "shared"
  out.mkdir()
  starting = _stale_temporary(out, "new111")
  killed = _stale_temporary(out, "old222")
  for tmp in (starting, killed):
    (tmp / "t2t_avg-owner").write_text("")
  long_ago = time.time() - 120
  os.utime(killed / "t2t_avg-owner", (long_ago, long_ago))
  mark = out / f".t2t_avg-writing.{PRODUCT}"
  mark.write_text("")
  args = (f"--checkpoints={','.join(inputs)}", f"--output_path={out}/{OUTPUT}")

  line = error_line(call_cli(*args))
  assert line == (f"t2t_avg: error: another t2t_avg run (just started) is "
                  f"writing {out}/{PRODUCT}; wait for it to finish or choose "
                  "another output")
  os.utime(mark, (long_ago, long_ago))
  result = call_cli(*args)

  assert result.returncode == 0, result.stderr[-2000:]
  assert starting.exists()
  assert not killed.exists()
  assert not mark.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_stale_looking_temporary_of_another_user_is_left_alone(
    inputs, tmp_path):
  out = tmp_path / "shared"
  out.mkdir()
  theirs = _stale_temporary(out, "nobody1")
  nobody = pwd.getpwnam("nobody").pw_uid
  for root, dirs, files in os.walk(theirs):
    for name in dirs + files:
      os.chown(os.path.join(root, name), nobody, -1)
  os.chown(theirs, nobody, -1)
  before = tree_fingerprint(theirs)

  result = call_cli(f"--checkpoints={','.join(inputs)}",
                    f"--output_path={out}/{OUTPUT}")

  assert result.returncode == 0, result.stderr[-2000:]
  assert tree_fingerprint(theirs) == before
  assert f"Leaving {theirs} alone: it is owned by another user (uid " \
      f"{nobody})" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_claim_mark_of_another_user_is_refused_not_taken_over(inputs,
                                                              tmp_path):
  out = tmp_path / "shared"
  out.mkdir()
  mark = out / f".t2t_avg-writing.{PRODUCT}"
  mark.write_text(f"999999 {socket.gethostname()}\n")
  nobody = pwd.getpwnam("nobody").pw_uid
  os.chown(mark, nobody, -1)
  line = error_line(call_cli(f"--checkpoints={','.join(inputs)}",
                             f"--output_path={out}/{OUTPUT}"))
  assert line == (f"t2t_avg: error: {mark} marks {out}/{PRODUCT} as being "
                  f"written by another user (uid {nobody}); choose another "
                  "output")
  assert _entries(out) == [mark.name]


def test_temporary_directory_is_fresh_and_private(inputs, tmp_path,
                                                  monkeypatch):
  """Seen from inside the run: mode 0700, an unpredictable name, made anew."""
  from t2t_avg.files import publish  # pylint: disable=import-outside-toplevel
  seen = []
  real_publish = publish.Output.publish

  def spy(self, *args, **kwargs):
    tmp_dir = os.path.dirname(self.temporary_path("x"))
    seen.append((tmp_dir, os.lstat(tmp_dir).st_mode))
    return real_publish(self, *args, **kwargs)

  monkeypatch.setattr(publish.Output, "publish", spy)
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import average_checkpoints
  average_checkpoints(inputs, str(tmp_path / "o" / OUTPUT))
  average_checkpoints(inputs, str(tmp_path / "o" / OUTPUT))
  (first, mode), (second, _) = seen
  assert mode & 0o777 == 0o700
  assert first != second
  assert os.path.basename(first).startswith(f".t2t_avg-tmp.{PRODUCT}.")
  assert str(os.getpid()) not in os.path.basename(first)
  assert not os.path.exists(first) and not os.path.exists(second)


@pytest.fixture(scope="module")
def large_inputs(tmp_path_factory):
  """Three checkpoints of 48 MB each: long enough to interrupt."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp("shared_large")
  prefixes = []
  for step in (1, 2, 3):
    prefix = str(directory / f"model.ckpt-{step}")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["big", "global_step"],
                      shape_and_slices=["", ""],
                      tensors=[np.full((12_000_000,), step, np.float32),
                               np.int64(step)])
    prefixes.append(prefix)
  return prefixes


def _limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


def test_disk_full_leaves_nothing_and_names_the_output(large_inputs,
                                                       tmp_path):
  out = tmp_path / "shared"
  out.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "t2t_avg",
       f"--checkpoints={','.join(large_inputs)}",
       f"--output_path={out}/{OUTPUT}"],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
      preexec_fn=_limit_file_size)
  line = error_line(result)
  assert line.startswith(f"t2t_avg: error: cannot write {out}/{PRODUCT}: "), \
      line
  assert "File too large" in line, line
  assert _entries(out) == []


def _bytes_below(directory):
  total = 0
  for root, _, files in os.walk(directory):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except FileNotFoundError:
        pass
  return total


def test_ctrl_c_leaves_nothing(large_inputs, tmp_path):
  out = tmp_path / "shared"
  out.mkdir()
  proc = subprocess.Popen(
      [sys.executable, "-m", "t2t_avg",
       f"--checkpoints={','.join(large_inputs)}",
       f"--output_path={out}/{OUTPUT}"],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    # Interrupt once the run has written a few megabytes of its output.
    while proc.poll() is None and _bytes_below(out) < (8 << 20):
      time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 1, stderr[-2000:]
  assert stderr.strip().splitlines()[-1] == (
      "t2t_avg: error: interrupted; nothing was written")
  assert _entries(out) == []
