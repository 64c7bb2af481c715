"""TensorBoard event files by hand (no TensorFlow): TFRecord frames, `Event`s.

An event file is a sequence of TFRecords (length, masked CRC32C of the
length, data, masked CRC32C of the data), each an `Event` proto of
tensorflow/core/util/event.proto. Decoded are the fields a scalar needs:
`Event` wall_time=1, step=2, summary=5 (the other members of its `what`
oneof, 3 file_version, 4, 6-9, only by number: the last member wins);
`Summary` value=1; `Summary.Value` tag=1, simple_value=2, tensor=8 (the
other members of its `value` oneof, 3-6, only by number); `TensorProto`
(tensor.proto) dtype=1, tensor_shape=2 (`TensorShapeProto` dim=2, its
size=1), tensor_content=4, float_val=5, double_val=6, int_val=7,
int64_val=10, bool_val=11, half_val=13, uint32_val=16, uint64_val=17,
float8_val=18. As protobuf does: unknown fields and fields of another wire
type are skipped, repeated numbers are read packed or not, a message field
given twice is merged, strings must be UTF-8. Messages t2t_avg does not read
(metadata, images, graphs...) are skipped unparsed. Encoding gives
`SerializeToString`'s bytes for the events t2t_avg writes.
tests/test_event_decoding.py holds both to TF's protos and TF's, Keras' and
TensorBoard's writers.

Why not TensorBoard's TF-free protos (`tensorboard.compat.proto`): TF 2.21
no longer installs `tensorboard`, which would bring grpcio, werkzeug, pillow
and markdown (44 MB of wheels) for these twenty fields; the bundle's protos
are decoded the same way (`tf_protos`).
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np

from t2t_avg.errors import AveragingError
from t2t_avg.files import crc
from t2t_avg.formats import tf_dtypes
from t2t_avg.formats.tf_protos import put_varint, varint

HEADER = struct.Struct("<QI")  # record length, masked crc32c of the length
FOOTER = struct.Struct("<I")  # masked crc32c of the data
FILE_VERSION = "brain.Event:2"  # What TF's writers put in a file's 1st event

_VARINT, _FIXED64, _BYTES, _GROUP, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5
_DOUBLE, _FLOAT = struct.Struct("<d"), struct.Struct("<f")
_OTHER_EVENT_KINDS = (3, 4, 6, 7, 8, 9)  # Event.what's members but summary
# Summary.Value.value's members but simple_value and tensor.
_OTHER_VALUE_KINDS = {3: "obsolete_old_style_histogram", 4: "image",
                      5: "histo", 6: "audio"}


@dataclasses.dataclass
class Tensor:
  """The fields of a `TensorProto` a number can be in."""
  dtype: int = 0
  shape: list[int] = dataclasses.field(default_factory=list)
  tensor_content: bytes = b""
  float_val: list[float] = dataclasses.field(default_factory=list)
  double_val: list[float] = dataclasses.field(default_factory=list)
  int_val: list[int] = dataclasses.field(default_factory=list)
  int64_val: list[int] = dataclasses.field(default_factory=list)
  bool_val: list[bool] = dataclasses.field(default_factory=list)
  half_val: list[int] = dataclasses.field(default_factory=list)
  uint32_val: list[int] = dataclasses.field(default_factory=list)
  uint64_val: list[int] = dataclasses.field(default_factory=list)
  float8_val: bytes = b""


@dataclasses.dataclass
class Value:
  """A `Summary.Value`: its tag and which member of `value` it holds."""
  tag: str = ""
  kind: Optional[str] = None  # As protobuf's WhichOneof("value").
  simple_value: float = 0.0
  tensor: Optional[Tensor] = None


@dataclasses.dataclass
class Event:
  """An `Event`; `summary` is None when it holds none (a file_version...)."""
  wall_time: float = 0.0
  step: int = 0
  summary: Optional[list[Value]] = None


# --- decoding ----------------------------------------------------------------

def decode_event(data: bytes) -> Event:
  """An `Event` from a record's bytes.

  Raises:
    ValueError: the bytes are not a well-formed `Event` (in the fields
      read; other messages are not parsed).
  """
  try:
    return _event(data)
  except IndexError:  # A varint running past the end.
    raise ValueError("truncated varint") from None


def _signed(value: int, bits: int = 64) -> int:
  value &= (1 << bits) - 1
  return value - (1 << bits) if value >> (bits - 1) else value


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, int or bytes) of a message; groups skipped."""
  i, n = 0, len(buf)
  while i < n:
    tag = buf[i]  # One byte for fields 1-15: no call (a third of the time).
    if tag < 0x80:
      i += 1
    else:
      tag, i = varint(buf, i)
    number, wire = tag >> 3, tag & 7
    if number == 0 or number >= 1 << 29:
      raise ValueError(f"field number {number}")
    value: Any
    if wire == _BYTES:
      size = buf[i]
      if size < 0x80:
        i += 1
      else:
        size, i = varint(buf, i)
    elif wire == _FIXED64 or wire == _FIXED32:
      size = 8 if wire == _FIXED64 else 4
    elif wire == _VARINT:
      value, i = varint(buf, i)
      yield number, wire, value
      continue
    elif wire == _GROUP:
      i = _group_end(buf, i, number)
      continue
    else:
      raise ValueError(f"wire type {wire} of field {number}")
    if i + size > n:
      raise ValueError("truncated field")
    yield number, wire, buf[i:i + size]
    i += size


def _group_end(buf: bytes, i: int, number: int) -> int:
  """Where the group `number` starting at buf[i] ends, its end tag past."""
  while True:
    tag, i = varint(buf, i)
    wire = tag & 7
    if wire == _VARINT:
      i = varint(buf, i)[1]
    elif wire in (_FIXED64, _FIXED32):
      i += 8 if wire == _FIXED64 else 4
    elif wire == _BYTES:
      size, i = varint(buf, i)
      i += size
    elif wire == _GROUP:
      i = _group_end(buf, i, tag >> 3)
    elif wire == _GROUP_END and tag >> 3 == number:
      return i
    else:
      raise ValueError(f"wire type {wire} of field {tag >> 3} in a group")
    if i > len(buf):
      raise ValueError("truncated group")


def _text(data: bytes) -> str:
  return data.decode("utf-8")  # UnicodeDecodeError is a ValueError.


def _event(buf: bytes) -> Event:
  event = Event()
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _FIXED64:
      event.wall_time = _DOUBLE.unpack(value)[0]
    elif number == 2 and wire == _VARINT:
      event.step = _signed(value)
    elif number == 5 and wire == _BYTES:
      if event.summary is None:
        event.summary = []
      event.summary += [_value(data) for n, w, data in _fields(value)
                        if n == 1 and w == _BYTES]
    elif number in _OTHER_EVENT_KINDS and wire == _BYTES:
      if number == 3:
        _text(value)
      event.summary = None
  return event


def _value(buf: bytes) -> Value:
  result = Value()
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _BYTES:
      result.tag = _text(value)
    elif number == 2 and wire == _FIXED32:
      result.kind, result.tensor = "simple_value", None
      result.simple_value = _FLOAT.unpack(value)[0]
    elif number == 8 and wire == _BYTES:
      if result.tensor is None:
        result.kind, result.tensor = "tensor", Tensor()
      _merge_tensor(result.tensor, value)
    elif number in _OTHER_VALUE_KINDS and wire == _BYTES:
      result.kind, result.tensor = _OTHER_VALUE_KINDS[number], None
  return result


def _int32(value: int) -> int:
  return _signed(value, 32)


def _uint32(value: int) -> int:
  return value & 0xffffffff


# TensorProto's repeated numbers: field -> (attribute, decoding of a varint,
# or the struct of a fixed-size element).
_REPEATED: dict[int, tuple[str, Any]] = {
    5: ("float_val", _FLOAT), 6: ("double_val", _DOUBLE),
    7: ("int_val", _int32), 10: ("int64_val", _signed), 11: ("bool_val", bool),
    13: ("half_val", _int32), 16: ("uint32_val", _uint32),
    17: ("uint64_val", int)}


def _merge_tensor(tensor: Tensor, buf: bytes) -> None:
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _VARINT:
      tensor.dtype = _signed(value, 32)
    elif number == 2 and wire == _BYTES:
      tensor.shape += [_dim_size(dim) for n, w, dim in _fields(value)
                       if n == 2 and w == _BYTES]
    elif number == 4 and wire == _BYTES:
      tensor.tensor_content = value
    elif number == 18 and wire == _BYTES:
      tensor.float8_val = value
    elif number in _REPEATED:
      name, element = _REPEATED[number]
      getattr(tensor, name).extend(_repeated(element, wire, value))


def _repeated(element: Any, wire: int, value: Any) -> list:
  """The elements of one repeated field's occurrence, packed or not."""
  if isinstance(element, struct.Struct):
    if wire == (_FIXED32 if element.size == 4 else _FIXED64):
      return [element.unpack(value)[0]]
    if wire != _BYTES:
      return []  # Another wire type: an unknown field.
    if len(value) % element.size:
      raise ValueError("packed field of a broken length")
    return [v for (v,) in element.iter_unpack(value)]
  if wire == _VARINT:
    return [element(value)]
  if wire != _BYTES:
    return []
  values, i = [], 0
  while i < len(value):
    number, i = varint(value, i)
    values.append(element(number))
  if i != len(value):
    raise ValueError("packed varints overrun their field")
  return values


def _dim_size(buf: bytes) -> int:
  size = 0
  for number, wire, value in _fields(buf):
    if number == 1 and wire == _VARINT:
      size = _signed(value)
    elif number == 2 and wire == _BYTES:
      _text(value)
  return size


# --- numbers -----------------------------------------------------------------

_BITS = {"float16": "half_val", "bfloat16": "half_val"}
_VALUE_FIELDS = {"float32": "float_val", "float64": "double_val",
                 "int64": "int64_val", "uint32": "uint32_val",
                 "uint64": "uint64_val"}
_NUMERIC_PREFIXES = ("float", "bfloat", "int", "uint")


def is_numeric(dtype: int) -> bool:
  """Whether a dtype enum is a float or an integer (TF's `is_floating` or
  `is_integer`: not bool, complex or quantized)."""
  row = tf_dtypes.TABLE.get(dtype)
  return row is not None and row[0].startswith(_NUMERIC_PREFIXES)


def scalar(tensor: Tensor) -> float:
  """The number of a 0-d numeric tensor, as `tf.make_ndarray(t).item()`.

  Raises:
    ValueError: the tensor holds more than one number, a number out of its
      dtype's range, or a dtype this ml_dtypes does not have.
  """
  try:
    dtype = tf_dtypes.dtype_of(tensor.dtype).numpy
  except AveragingError as e:
    raise ValueError(str(e)) from None
  if dtype is None or not is_numeric(tensor.dtype):
    raise ValueError(f"dtype enum {tensor.dtype} is not a number")
  if tensor.tensor_content:
    values = np.frombuffer(tensor.tensor_content, dtype=np.uint8)
  else:
    values = _values(tensor, dtype)
  if values.dtype != dtype:
    if values.nbytes % dtype.itemsize:
      raise ValueError(f"{values.nbytes} bytes of {dtype}")
    values = values.view(dtype)
  if values.size > 1:
    raise ValueError(f"{values.size} values in a 0-d tensor")
  return float(values[0]) if values.size else 0.0


def _values(tensor: Tensor, dtype: np.dtype) -> np.ndarray:
  """The numbers of a tensor without `tensor_content`, as TF reads them."""
  name = tf_dtypes.TABLE[tensor.dtype][0]
  try:
    if name in _BITS:
      return np.fromiter(tensor.half_val, dtype=np.uint16)
    if dtype.itemsize == 1 and name.startswith("float"):
      return np.frombuffer(tensor.float8_val, dtype=np.uint8)
    field = _VALUE_FIELDS.get(name, "int_val")
    return np.fromiter(getattr(tensor, field), dtype=dtype)
  except OverflowError as e:
    raise ValueError(str(e)) from None


# --- encoding ----------------------------------------------------------------

def _bytes_field(number: int, data: bytes) -> bytes:
  return put_varint(number << 3 | _BYTES) + put_varint(len(data)) + data


def encode_event(wall_time: float, step: int = 0, file_version: str = "",
                 scalars: Optional[Sequence[tuple[str, float]]] = None
                 ) -> bytes:
  """An `Event`'s bytes, as `SerializeToString` gives them.

  Args:
    wall_time: seconds since the epoch.
    step: the global step.
    file_version: e.g. `FILE_VERSION`, for a file's first event.
    scalars: (tag, value) pairs, each a `simple_value` (float32) of one
      summary; None for no summary.
  """
  out = b""
  if _DOUBLE.pack(wall_time) != bytes(8):  # -0.0 is written, as protobuf.
    out += bytes([1 << 3 | _FIXED64]) + _DOUBLE.pack(wall_time)
  if step:
    out += put_varint(2 << 3) + put_varint(step)
  if file_version:
    out += _bytes_field(3, file_version.encode("utf-8"))
  if scalars is not None:
    out += _bytes_field(5, b"".join(
        _bytes_field(1, (_bytes_field(1, tag.encode("utf-8")) if tag else b"")
                     + bytes([2 << 3 | _FIXED32]) + _float32(value))
        for tag, value in scalars))
  return out


def _float32(value: float) -> bytes:
  """A float field's 4 bytes; out of float32's range: inf, as protobuf."""
  with np.errstate(over="ignore"):
    return np.array(value, dtype="<f4").tobytes()


def masked_crc(data: bytes) -> int:
  """The masked CRC32C a TFRecord stores of `data`."""
  return crc.masked(crc.crc32c(data))


def frame(data: bytes) -> bytes:
  """`data` as one TFRecord."""
  length = struct.pack("<Q", len(data))
  return (length + FOOTER.pack(masked_crc(length)) + data +
          FOOTER.pack(masked_crc(data)))
