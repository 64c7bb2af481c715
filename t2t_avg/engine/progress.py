"""Where a long run is: bytes averaged of the total, rate and time left.

Nothing for the first `GRACE_SECONDS` (a short run prints nothing extra);
then, on a terminal, one progress line (tqdm) redrawn in place, and in a log
(stderr not a terminal) an INFO line every `LOG_SECONDS`.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Optional, TextIO
from collections.abc import Callable

from absl import logging

GRACE_SECONDS = 5.0
LOG_SECONDS = 10.0
TICK_SECONDS = 1.0  # How often the waiting thread calls `show`.


class Progress:
  """Counts bytes from any thread; `show` from one thread draws or logs."""

  def __init__(self, total: int, *, what: str = "output",
               stream: Optional[TextIO] = None,
               clock: Callable[[], float] = time.monotonic):
    self._total, self._what = total, what
    self._stream = sys.stderr if stream is None else stream
    self._clock = clock
    self._start = clock()
    self._done = 0
    self._lock = threading.Lock()
    self._bar: Optional[Any] = None
    self._last_log = self._start

  @property
  def done(self) -> int:
    return self._done

  def add(self, nbytes: int) -> None:
    with self._lock:
      self._done += nbytes

  def show(self) -> None:
    """Draws or logs where the run is, once it has run `GRACE_SECONDS`."""
    now = self._clock()
    elapsed = now - self._start
    if elapsed < GRACE_SECONDS or not self._total:
      return
    if self._is_terminal():
      self._draw()
    elif now - self._last_log >= LOG_SECONDS or self._last_log == self._start:
      self._last_log = now
      logging.info("%s", self.text(elapsed))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.update(self._done - self._bar.n)
      self._bar.close()
      self._bar = None

  def text(self, elapsed: float) -> str:
    """'Averaged 1.2 of 3.5 GB of output (34%), 250 MB/s, about 9 s left'."""
    done, total = self._done, self._total
    rate = done / elapsed if elapsed > 0 else 0.0
    left = f"about {(total - done) / rate:.0f} s left" if rate else "starting"
    return (f"Averaged {_size(done)} of {_size(total)} of {self._what} "
            f"({100 * done / total:.0f}%), {_size(rate)}/s, {left}")

  def _is_terminal(self) -> bool:
    isatty = getattr(self._stream, "isatty", None)
    return bool(isatty and isatty())

  def _draw(self) -> None:
    if self._bar is None:
      import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm.tqdm(total=self._total, unit="B", unit_scale=True,
                            unit_divisor=1000, file=self._stream,
                            desc=f"Averaging {self._what}", leave=False,
                            dynamic_ncols=True, mininterval=0)
    self._bar.update(self._done - self._bar.n)


def _size(nbytes: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if nbytes >= scale:
      return f"{nbytes / scale:.1f} {unit}"
  return f"{nbytes:.0f} B"
