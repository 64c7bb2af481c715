"""The protos of a V2 bundle's index, decoded and encoded by hand (no TensorFlow).

`BundleHeaderProto` (num_shards=1, endianness=2, version=3: `VersionDef`)
and `BundleEntryProto` (dtype=1, shape=2: `TensorShapeProto`, shard_id=3,
offset=4, size=5, crc32c=6, slices=7: `TensorSliceProto`), from
tensorflow/core/protobuf/tensor_bundle.proto. Encoding gives the bytes
protobuf's `SerializeToString` gives (fields in number order, proto3
defaults left out); decoding skips unknown fields as protobuf does.
tests/test_tf_free.py compares both with `tensor_bundle_pb2`.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence

LITTLE, BIG = 0, 1  # BundleHeaderProto.Endianness
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_UINT64 = (1 << 64) - 1

Extents = tuple[tuple[int, int], ...]  # (start, length; -1: to the end)


@dataclasses.dataclass
class Header:
  """A `BundleHeaderProto`."""
  num_shards: int = 0
  endianness: int = LITTLE
  producer: int = 0
  min_consumer: int = 0
  bad_consumers: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Entry:
  """A `BundleEntryProto`; `slices` as extents, `dim_names` only if any."""
  dtype: int = 0
  shape: tuple[int, ...] = ()
  shard_id: int = 0
  offset: int = 0
  size: int = 0
  crc32c: int = 0
  slices: tuple[Extents, ...] = ()
  unknown_rank: bool = False
  dim_names: tuple[str, ...] = ()


# --- decoding ----------------------------------------------------------------

def varint(buf: bytes, i: int) -> tuple[int, int]:
  """The unsigned varint at buf[i], and where the next field starts."""
  result = shift = 0
  while True:
    byte = buf[i]
    i += 1
    result |= (byte & 0x7f) << shift
    shift += 7
    if byte < 0x80:
      return result & _UINT64, i
    if shift >= 70:
      raise ValueError("varint too long")


def _signed(value: int, bits: int = 64) -> int:
  value &= (1 << bits) - 1
  return value - (1 << bits) if value >> (bits - 1) else value


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  """(field number, wire type, value: int or bytes) of a message."""
  i, n = 0, len(buf)
  while i < n:
    tag, i = varint(buf, i)
    number, wire = tag >> 3, tag & 7
    if number == 0:
      raise ValueError("field number 0")
    if wire == _VARINT:
      value, i = varint(buf, i)
      yield number, wire, value
    elif wire == _FIXED64:
      if i + 8 > n:
        raise ValueError("truncated fixed64")
      yield number, wire, int.from_bytes(buf[i:i + 8], "little")
      i += 8
    elif wire == _BYTES:
      length, i = varint(buf, i)
      if i + length > n:
        raise ValueError("truncated field")
      yield number, wire, buf[i:i + length]
      i += length
    elif wire == _FIXED32:
      if i + 4 > n:
        raise ValueError("truncated fixed32")
      yield number, wire, int.from_bytes(buf[i:i + 4], "little")
      i += 4
    else:  # Groups: never in these protos.
      raise ValueError(f"wire type {wire}")


def _packed_or_one(wire: int, value: object) -> list[int]:
  """A repeated int32's values: one varint, or packed varints."""
  if wire == _VARINT:
    return [_signed(value, 32)]  # type: ignore[arg-type]
  data, i, values = bytes(value), 0, []  # type: ignore[call-overload]
  while i < len(data):
    number, i = varint(data, i)
    values.append(_signed(number, 32))
  return values


def decode_header(buf: bytes) -> Header:
  """A `BundleHeaderProto` from its bytes.

  Raises:
    ValueError: malformed bytes.
  """
  header = Header()
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _VARINT:
      header.num_shards = _signed(value, 32)  # type: ignore[arg-type]
    elif number == 2 and wire == _VARINT:
      header.endianness = _signed(value, 32)  # type: ignore[arg-type]
    elif number == 3 and wire == _BYTES:
      for v_number, v_wire, v_value in _fields(value):  # type: ignore[arg-type]
        if v_number == 1 and v_wire == _VARINT:
          header.producer = _signed(v_value, 32)  # type: ignore[arg-type]
        elif v_number == 2 and v_wire == _VARINT:
          header.min_consumer = _signed(v_value, 32)  # type: ignore[arg-type]
        elif v_number == 3 and v_wire in (_VARINT, _BYTES):
          header.bad_consumers += _packed_or_one(v_wire, v_value)
  return header


def decode_entry(buf: bytes) -> Entry:
  """A `BundleEntryProto` from its bytes.

  Raises:
    ValueError: malformed bytes.
  """
  entry = Entry()
  dims: list[int] = []
  names: list[str] = []
  slices: list[Extents] = []
  for number, wire, value in _fields(buf):
    if wire == _VARINT and number in (1, 3, 4, 5):
      if number == 1:
        entry.dtype = _signed(value, 32)  # type: ignore[arg-type]
      elif number == 3:
        entry.shard_id = _signed(value, 32)  # type: ignore[arg-type]
      elif number == 4:
        entry.offset = _signed(value)  # type: ignore[arg-type]
      else:
        entry.size = _signed(value)  # type: ignore[arg-type]
    elif number == 2 and wire == _BYTES:
      for s_number, s_wire, s_value in _fields(value):  # type: ignore[arg-type]
        if s_number == 2 and s_wire == _BYTES:
          size, name = _decode_dim(s_value)  # type: ignore[arg-type]
          dims.append(size)
          names.append(name)
        elif s_number == 3 and s_wire == _VARINT:
          entry.unknown_rank = bool(s_value)
    elif number == 6 and wire == _FIXED32:
      entry.crc32c = value  # type: ignore[assignment]
    elif number == 7 and wire == _BYTES:
      slices.append(_decode_slice(value))  # type: ignore[arg-type]
  entry.shape, entry.slices = tuple(dims), tuple(slices)
  if any(names):
    entry.dim_names = tuple(names)
  return entry


def _decode_dim(buf: bytes) -> tuple[int, str]:
  size, name = 0, ""
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _VARINT:
      size = _signed(value)  # type: ignore[arg-type]
    elif number == 2 and wire == _BYTES:
      name = bytes(value).decode("utf-8")  # type: ignore[call-overload]
  return size, name


def _decode_slice(buf: bytes) -> Extents:
  extents = []
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _BYTES:
      start, length = 0, -1
      for e_number, e_wire, e_value in _fields(value):  # type: ignore[arg-type]
        if e_number == 1 and e_wire == _VARINT:
          start = _signed(e_value)  # type: ignore[arg-type]
        elif e_number == 2 and e_wire == _VARINT:
          length = _signed(e_value)  # type: ignore[arg-type]
      extents.append((start, length))
  return tuple(extents)


# --- encoding ----------------------------------------------------------------

def put_varint(value: int) -> bytes:
  """A varint; a negative value as its 64-bit two's complement (10 bytes)."""
  value &= _UINT64
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7f) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _int_field(number: int, value: int) -> bytes:
  return put_varint(number << 3) + put_varint(value) if value else b""


def _bytes_field(number: int, data: bytes) -> bytes:
  return put_varint(number << 3 | _BYTES) + put_varint(len(data)) + data


def encode_header(header: Header) -> bytes:
  """A `BundleHeaderProto`'s bytes, as `SerializeToString` gives them."""
  version = (_int_field(1, header.producer) +
             _int_field(2, header.min_consumer))
  if header.bad_consumers:  # proto3 packs repeated scalars.
    version += _bytes_field(3, b"".join(
        put_varint(v) for v in header.bad_consumers))
  out = _int_field(1, header.num_shards) + _int_field(2, header.endianness)
  if version:
    out += _bytes_field(3, version)
  return out


def encode_entry(entry: Entry) -> bytes:
  """A `BundleEntryProto`'s bytes, as `SerializeToString` gives them."""
  out = _int_field(1, entry.dtype)
  shape = b"".join(
      _bytes_field(2, _int_field(1, size) + (
          _bytes_field(2, entry.dim_names[i].encode("utf-8"))
          if entry.dim_names and entry.dim_names[i] else b""))
      for i, size in enumerate(entry.shape))
  if entry.unknown_rank:
    shape += _int_field(3, 1)
  if shape:
    out += _bytes_field(2, shape)
  out += (_int_field(3, entry.shard_id) + _int_field(4, entry.offset) +
          _int_field(5, entry.size))
  if entry.crc32c:
    out += bytes([6 << 3 | _FIXED32]) + struct.pack("<I", entry.crc32c)
  for extents in entry.slices:
    out += _bytes_field(7, encode_slice(extents))
  return out


def encode_slice(extents: Sequence[tuple[int, int]]) -> bytes:
  """A `TensorSliceProto`'s bytes (a length of -1: none, to the end)."""
  return b"".join(
      _bytes_field(1, _int_field(1, start) + (
          put_varint(2 << 3) + put_varint(length) if length >= 0 else b""))
      for start, length in extents)
