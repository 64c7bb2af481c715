"""Zip's CRC-32 of a byte range assembled from pieces read or written in any order.

Python's zlib has `crc32` but not zlib's `crc32_combine`, which gives the
CRC-32 of A + B from those of A and B and the length of B. It is done here
as zlib (1.2.12 and later) does it: multiplying by x^(8 len(B)) modulo the
CRC polynomial, the power taken from a table of x^(2^k). One combine costs a
few multiplications of 32-bit polynomials (tens of microseconds in Python),
so `Pieces` leaves small pieces to be read again in its sequential sweep
rather than combining them.

The CRC-32 itself is zlib-ng's when the `zlib-ng` package is there: on this
project's benchmark machine zlib 1.2.13 (Python's) runs at 0.9-1.6 GB/s,
zlib-ng at 4-9 GB/s, and a `.keras` average computes one over every byte
it reads and writes. Both release the GIL, as the averaging's two threads
need.
"""
from __future__ import annotations

import functools
import importlib
import threading
import zlib
from collections.abc import Callable
from typing import Any


def _fastest_zlib() -> Any:
  try:
    return importlib.import_module("zlib_ng.zlib_ng")
  except ImportError:  # zlib-ng is a dependency; zlib does the same, slower
    return zlib


_zlib = _fastest_zlib()


def checksum(data: Any, crc: int = 0) -> int:
  """zlib's CRC-32 of `data` (any buffer), continuing from `crc`."""
  return _zlib.crc32(data, crc)

_POLY = 0xedb88320  # x^32 + x^26 + ... + 1, bit-reversed (zlib's order)
_X0 = 1 << 31  # the polynomial 1 in that order


def _multiply(a: int, b: int) -> int:
  """a(x) * b(x) modulo the CRC polynomial, both in zlib's bit order."""
  product = 0
  mask = _X0
  while a:
    if a & mask:
      product ^= b
      a ^= mask
    mask >>= 1
    b = (b >> 1) ^ _POLY if b & 1 else b >> 1
  return product


def _powers() -> tuple[int, ...]:
  """x^(2^k) modulo the polynomial, k = 0..63."""
  power, table = _X0 >> 1, []  # x^1
  for _ in range(64):
    table.append(power)
    power = _multiply(power, power)
  return tuple(table)


_X_TO_2_TO = _powers()


@functools.lru_cache(maxsize=4096)
def _shift(length: int) -> int:
  """x^(8 length) modulo the polynomial: the operator of `length` bytes."""
  power, k = _X0, 3
  while length:
    if length & 1:
      power = _multiply(_X_TO_2_TO[k % 64], power)
    length >>= 1
    k += 1
  return power


def combine(crc_a: int, crc_b: int, length_b: int) -> int:
  """The CRC-32 of A + B, from A's CRC-32, B's and B's length in bytes.

  As zlib's `crc32_combine`: `zlib.crc32(a + b) == combine(zlib.crc32(a),
  zlib.crc32(b), len(b))`.
  """
  if length_b < 0:
    raise ValueError(f"a length is >= 0, not {length_b}")
  return _multiply(_shift(length_b), crc_a) ^ crc_b


# Pieces smaller than this are read again by the sweep instead: reading and
# checksumming 64 KiB from the page cache costs about what one combine does.
SMALL_PIECE = 64 << 10
_SWEEP_BYTES = 8 << 20


class Pieces:
  """(offset, length, CRC-32) of pieces of a byte range, from any thread.

  `total` combines them in offset order with the bytes between them, read
  then: every byte counts once, whether it was recorded, recorded twice (a
  part read again) or never (metadata, parts nobody read).
  """

  def __init__(self, size: int):
    self.size = size
    self._pieces: list[tuple[int, int, int]] = []
    self._lock = threading.Lock()

  def add(self, offset: int, data: memoryview) -> None:
    """Records the CRC-32 of `data`, found at `offset` of the range
    (pieces under `SMALL_PIECE` bytes are left to the sweep)."""
    if len(data) >= SMALL_PIECE:
      self.add_crc(offset, len(data), checksum(data))

  def add_crc(self, offset: int, length: int, crc: int) -> None:
    if offset < 0 or offset + length > self.size:
      raise ValueError(f"bytes [{offset}, {offset + length}) are outside "
                       f"[0, {self.size})")
    with self._lock:
      self._pieces.append((offset, length, crc))

  def covered(self) -> int:
    """How many bytes the recorded pieces cover (each once)."""
    return sum(length for _, length, _ in self._disjoint())

  def total(self, read: Callable[[int, int], bytes]) -> int:
    """The CRC-32 of the whole range; `read(offset, length)` gives the
    bytes no piece covers (it may raise)."""
    value, position = 0, 0
    for offset, length, crc in self._disjoint():
      value = self._sweep(value, position, offset, read)
      value = combine(value, crc, length)
      position = offset + length
    return self._sweep(value, position, self.size, read)

  def _disjoint(self) -> list[tuple[int, int, int]]:
    """The pieces in offset order, without those overlapping earlier ones
    (the bytes they alone hold are swept instead)."""
    with self._lock:
      pieces = sorted(self._pieces, key=lambda p: (p[0], -p[1]))
    kept, end = [], 0
    for piece in pieces:
      if piece[0] >= end:
        kept.append(piece)
        end = piece[0] + piece[1]
    return kept

  @staticmethod
  def _sweep(value: int, start: int, stop: int,
             read: Callable[[int, int], bytes]) -> int:
    while start < stop:
      count = min(_SWEEP_BYTES, stop - start)
      data = read(start, count)
      if len(data) != count:
        raise EOFError(f"{count} bytes asked at byte {start}, "
                       f"{len(data)} read")
      value = checksum(data, value)
      start += count
    return value
