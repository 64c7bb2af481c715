"""TensorFlow's checkpoint bundle format: index tables, raw tensor reads, a raw writer.

A V2 checkpoint is `<prefix>.index`, a LevelDB-style table mapping each
tensor name to a `BundleEntryProto` (dtype, shape, shard, offset, size,
masked crc32c), and `<prefix>.data-NNNNN-of-MMMMM` files holding the tensors'
raw little-endian bytes. Reading and writing those bytes directly, in chunks,
is what lets the engine average a tensor of any size in a few megabytes; TF's
own reader (`CheckpointReader.get_tensor`) only returns whole tensors.
"""
import dataclasses
import os
import struct
from typing import Iterator, Optional

import crc32c
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import tensor_bundle_pb2

from t2t_avg.errors import AveragingError

_MAGIC = 0xdb4775248b80fb57
_FOOTER_BYTES = 48
_NO_COMPRESSION = 0
_MASK_DELTA = 0xa282ead8


def masked_crc(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xffffffff) + _MASK_DELTA) & 0xffffffff


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one tensor's bytes are."""
  name: str
  data_file: str
  offset: int
  size: int
  crc: int  # masked crc32c of the bytes


def _varint(buf: bytes, i: int) -> tuple:
  result = shift = 0
  while True:
    byte = buf[i]
    i += 1
    result |= (byte & 0x7f) << shift
    shift += 7
    if byte < 0x80:
      return result, i


def _block_entries(block: bytes) -> Iterator[tuple]:
  restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
  end = len(block) - 4 - 4 * restarts
  i, key = 0, b""
  while i < end:
    shared, i = _varint(block, i)
    unshared, i = _varint(block, i)
    length, i = _varint(block, i)
    key = key[:shared] + block[i:i + unshared]
    i += unshared
    yield key, block[i:i + length]
    i += length


def _read_block(table: bytes, handle: bytes) -> bytes:
  offset, i = _varint(handle, 0)
  size, _ = _varint(handle, i)
  if table[offset + size] != _NO_COMPRESSION:
    raise ValueError("compressed index block")
  return table[offset:offset + size]


def read_entries(prefix: str) -> Optional[dict]:
  """{name: Entry} for the tensors whose raw bytes can be read directly.

  Returns None when the index is not the plain layout TF's BundleWriter
  writes (compressed blocks, big-endian data); sliced (partitioned)
  variables and non-numeric tensors are left out. Callers then use TF's
  reader, which stays the authority on what a checkpoint holds.
  """
  with tf.io.gfile.GFile(prefix + ".index", "rb") as f:
    table = f.read()
  try:
    if len(table) < _FOOTER_BYTES or struct.unpack_from(
        "<Q", table, len(table) - 8)[0] != _MAGIC:
      return None
    footer = table[-_FOOTER_BYTES:]
    _, i = _varint(footer, 0)
    _, i = _varint(footer, i)  # The metaindex handle, unused.
    index = _read_block(table, footer[i:])
    header, entries = None, {}
    for _, handle in _block_entries(index):
      for key, value in _block_entries(_read_block(table, handle)):
        if not key:
          header = tensor_bundle_pb2.BundleHeaderProto.FromString(value)
          continue
        entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
        if entry.slices or entry.dtype == tf.string.as_datatype_enum:
          continue
        entries[key.decode("utf-8")] = (entry.shard_id, entry.offset,
                                        entry.size, entry.crc32c)
  except (IndexError, ValueError, struct.error):
    return None
  if header is None or (
      header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE):
    return None
  shards = header.num_shards
  return {
      name: Entry(name, f"{prefix}.data-{shard:05d}-of-{shards:05d}", offset,
                  size, crc)
      for name, (shard, offset, size, crc) in entries.items()}


class DataFile:
  """Positioned reads from one `.data-*` file (local, or any gfile path)."""

  def __init__(self, path: str):
    self.path = path
    self._fd = os.open(path, os.O_RDONLY) if "://" not in path else None
    self._gfile = None if self._fd is not None else tf.io.gfile.GFile(path,
                                                                      "rb")

  def read_into(self, buffer: memoryview, offset: int) -> None:
    if self._fd is not None:
      done = 0
      while done < len(buffer):
        n = os.preadv(self._fd, [buffer[done:]], offset + done)
        if n == 0:
          raise AveragingError(f"{self.path} is truncated (reading at byte "
                               f"{offset + done})")
        done += n
      return
    self._gfile.seek(offset)
    data = self._gfile.read(len(buffer))
    if len(data) != len(buffer):
      raise AveragingError(f"{self.path} is truncated (reading at byte "
                           f"{offset + len(data)})")
    buffer[:] = data

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
    if self._gfile is not None:
      self._gfile.close()


class RawBundleWriter:
  """Writes tensors chunk by chunk into a one-shard bundle of TF's format.

  The bytes go straight to `<prefix>.data-00000-of-00001` with their crc32c
  computed on the way; `close` writes the index table. The result is read
  (and merged with `MergeV2Checkpoints`) by TF like any checkpoint.
  """

  def __init__(self, prefix: str):
    self.prefix = prefix
    path = prefix + ".data-00000-of-00001"
    self._local = "://" not in path
    # pylint: disable-next=consider-using-with
    self._data = (open(path, "wb") if self._local
                  else tf.io.gfile.GFile(path, "wb"))
    self._offset = 0
    self._entries = {}
    self._current = None

  def begin(self, name: str, dtype: tf.DType, shape) -> None:
    self._current = (name, dtype, tuple(shape), self._offset, 0)

  def write(self, chunk: np.ndarray) -> None:
    name, dtype, shape, offset, crc = self._current
    data = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
    crc = crc32c.crc32c(data, crc)
    self._data.write(data if self._local else data.tobytes())
    self._offset += len(data)
    self._current = (name, dtype, shape, offset, crc)

  def end(self) -> None:
    name, dtype, shape, offset, crc = self._current
    entry = tensor_bundle_pb2.BundleEntryProto(
        dtype=dtype.as_datatype_enum, shard_id=0, offset=offset,
        size=self._offset - offset, crc32c=masked_crc(crc))
    for dim in shape:
      entry.shape.dim.add(size=dim)
    self._entries[name.encode("utf-8")] = entry.SerializeToString()
    self._current = None

  def close(self) -> None:
    self._data.close()
    header = tensor_bundle_pb2.BundleHeaderProto(
        num_shards=1, endianness=tensor_bundle_pb2.BundleHeaderProto.LITTLE)
    header.version.producer = 1
    entries = [(b"", header.SerializeToString())] + sorted(
        self._entries.items())
    with tf.io.gfile.GFile(self.prefix + ".index", "wb") as f:
      f.write(_table(entries))


def _put_varint(value: int) -> bytes:
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7f) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _block(entries) -> bytes:
  """A table block with a restart point at every entry (no key sharing)."""
  body, restarts = bytearray(), []
  for key, value in entries:
    restarts.append(len(body))
    body += _put_varint(0) + _put_varint(len(key)) + _put_varint(len(value))
    body += key + value
  restarts = restarts or [0]
  body += struct.pack(f"<{len(restarts)}I", *restarts)
  body += struct.pack("<I", len(restarts))
  return bytes(body)


def _table(entries) -> bytes:
  """A LevelDB-format table of sorted (key, value) pairs, one data block."""
  out = bytearray()

  def put_block(block):
    handle = _put_varint(len(out)) + _put_varint(len(block))
    trailer = bytes([_NO_COMPRESSION])
    crc = masked_crc(crc32c.crc32c(block + trailer))
    out.extend(block + trailer + struct.pack("<I", crc))
    return handle

  data_handle = put_block(_block(entries))
  meta_handle = put_block(_block([]))
  index_handle = put_block(_block([(entries[-1][0], data_handle)]))
  footer = meta_handle + index_handle
  footer += b"\0" * (_FOOTER_BYTES - 8 - len(footer))
  out += footer + struct.pack("<Q", _MAGIC)
  return bytes(out)
