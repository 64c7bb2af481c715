"""Progress of long runs: nothing for short ones, then a line on a terminal or in the log."""
import io
import logging
import time

import numpy as np
import pytest

from conftest import step_valued, write_tf1_series
from t2t_avg import average_checkpoints
from t2t_avg.engine import progress, streaming


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _progress_lines(caplog):
  return [r.getMessage() for r in caplog.records
          if r.getMessage().startswith("Averaged ") and " left" in r.getMessage()]


def test_nothing_before_the_grace_period_then_a_log_line_every_interval(caplog):
  clock = _Clock()
  done = progress.Progress(4_000_000_000, stream=io.StringIO(), clock=clock)
  with caplog.at_level(logging.INFO):
    for _ in range(4):  # 4 s: a short run shows nothing.
      clock.now += 1.0
      done.add(100_000_000)
      done.show()
    assert not _progress_lines(caplog)
    clock.now += 1.0  # 5 s, 1 GB of 4 GB: 200 MB/s, 15 s left.
    done.add(600_000_000)
    done.show()
    clock.now += 1.0
    done.show()  # Within the interval: no second line.
  lines = _progress_lines(caplog)
  assert lines == ["Averaged 1.0 GB of 4.0 GB of output (25%), 200.0 MB/s, "
                   "about 15 s left"], lines
  with caplog.at_level(logging.INFO):
    clock.now += progress.LOG_SECONDS
    done.show()
  assert len(_progress_lines(caplog)) == 2


def test_a_terminal_gets_a_progress_bar_not_log_lines(caplog):
  clock, terminal = _Clock(), _Terminal()
  done = progress.Progress(2_000_000, stream=terminal, clock=clock)
  with caplog.at_level(logging.INFO):
    clock.now += 1.0
    done.show()
    assert terminal.getvalue() == ""  # Still within the grace period.
    clock.now += progress.GRACE_SECONDS
    done.add(1_000_000)
    done.show()
    done.close()
  assert not _progress_lines(caplog)
  drawn = terminal.getvalue()
  assert "Averaging output" in drawn and "1.00M/2.00M" in drawn, drawn


@pytest.fixture(name="series")
def series_fixture(tmp_path):
  # 4 checkpoints of 4 MB (8 chunks of 0.5 MB each with the chunk size below).
  return write_tf1_series(str(tmp_path / "train"), [100, 200, 300, 400],
                          step_valued({"w": (1024, 1024)}))


def test_a_slow_run_logs_bytes_done_rate_and_time_left(series, tmp_path,
                                                       monkeypatch, caplog):
  monkeypatch.setattr(streaming, "CHUNK_BYTES", 512 << 10)
  monkeypatch.setattr(progress, "GRACE_SECONDS", 0.3)
  monkeypatch.setattr(progress, "LOG_SECONDS", 0.3)
  monkeypatch.setattr(progress, "TICK_SECONDS", 0.05)
  read = streaming._read  # pylint: disable=protected-access

  def slow_read(*args):
    time.sleep(0.05)  # A slow disk or network file system.
    read(*args)

  monkeypatch.setattr(streaming, "_read", slow_read)
  with caplog.at_level(logging.INFO):
    result = average_checkpoints(series, str(tmp_path / "avg" / "a"))
  lines = _progress_lines(caplog)
  assert lines, [r.getMessage() for r in caplog.records]
  assert all(" of 4.2 MB of output (" in line and "/s, " in line
             for line in lines), lines
  assert result.written
  expected = np.full((1024, 1024), 250.0, np.float32)  # mean of the steps
  from conftest import read_checkpoint  # pylint: disable=import-outside-toplevel
  assert np.array_equal(read_checkpoint(result.output_path)["w"], expected)


def test_a_short_run_logs_no_progress(series, tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    average_checkpoints(series, str(tmp_path / "avg" / "a"))
  assert not _progress_lines(caplog)
