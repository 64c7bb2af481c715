"""TensorFlow checkpoints: V2 bundles read and written directly, V1 through TF's reader.

A V2 checkpoint is `<prefix>.index`, a LevelDB-style table mapping each
tensor name to a `BundleEntryProto` (dtype, shape, shard, offset, size,
masked crc32c), and `<prefix>.data-NNNNN-of-MMMMM` files holding the tensors'
raw bytes. A partitioned variable (TF1 partitioners, `ShardedVariable`,
`MaxShardSizePolicy`) has a full entry listing its slices and no data, and an
entry per slice under `EncodeTensorNameSlice(name, slice)`. Reading and
writing these bytes directly, in chunks, is what lets the engine average a
tensor of any size, sliced or not, of any dtype, in a few megabytes: TF's own
reader returns whole tensors only, and refuses sliced float16, uint16/32/64,
string and float8 variables ("Dtype half not supported").

Strings and variants are stored with their own length checksums; they are
only ever copied, bytes and stored crc together, which keeps them valid.
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Any, NamedTuple, Optional
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from t2t_avg.files import crc
from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.files import tf_loader
from t2t_avg.errors import ArgumentError, AveragingError, Phrase, error_text
from t2t_avg.formats import base
from t2t_avg.formats import detect
from t2t_avg.formats import tf_protos
from t2t_avg.formats.tf_dtypes import dtype_enum, dtype_of

INDEX_SUFFIX = ".index"
GLOBAL_STEP = "global_step"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
# A Keras 3 LossScaleOptimizer (mixed_float16) keeps the real count in its
# inner optimizer; its own `_iterations` stays 0.
STEP_KEYS = (GLOBAL_STEP,) + tuple(
    f"optimizer/{inner}{counter}{_VALUE}" for inner in ("inner_optimizer/", "")
    for counter in ("iter", "_iterations"))
_MAGIC = 0xdb4775248b80fb57
_FOOTER_BYTES = 48
_NO_COMPRESSION = 0
# The table writer puts at most this many entries in a block (TF: 256 KiB).
_BLOCK_ENTRIES = 4096


# --- slice keys (TF's OrderedCode, saved_tensor_slice_util.cc) ----------------

_SIGNED_HEADERS = ((0, 0), (0x80, 0), (0xc0, 0), (0xe0, 0), (0xf0, 0),
                   (0xf8, 0), (0xfc, 0), (0xfe, 0), (0xff, 0), (0xff, 0x80),
                   (0xff, 0xc0))


def _num_increasing(value: int) -> bytes:
  data = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
  return bytes([len(data)]) + data


def _signed_num_increasing(value: int) -> bytes:
  magnitude = ~value if value < 0 else value
  if magnitude < 64:
    return bytes([(0x80 ^ value) & 0xff])
  length = next(n for n in range(2, 11) if magnitude < 1 << (7 * n - 1))
  data = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big"))
  if value < 0:
    data[0] = data[1] = 0xff
  data = data[10 - length:]
  data[0] ^= _SIGNED_HEADERS[length][0]
  data[1] ^= _SIGNED_HEADERS[length][1]
  return bytes(data)


def slice_key(name: bytes, extents: Sequence[base.Extent]) -> bytes:
  """`EncodeTensorNameSlice`: where a slice of `name` is stored."""
  escaped = bytearray()
  for byte in name:
    escaped += {0: b"\x00\xff", 0xff: b"\xff\x00"}.get(byte, bytes([byte]))
  key = _num_increasing(0) + bytes(escaped) + b"\x00\x01"
  key += _num_increasing(len(extents))
  for start, length in extents:
    key += _signed_num_increasing(start) + _signed_num_increasing(length)
  return key


# --- reading the index table -------------------------------------------------

_varint = tf_protos.varint


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
  restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
  end = len(block) - 4 - 4 * restarts
  i, key = 0, b""
  while i < end:
    # Three varints; one byte each in almost every entry.
    shared, unshared, length = block[i], block[i + 1], block[i + 2]
    if shared | unshared | length < 0x80:
      i += 3
    else:
      shared, i = _varint(block, i)
      unshared, i = _varint(block, i)
      length, i = _varint(block, i)
    key = key[:shared] + block[i:i + unshared]
    i += unshared
    yield key, block[i:i + length]
    i += length


class _Corrupted(Exception):
  """An index block fails its checksum."""


def _read_block(table: bytes, handle: bytes) -> bytes:
  offset, i = _varint(handle, 0)
  size, _ = _varint(handle, i)
  block = table[offset:offset + size + 1]  # With its compression type.
  stored = struct.unpack_from("<I", table, offset + size + 1)[0]
  if crc.masked(crc.crc32c(block)) != stored:
    raise _Corrupted(f"block at byte {offset}")
  if block[-1] != _NO_COMPRESSION:
    raise ValueError("compressed index block")
  return block[:-1]


def _table_entries(table: bytes) -> Iterator[tuple[bytes, bytes]]:
  if len(table) < _FOOTER_BYTES or struct.unpack_from(
      "<Q", table, len(table) - 8)[0] != _MAGIC:
    raise ValueError("no table footer")
  footer = table[-_FOOTER_BYTES:]
  _, i = _varint(footer, 0)
  _, i = _varint(footer, i)  # The metaindex handle, unused.
  for _, handle in _block_entries(_read_block(table, footer[i:])):
    yield from _block_entries(_read_block(table, handle))


class _Entry(NamedTuple):
  """The fields of a `BundleEntryProto` the engine uses."""
  dtype: int
  shape: tuple[int, ...]
  shard: int
  offset: int
  size: int
  crc: int
  slices: tuple[tf_protos.Extents, ...]  # () for a plain tensor


def _decode_entry(value: bytes) -> _Entry:
  """A `BundleEntryProto`, decoded by hand for speed in the common case.

  Plain entries (dtype, shape, shard, offset, size, crc) are decoded here;
  anything else (slices, unknown fields) by `tf_protos`. A
  checkpoint of many small tensors has hundreds of thousands of entries.
  """
  fields = [0, 0, 0, 0, 0, 0]  # By field number - 1 (shape stays unused).
  shape: tuple[int, ...] = ()
  i, n = 0, len(value)
  while i < n:
    tag = value[i]
    if tag == 0x35:  # crc32c, fixed32
      fields[5] = int.from_bytes(value[i + 1:i + 5], "little")
      i += 5
      continue
    if tag not in _VARINT_TAGS:
      return _from_proto(value)
    number = value[i + 1]
    if number < 0x80:
      i += 2
    else:
      number, i = _varint(value, i + 1)
    if tag == 0x12:
      shape = _decode_shape(value, i, i + number)
      i += number
    else:
      fields[(tag >> 3) - 1] = number
  dtype, _, shard, offset, size, crc = fields
  return _Entry(dtype, shape, shard, offset, size, crc, ())


# dtype, shape (length-delimited), shard_id, offset, size.
_VARINT_TAGS = frozenset((0x08, 0x12, 0x18, 0x20, 0x28))


def _decode_shape(value: bytes, i: int, end: int) -> tuple[int, ...]:
  """The dim sizes of a `TensorShapeProto` at value[i:end]."""
  dims = []
  while i < end:
    if value[i] != 0x12:  # unknown_rank, or anything but a dim
      raise ValueError("unexpected TensorShapeProto field")
    if value[i + 1] == 2 and value[i + 2] == 0x08 and value[i + 3] < 0x80:
      dims.append(value[i + 3])  # A one-byte size, the common case.
      i += 4
      continue
    length, i = _varint(value, i + 1)
    dim, dim_end = 0, i + length
    while i < dim_end:
      tag = value[i]
      number, i = _varint(value, i + 1)
      if tag == 0x08:
        dim = number
      elif tag == 0x12:  # a dim's name: skipped
        i += number
      else:
        raise ValueError("unexpected TensorShapeProto.Dim field")
    dims.append(dim)
  return tuple(dims)


def _from_proto(value: bytes) -> _Entry:
  entry = tf_protos.decode_entry(value)
  return _Entry(entry.dtype, entry.shape, entry.shard_id, entry.offset,
                entry.size, entry.crc32c, entry.slices)


def _parse_index(table: bytes) -> Optional[tuple[
    tf_protos.Header, dict[bytes, _Entry]]]:
  """The header and entries of an index, or None for a layout we do not read.

  None means compressed blocks, a big-endian bundle or anything unexpected:
  TF's reader then reads the checkpoint.
  """
  header, entries = None, {}
  try:
    for key, value in _table_entries(table):
      if key:
        entries[key] = _decode_entry(value)
      else:
        header = tf_protos.decode_header(value)
  except (IndexError, ValueError, struct.error):
    return None
  if header is None or header.endianness != tf_protos.LITTLE:
    return None
  return header, entries


def data_file(prefix: str, shard: int, shards: int) -> str:
  """The name of one data shard of a V2 checkpoint."""
  return f"{prefix}.data-{shard:05d}-of-{shards:05d}"


Entries = dict[bytes, _Entry]


def _tensors_of(prefix: str, header: tf_protos.Header,
                entries: Entries) -> dict[str, base.Tensor]:
  """{name: Tensor} from parsed index entries: slices joined to their tensor."""
  files = [data_file(prefix, shard, header.num_shards)
           for shard in range(header.num_shards)]
  sliced = {key: _slices(prefix, files, key, entry, entries)
            for key, entry in entries.items() if entry.slices}
  slice_keys = {part.key for parts in sliced.values() for part in parts}
  result = {}
  for key, entry in entries.items():
    if key in slice_keys:
      continue
    parts = sliced.get(key) or (_part(files, key, entry, None),)
    name = _tensor_name(prefix, key)
    result[name] = base.Tensor(name, _dtype(prefix + INDEX_SUFFIX, name,
                                            entry.dtype),
                               entry.shape, parts)
  return result


def _tensor_name(prefix: str, key: bytes) -> str:
  try:
    return key.decode("utf-8")
  except UnicodeDecodeError:
    raise AveragingError(_not_utf8(prefix, key)) from None


def _not_utf8(prefix: str, key: bytes) -> str:
  # Refused on opening: TF's reader, which checks an output before it is
  # published, cannot list such a name (nor `tf.train.list_variables`).
  return (f"checkpoint {prefix} has a tensor name that is not UTF-8, "
          f"{key!r}: TensorFlow cannot read it back by name")


def _dtype(file: str, name: str, enum: int) -> base.DType:
  """The dtype of a variable, or an AveragingError naming it and the file
  that records it (a V2 index, a V1 checkpoint)."""
  try:
    return dtype_of(enum)
  except AveragingError as e:
    raise AveragingError("cannot read variable {name} of checkpoint {file}: "
                         "{reason}", name=name, file=file, reason=e) from e


def _slices(prefix: str, files: list[str], key: bytes, entry: _Entry,
            entries: Entries) -> tuple[base.Part, ...]:
  """The parts of a sliced tensor, found by encoding each slice's key."""
  parts = []
  for extents in entry.slices:
    part_key = slice_key(key, extents)
    stored = entries.get(part_key)
    if stored is None:
      raise AveragingError(f"checkpoint {prefix} is corrupted: slice "
                           f"{extents} of {key.decode(errors='replace')} "
                           "has no entry")
    parts.append(_part(files, part_key, stored, extents))
  return tuple(parts)


def _part(files: list[str], key: bytes, entry: _Entry,
          extents: Optional[tuple[base.Extent, ...]]) -> base.Part:
  if entry.shard >= len(files):
    raise AveragingError(f"checkpoint index {files[0][:files[0].rindex('.data-')]}"
                         f"{INDEX_SUFFIX} is corrupted: {key!r} is in shard "
                         f"{entry.shard} of {len(files)}")
  return base.Part(key, extents, entry.shape, entry.size, files[entry.shard],
                   entry.offset, entry.crc)


# --- sources -----------------------------------------------------------------

class _TFSource(base.Source):
  """What every TF checkpoint source shares: its format and step tensors."""
  step_keys = STEP_KEYS
  _tensors: dict[str, base.Tensor]

  @property
  def format(self) -> base.Format:
    return FORMAT

  @property
  def adds_global_step(self) -> bool:  # type: ignore[override]
    # Legacy always wrote one into name-based (TF1) checkpoints.
    return OBJECT_GRAPH_KEY not in self._tensors

  def tensors(self) -> Mapping[str, base.Tensor]:
    return self._tensors


class BundleSource(_TFSource):
  """A V2 checkpoint whose index this module reads: every byte read directly."""

  def __init__(self, prefix: str, tensors: dict[str, base.Tensor]):
    super().__init__(prefix)
    self._tensors = tensors


class ReaderSource(_TFSource):
  """A checkpoint read through TF's `CheckpointReader`, one whole tensor at a time.

  For V1 checkpoints and V2 index layouts this module does not parse. Bytes
  are produced as a bundle would store them (strings with their length
  checksum), so the output is always a V2 bundle.
  """

  def __init__(self, prefix: str, reader: Any):
    super().__init__(prefix)
    self._reader = reader
    try:
      shapes = reader.get_variable_to_shape_map()
      dtypes = reader.get_variable_to_dtype_map()
    except UnicodeDecodeError as e:
      raise AveragingError(_not_utf8(prefix, e.object)) from None
    self._tensors = {}
    self._strings: dict[str, bytes] = {}
    for name, shape in shapes.items():
      dtype = _dtype(prefix, name, dtypes[name].as_datatype_enum)
      key = name.encode("utf-8", "surrogateescape")
      if dtype.numpy is None:  # Strings: small, encoded as a bundle would.
        data, stored_crc = _encode_strings(
            _read_whole(reader, prefix, name).reshape(-1))
        self._strings[name] = data
        part = base.Part(key, None, tuple(shape), len(data), crc=stored_crc)
      else:
        count = int(np.prod(shape, dtype=np.int64))
        part = base.Part(key, None, tuple(shape), count * dtype.numpy.itemsize)
      self._tensors[name] = base.Tensor(name, dtype, tuple(shape), (part,))
    # Each worker thread keeps the one whole tensor it is reading.
    self._current = threading.local()

  def read(self, part: base.Part, offset: int, out: memoryview) -> None:
    name = part.key.decode("utf-8", "surrogateescape")
    data = self._strings.get(name)
    if data is None:
      if getattr(self._current, "name", None) != name:
        value = _read_whole(self._reader, self.path, name)
        self._current.name = name
        self._current.data = np.ascontiguousarray(value).tobytes()
      data = self._current.data
    out[:] = data[offset:offset + len(out)]


def _read_whole(reader: Any, path: str, name: str) -> np.ndarray:
  try:
    with filesystem.tensorflow():  # TF's errors as OSError
      return np.asarray(reader.get_tensor(name))
  # A truncated data file (still being copied) raises IndexError.
  except (OSError, ValueError, IndexError) as e:
    raise AveragingError(f"cannot read variable {name} from checkpoint {path}: "
                         f"{error_text(e)}") from e


def _encode_strings(values: np.ndarray) -> tuple[bytes, int]:
  """A string tensor as a bundle stores it, with the crc TF computes for it."""
  items = [v if isinstance(v, bytes) else str(v).encode() for v in values]
  lengths = b"".join(_put_varint(len(v)) for v in items)
  running = 0
  for v in items:
    running = crc.crc32c(struct.pack("<I" if len(v) <= 0xffffffff else "<Q",
                                     len(v)), running)
  checksum = struct.pack("<I", crc.masked(running))
  running = crc.crc32c(checksum, running)
  body = b"".join(items)
  return lengths + checksum + body, crc.masked(crc.crc32c(body, running))


def decode_elements(dtype: base.DType, data: bytes, count: int) -> list[bytes]:
  """The elements of a stored string or variant tensor (part), in order.

  A bundle stores `count` strings as their varint lengths, a 4-byte
  checksum of the lengths, then their bytes; variants as, per element, a
  varint length, the serialized `VariantTensorDataProto`, a 4-byte crc.

  Raises:
    ValueError: `data` is not `count` elements of `dtype` so stored.
  """
  items, i = [], 0
  if dtype.name == "string":
    lengths = []
    for _ in range(count):
      length, i = _varint(data, i)
      lengths.append(length)
    i += 4
    for length in lengths:
      items.append(data[i:i + length])
      i += length
  elif dtype.name == "variant":
    for _ in range(count):
      length, i = _varint(data, i)
      items.append(data[i:i + length])
      i += length + 4
  else:
    raise ValueError(f"{dtype.name} tensors have no element encoding")
  if i != len(data):
    raise ValueError(f"{len(data)} bytes do not hold {count} {dtype.name} "
                     "elements")
  return items


def is_v2(prefix: str) -> bool:
  """Whether a V2 checkpoint is at `prefix` (its `.index` exists)."""
  return filesystem.exists(prefix + INDEX_SUFFIX)


def is_v1(prefix: str) -> bool:
  """A V1 checkpoint: one file named as the prefix (or its shards)."""
  if not paths.is_local(prefix):
    return False
  if os.path.isfile(prefix):
    return True
  return bool(filesystem.glob(prefix + "-?????-of-?????"))


def open_source(prefix: str) -> base.Source:
  """A source for the checkpoint at `prefix` (V2, or V1 through TF's reader).

  Raises:
    AveragingError: it is incomplete or cannot be read.
  """
  if not is_v2(prefix):
    return ReaderSource(prefix, _load_reader(prefix))
  missing = missing_data_file(prefix)
  if missing:
    raise AveragingError(f"checkpoint {prefix} is incomplete: {missing} is "
                         "missing")
  index = prefix + INDEX_SUFFIX
  try:
    parsed = _parse_index(filesystem.read_bytes(index))
  except OSError as e:
    raise AveragingError(f"cannot read checkpoint {prefix}: "
                         f"{error_text(e)}") from e
  except _Corrupted as e:
    raise AveragingError(f"checkpoint {prefix} is corrupted: {index} fails "
                         f"its checksum ({e})") from e
  if parsed is None:
    return ReaderSource(prefix, _load_reader(prefix))
  return BundleSource(prefix, _tensors_of(prefix, *parsed))


def _load_reader(prefix: str) -> Any:
  try:
    with filesystem.tensorflow() as tf:
      return tf.train.load_checkpoint(prefix)
  except (OSError, ValueError) as e:
    raise AveragingError(f"cannot read checkpoint {prefix}: "
                         f"{error_text(e)}") from e


def read_in_full(prefix: str) -> Optional[str]:
  """None when TF's own reader reads every tensor of a checkpoint (one at a
  time, checksums verified); else why not."""
  try:
    with filesystem.tensorflow() as tf:
      reader = tf.train.load_checkpoint(prefix)
      for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)
  except (OSError, ValueError, IndexError) as e:
    return error_text(e)
  return None


def missing_data_file(prefix: str) -> Optional[str]:
  """The first missing `.data-*` shard of a V2 checkpoint, or None."""
  shards = {}
  for name in filesystem.glob(prefix + ".data-*"):
    tail = name[len(prefix) + len(".data-"):]
    if len(tail) == 14 and tail[5:9] == "-of-" and tail[:5].isdigit() and (
        tail[9:].isdigit()):
      shards[int(tail[:5])] = int(tail[9:])
  if not shards:
    return data_file(prefix, 0, 1)
  total = max(shards.values())
  for i in range(total):
    if i not in shards:
      return data_file(prefix, i, total)
  return None


# --- writing -----------------------------------------------------------------

class BundleSink(base.PositionedSink):
  """Writes a one-shard V2 bundle whose layout is fixed before any byte is.

  Every part gets its place in the data file from the sorted list of keys
  (TF1's order), so the same tensors give the same bytes whichever thread
  writes which part, in whatever order. Parts are written chunk by chunk at
  their place; `close` flushes the data, writes and flushes the index.
  """

  def __init__(self, prefix: str, tensors: Sequence[base.Tensor]):
    self.prefix = prefix
    self._tensors = list(tensors)
    places: dict[bytes, base.Extent] = {}
    offset = 0
    for part in sorted((p for t in tensors for p in t.parts),
                       key=lambda p: p.key):
      places[part.key] = (offset, part.size)
      offset += part.size
    super().__init__(base.OutputFile(self.data_path, size=offset), places,
                     checksums=True)

  @property
  def data_path(self) -> str:
    return data_file(self.prefix, 0, 1)

  @property
  def index_path(self) -> str:
    return self.prefix + INDEX_SUFFIX

  def close(self) -> None:
    """Flushes the data file, then writes and flushes the index."""
    self.close_data()
    with open(self.index_path, "xb") as f:
      f.write(_table(self._index_entries()))
      f.flush()
      os.fsync(f.fileno())

  def verify(self) -> None:
    verify_readable(self.prefix, self._tensors)

  def publication(self, output: str) -> list[tuple[str, str]]:
    return [(self.data_path, data_file(output, 0, 1)),
            (self.index_path, output + INDEX_SUFFIX)]

  def _index_entries(self) -> list[tuple[bytes, bytes]]:
    header = tf_protos.Header(num_shards=1, endianness=tf_protos.LITTLE,
                              producer=1)
    entries = {}
    for tensor in self._tensors:
      enum = dtype_enum(tensor.dtype)
      for part in tensor.parts:
        offset, crc32c = self.offset_and_crc(part.key)
        entries[part.key] = tf_protos.Entry(
            enum, tuple(part.shape), offset=offset, size=part.size,
            crc32c=crc32c)
      if tensor.parts[0].extents is not None:
        entries[tensor.name.encode("utf-8", "surrogateescape")] = (
            tf_protos.Entry(enum, tuple(tensor.shape), slices=tuple(
                tuple(part.extents or ()) for part in tensor.parts)))
    return [(b"", tf_protos.encode_header(header))] + [
        (key, tf_protos.encode_entry(entries[key])) for key in sorted(entries)]


_put_varint = tf_protos.put_varint


def _block(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
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


def _table(entries: Sequence[tuple[bytes, bytes]]) -> bytes:
  """A LevelDB-format table of sorted (key, value) pairs."""
  out = bytearray()

  def put_block(block: bytes) -> bytes:
    handle = _put_varint(len(out)) + _put_varint(len(block))
    trailer = bytes([_NO_COMPRESSION])
    out.extend(block + trailer +
               struct.pack("<I", crc.masked(crc.crc32c(block + trailer))))
    return handle

  index = []
  for start in range(0, len(entries), _BLOCK_ENTRIES):
    chunk = entries[start:start + _BLOCK_ENTRIES]
    index.append((chunk[-1][0], put_block(_block(chunk))))
  meta_handle = put_block(_block([]))
  index_handle = put_block(_block(index))
  footer = meta_handle + index_handle
  footer += b"\0" * (_FOOTER_BYTES - 8 - len(footer))
  out += footer + struct.pack("<Q", _MAGIC)
  return bytes(out)


def verify_readable(prefix: str, tensors: Sequence[base.Tensor]) -> None:
  """Checks that TF's own reader opens a written bundle and lists every tensor.

  Raises:
    AveragingError: it does not (nothing is published then).
  """
  try:
    shapes = tf_loader.checkpoint_reader(prefix).get_variable_to_shape_map()
  except tf_loader.ReaderError as e:
    raise AveragingError(f"internal error: TF cannot read the output written "
                         f"at {prefix}: {error_text(e)}") from e
  expected = {t.name: list(t.shape) for t in tensors}
  found = {name: list(shape) for name, shape in shapes.items()}
  if found != expected:
    missing = sorted(set(expected) - set(found))[:3]
    raise AveragingError(f"internal error: TF reads the output at {prefix} "
                         f"with other tensors than written (missing: "
                         f"{missing})")


class TFFormat(base.Format):
  """TF checkpoints: `<prefix>.index` and `.data-*` files, V1 read too."""

  name = "TF checkpoint"
  has_state_file = True
  checked_by_tensorflow = True

  def state_not_weights(self, names: Sequence[str]) -> dict[str, str]:
    # Hash tables save their keys and values as `<table>-keys`/`-values`
    # (TF1) or `.ATTRIBUTES/table-keys`/`table-values` (TF2): buckets, not
    # weights, even when the values are floats.
    present = set(names)
    tables = {}
    for name in names:
      if name.endswith("-values") and name[:-len("values")] + "keys" in (
          present):
        tables[name] = "hash table values"
    return tables

  def check_output_path(self, output_path: str,
                        taken: Optional[Phrase] = None) -> None:
    """Refuses a Keras name: Keras would not load the `<name>-<step>.index`
    and `.data-*` files written under it."""
    suffix = next((s for s in detect.KERAS_SUFFIXES
                   if output_path.endswith(s)), None)
    if suffix is None:
      return
    raise ArgumentError(
        "{output_path} {path!r} ends in {suffix}, a Keras name, but the "
        "inputs are TF checkpoints" + (" ({taken})" if taken else "") +
        ": the output would be TF files {path}-<step>.index and .data-*, "
        "which Keras does not load; choose a TF prefix (e.g. {example})",
        path=output_path, suffix=suffix, taken=taken,
        example=output_path[:-len(suffix)])

  def output_name(self, output_path: str, step: int) -> str:
    return f"{output_path}-{step}"

  def files(self, output: str) -> list[str]:
    return [output + INDEX_SUFFIX] + sorted(filesystem.glob(output + ".data-*"))

  def exists(self, output: str) -> bool:
    return is_v2(output) or is_v1(output)

  def make_sink(self, temporary: str, tensors: Sequence[base.Tensor],
                newest: base.Source) -> base.Sink:
    del newest  # TF checkpoints carry no metadata beside their tensors.
    if paths.is_local(temporary):
      tf_loader.preload_reader()  # For `verify_readable`, while we average.
    return BundleSink(temporary, tensors)


FORMAT = TFFormat()
