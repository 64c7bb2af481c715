"""Reading ahead while the run starts: which files, and only when they fit."""
import os

import pytest

from conftest import step_valued, write_tf1_series
from t2t_avg import options
from t2t_avg.inputs import prefetch


def _series(tmp_path):
  return write_tf1_series(str(tmp_path / "train"), [10, 20, 30],
                          step_valued({"w": (64,)}))


def test_finds_the_checkpoints_the_run_will_read(tmp_path):
  prefixes = _series(tmp_path)
  last_two = options.InputOptions(prefix=f"{tmp_path}/train/",
                                  num_last_checkpoints=2)
  assert prefetch.input_prefixes(last_two) == prefixes[1:]
  listed = options.InputOptions(
      checkpoints=("model.ckpt-10.index", "."), prefix=f"{tmp_path}/train/")
  assert prefetch.input_prefixes(listed) == [prefixes[0], prefixes[2]]
  missing = options.InputOptions(prefix=f"{tmp_path}/nowhere/",
                                 num_last_checkpoints=2)
  assert prefetch.input_prefixes(missing) == []


def test_asks_the_kernel_for_every_file_when_they_fit(tmp_path, monkeypatch):
  prefixes = _series(tmp_path)
  advised = []
  monkeypatch.setattr(os, "posix_fadvise",
                      lambda fd, offset, length, advice: advised.append(
                          (os.readlink(f"/proc/self/fd/{fd}"), advice)))
  thread = prefetch.start(prefixes)
  assert thread is not None
  thread.join(10)
  expected = sorted(f"{p}{suffix}" for p in prefixes
                    for suffix in (".data-00000-of-00001", ".index"))
  assert sorted(path for path, _ in advised) == expected
  assert {advice for _, advice in advised} == {os.POSIX_FADV_WILLNEED}


def test_does_nothing_when_the_files_would_not_fit(tmp_path, monkeypatch):
  prefixes = _series(tmp_path)
  size = sum(os.path.getsize(os.path.join(tmp_path, "train", n))
             for n in os.listdir(tmp_path / "train")
             if n.endswith(".index") or ".data-" in n)
  monkeypatch.setattr(prefetch, "available_memory", lambda: size)
  assert prefetch.start(prefixes) is None  # More than half of the room.
  monkeypatch.setattr(prefetch, "available_memory", lambda: 4 * size)
  thread = prefetch.start(prefixes)
  assert thread is not None
  thread.join(10)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"),
                    reason="reads /proc/meminfo (Linux)")
def test_available_memory_is_a_positive_number_here():
  room = prefetch.available_memory()
  assert isinstance(room, int) and room > 0
