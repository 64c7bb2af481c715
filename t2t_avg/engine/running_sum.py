"""A float64 running sum of same-shaped array lists, and its mean cast once.

Stochastic weight averaging (every epoch from k on) needs the mean of an
open-ended series without keeping each member: each float (complex) array
is added in float64 (complex128) in arrival order, exactly as the engine
sums checkpoints, and the mean is divided once and cast once
(`streaming.cast_once`), so it equals the engine's uniform average of the
same values bit for bit. Arrays of other dtypes (counters, seeds) are kept
as the newest member has them, as the engine copies them from the newest
input.
"""
from __future__ import annotations

from typing import Optional
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from t2t_avg.engine import streaming
from t2t_avg.errors import AveragingError
from t2t_avg.formats import extra_dtypes

_CHUNK = streaming.CHUNK_BYTES // 8  # float64 elements divided at once


def _wide(dtype: np.dtype) -> Optional[type]:
  """float64 or complex128 for a dtype that is averaged; None: copied."""
  if np.issubdtype(dtype, np.complexfloating):
    return np.complex128
  bfloat16 = extra_dtypes.lookup("bfloat16")  # (Only ml_dtypes has it.)
  if np.issubdtype(dtype, np.floating) or (bfloat16 is not None and
                                           dtype == bfloat16):
    return np.float64
  return None


class RunningSum:
  """The sum of every list of arrays added, and how many were added."""

  def __init__(self, names: Sequence[str]):
    """Args: names: one per array, for messages (e.g. variable paths)."""
    self.names = list(names)
    self.count = 0
    self._totals: list[np.ndarray] = []
    self._dtypes: list[np.dtype] = []

  def add(self, arrays: Iterable[np.ndarray]) -> None:
    """Adds one member: an array per name, as shaped and typed as the first
    member's (taken one by one, so a generator keeps one in memory).

    Raises:
      AveragingError: a count, shape or dtype other than the first member's.
    """
    first, count = not self.count, 0
    for count, array in enumerate(arrays, 1):
      if count > len(self.names):
        break
      value = np.asarray(array)
      if first:
        self._dtypes.append(value.dtype)
        self._totals.append(np.zeros(value.shape, _wide(value.dtype) or
                                     value.dtype))
      self._accumulate(count - 1, value)
    if count != len(self.names):
      if first:
        self._totals, self._dtypes = [], []
      raise AveragingError(f"{'more' if count > len(self.names) else count} "
                           f"arrays to add to a running sum of "
                           f"{len(self.names)}")
    self.count += 1

  def _accumulate(self, i: int, value: np.ndarray) -> None:
    total, dtype = self._totals[i], self._dtypes[i]
    if value.shape != total.shape or value.dtype != dtype:
      raise AveragingError(
          f"variable {self.names[i]} is {value.dtype} {list(value.shape)} "
          f"now, but was {dtype} {list(total.shape)} in the running sum")
    if _wide(dtype) is None:
      total[...] = value  # The newest member's.
    else:
      np.add(total, value.astype(total.dtype), out=total)

  def means(self) -> Iterator[np.ndarray]:
    """Each float array's sum / count, cast once to its dtype (the others as
    the newest member had them), one array at a time: the division runs in
    chunks, so beyond the sums it takes one array of the result's dtype.

    Raises:
      AveragingError: nothing was added.
    """
    if not self.count:
      raise AveragingError("the running sum is empty: nothing to average")
    for total, dtype in zip(self._totals, self._dtypes):
      if _wide(dtype) is None:
        yield total.copy()
        continue
      result = np.empty(total.shape, dtype)
      flat_total, flat = total.reshape(-1), result.reshape(-1)
      for start in range(0, flat.size, _CHUNK):
        streaming.cast_once(flat_total[start:start + _CHUNK] / self.count,
                            flat[start:start + _CHUNK])
      yield result

  @property
  def nbytes(self) -> int:
    """The memory the sums take."""
    return sum(t.nbytes for t in self._totals)
