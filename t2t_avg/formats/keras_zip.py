"""The `.keras` zip: where its weights' bytes are, and writing one deterministically.

Keras stores `model.weights.h5` uncompressed (ZIP_STORED), so its bytes are
one run of the `.keras` file at a fixed offset: they are read in place, with
positioned reads. Their CRC-32 (the zip's only integrity check) is not
checked by a read of its own: the reader adds up the CRC-32 of what it reads
(`crc32.Pieces`) and checks the member once it is done (`KerasSource`). A
compressed member (a `.keras` file re-zipped by another tool) is extracted
to a temporary file first, its CRC-32 checked on the way: reading a deflated
member in place decompresses from its start at every backward seek
(measured: 5.7 s for 128 MiB read in reverse, 0.9 s to extract and read).

The output is written in place too (`ArchiveWriter`): every member but the
weights is written at once, with the weights' room left between them; the
weights are written into that room as they are computed, and their CRC-32,
added up from the chunks written, is set into the two headers at the end.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from typing import IO, Optional
from collections.abc import Sequence

from t2t_avg.errors import AveragingError
from t2t_avg.files import crc32
from t2t_avg.formats import detect

WEIGHTS_MEMBER = detect.KERAS_WEIGHTS_MEMBER
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_LOCAL_CRC = 14  # where a local header holds the CRC-32
# The fixed part of a central directory entry (46 bytes; fields 12-14: the
# lengths of the name, extra and comment after it; its CRC-32 at byte 16).
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_CENTRAL_CRC = 16
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # zip's earliest: no time in the output
_COPY_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class WeightsMember:
  """Where a `.keras` file's `model.weights.h5` bytes are.

  Attributes:
    path: the file holding the bytes: the archive itself (stored member), or
      a temporary file it was extracted to.
    offset: where they start in `path`.
    size: how many there are.
    members: every member of the archive, in archive order.
    extracted: the temporary file to remove when done, or None.
    crc: the CRC-32 the zip stores for a member read in place, to check
      once it is read; None for an extracted one (checked when extracted).
  """
  path: str
  offset: int
  size: int
  members: tuple[zipfile.ZipInfo, ...]
  extracted: Optional[str] = None
  crc: Optional[int] = None


def open_weights(path: str) -> WeightsMember:
  """Finds (or extracts) the weights member of a `.keras` file.

  A stored member's CRC-32 is not checked here (see `check_whole`); a
  compressed one is checked while it is extracted.

  Raises:
    AveragingError: not a readable `.keras` file, or a corrupted member.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      members = tuple(archive.infolist())
      info = archive.getinfo(WEIGHTS_MEMBER)
  except (zipfile.BadZipFile, OSError, KeyError) as e:
    raise AveragingError(f"{path} is not a readable .keras file: "
                         f"{e}") from e
  if info.flag_bits & 0x1:
    raise AveragingError(f"{path}: its {WEIGHTS_MEMBER} is encrypted")
  if info.compress_type != zipfile.ZIP_STORED:
    extracted = _extract(path, info)
    return WeightsMember(extracted, 0, info.file_size, members, extracted)
  offset = _data_offset(path, info)
  return WeightsMember(path, offset, info.file_size, members, crc=info.CRC)


def _data_offset(path: str, info: zipfile.ZipInfo) -> int:
  """Where a stored member's bytes start: after its local header."""
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
  if len(header) < _LOCAL_HEADER.size or not header.startswith(
      _LOCAL_SIGNATURE):
    raise AveragingError(f"{path} is corrupted: no local header for "
                         f"{info.filename} at byte {info.header_offset}")
  name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
  offset = info.header_offset + _LOCAL_HEADER.size + name_length + (
      extra_length)
  if offset + info.file_size > os.path.getsize(path):
    raise AveragingError(f"{path} is truncated: {info.filename} ends past "
                         "the end of the file")
  return offset


def corrupted(path: str) -> AveragingError:
  """The error for a `.keras` file whose weights fail their CRC-32."""
  return AveragingError(f"{path} is corrupted: its {WEIGHTS_MEMBER} fails "
                        "its CRC-32")


def check_whole(path: str, member: WeightsMember) -> None:
  """Checks a stored member's CRC-32 with one sequential read of it (for
  a member nothing else reads, or to tell why reading it failed).

  Raises:
    AveragingError: it fails its CRC-32 or is truncated.
  """
  if member.crc is None:
    return
  value, left = 0, member.size
  buffer = memoryview(bytearray(min(_COPY_BYTES, left)))
  with open(member.path, "rb", buffering=0) as f:
    f.seek(member.offset)
    while left:
      count = f.readinto(buffer[:min(len(buffer), left)])
      if not count:
        break
      value = crc32.checksum(buffer[:count], value)
      left -= count
  if left or value != member.crc:
    raise corrupted(path)


def _extract(path: str, info: zipfile.ZipInfo) -> str:
  """Extracts a compressed member to a temporary file (its CRC checked)."""
  fd, extracted = tempfile.mkstemp(prefix="t2t_avg-keras-",
                                   suffix="-" + WEIGHTS_MEMBER)
  try:
    with zipfile.ZipFile(path) as archive, archive.open(info) as src, (
        os.fdopen(fd, "wb")) as dst:
      shutil.copyfileobj(src, dst, _COPY_BYTES)
  except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
    os.remove(extracted)
    raise AveragingError(f"cannot extract {info.filename} from {path}: "
                         f"{e}") from e
  return extracted


class ArchiveWriter:
  """A `.keras` file written around room for its weights, filled in place.

  Every member of `newest` is written, in its order, stored, dated
  1980-01-01 (the same inputs give the same bytes); in `model.weights.h5`'s
  place go the bytes of `layout` (an HDF5 file whose datasets are not yet
  written), of which only those outside `filled` are copied: the caller
  writes the rest at `weights_offset` + their offset in `layout`, recording
  each piece's CRC-32 in `pieces`, then calls `finish`. The bytes are the
  ones `zipfile` writes for the finished weights (the local header is
  `ZipInfo.FileHeader`'s, the central directory `zipfile`'s own).

  Attributes:
    fd: the open output file, for positioned writes.
    weights_offset: where the weights member's bytes start in it.
    pieces: the CRC-32 of the member's bytes written so far.
  """

  def __init__(self, output: str, newest: str,
               members: Sequence[zipfile.ZipInfo], layout: str,
               filled: Sequence[tuple[int, int]]):
    size = os.path.getsize(layout)
    self.pieces = crc32.Pieces(size)
    self._output = self.output_path = output
    self._raw: Optional[IO[bytes]] = open(output, "x+b")  # + : read back
    try:
      self._write_members(newest, members, layout, filled)
    except BaseException:
      self.abort()
      raise
    self.fd = self._raw.fileno()

  def _write_members(self, newest: str, members: Sequence[zipfile.ZipInfo],
                     layout: str, filled: Sequence[tuple[int, int]]) -> None:
    raw = self._raw
    assert raw is not None
    with zipfile.ZipFile(newest) as source, zipfile.ZipFile(
        raw, "w", zipfile.ZIP_STORED, allowZip64=True) as target:
      for info in members:
        entry = zipfile.ZipInfo(info.filename, date_time=_FIXED_DATE)
        entry.compress_type = zipfile.ZIP_STORED
        entry.create_system = 3
        entry.external_attr = info.external_attr
        if info.is_dir():
          target.writestr(entry, b"")
        elif info.filename == WEIGHTS_MEMBER:
          self._make_room(target, entry, layout, filled)
        else:
          entry.file_size = info.file_size
          with source.open(info) as src, target.open(entry, "w", force_zip64=(
              info.file_size > zipfile.ZIP64_LIMIT)) as dst:
            shutil.copyfileobj(src, dst, _COPY_BYTES)
      # `zipfile` writes the central directory here when it closes.
      self._central = target.start_dir
      self._index = [i.filename for i in target.infolist()].index(
          WEIGHTS_MEMBER)

  def _make_room(self, target: zipfile.ZipFile, entry: zipfile.ZipInfo,
                 layout: str, filled: Sequence[tuple[int, int]]) -> None:
    """What `target.open(entry, "w")` and writing the weights would do,
    with only the bytes of `layout` outside `filled` written now."""
    raw, size = self._raw, self.pieces.size
    assert raw is not None
    entry.file_size = entry.compress_size = size
    entry.CRC = entry.flag_bits = 0
    if not entry.external_attr:
      entry.external_attr = 0o600 << 16  # as zipfile does
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides
    raw.seek(target.start_dir)
    entry.header_offset = raw.tell()
    header = entry.FileHeader(zip64)
    raw.write(header)
    self.weights_offset = entry.header_offset + len(header)
    self._header = entry.header_offset
    position = 0
    with open(layout, "rb") as src:
      for start, stop in sorted(filled) + [(size, size)]:
        self._copy(src, position, start)
        position = max(position, stop)
    raw.seek(self.weights_offset + size)
    target.start_dir = raw.tell()
    target.filelist.append(entry)
    target.NameToInfo[entry.filename] = entry

  def _copy(self, src: IO[bytes], start: int, stop: int) -> None:
    raw = self._raw
    assert raw is not None
    src.seek(start)
    raw.seek(self.weights_offset + start)
    while start < stop:
      data = src.read(min(_COPY_BYTES, stop - start))
      if not data:
        raise AveragingError(f"internal error: {src.name} ends at byte "
                             f"{start}")
      raw.write(data)
      self.pieces.add(start, memoryview(data))
      start += len(data)

  def finish(self) -> None:
    """Sets the weights' CRC-32 into both headers, flushes to disk, closes.

    Raises:
      AveragingError: internal error: a piece of the weights was not written.
    """
    raw, self._raw = self._raw, None
    assert raw is not None
    with raw:
      raw.flush()
      value = self.pieces.total(self._read_back)
      packed = struct.pack("<I", value)
      os.pwrite(self.fd, packed, self._header + _LOCAL_CRC)
      os.pwrite(self.fd, packed, self._central_entry() + _CENTRAL_CRC)
      os.fsync(self.fd)

  def _read_back(self, offset: int, length: int) -> bytes:
    """Bytes of the weights no recorded piece covers (small: HDF5
    metadata and small datasets), from the page cache."""
    return os.pread(self.fd, length, self.weights_offset + offset)

  def _central_entry(self) -> int:
    """Where the weights' entry of the central directory starts."""
    position = self._central
    for _ in range(self._index):
      fixed = os.pread(self.fd, _CENTRAL.size, position)
      if len(fixed) != _CENTRAL.size or not fixed.startswith(
          _CENTRAL_SIGNATURE):
        raise AveragingError(f"internal error: no central directory entry "
                             f"at byte {position} of {self._output}")
      position += _CENTRAL.size + sum(_CENTRAL.unpack(fixed)[12:15])
    return position

  def abort(self) -> None:
    """Closes the output file (the caller removes it)."""
    raw, self._raw = self._raw, None
    if raw is not None:
      raw.close()
