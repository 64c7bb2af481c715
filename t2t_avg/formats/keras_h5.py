"""Keras weights in HDF5 (`.weights.h5`, `.keras`; Keras 2 `.h5`), read in place, written in chunks.

A Keras 3 weights file is HDF5: groups `layers/<class>[_N]/vars`,
`optimizer/vars`, `vars` (nested models nest `layers/`), holding datasets
`0`, `1`, ... A Keras 2 (tf_keras, legacy) `.h5` file has root attributes
`layer_names`, `backend`, `keras_version` and a group per layer whose
`weight_names` attribute lists its datasets (`dense/dense/kernel:0`); a
full model (`model.save("m.h5")`) holds those in `model_weights/`, its
optimizer's in `optimizer_weights/`, and its `model_config` and
`training_config` as root attributes. Which Keras wrote a file is read from
its root group. Tensor names here are the datasets' paths
(`layers/dense/vars/0`). Keras writes every dataset contiguous and
uncompressed, so its bytes are one run of the file at the offset HDF5
reports: they are read with positioned reads, in chunks, as TF bundles are
(inside a `.keras` file, see `keras_zip`). A dataset stored otherwise
(chunked, compressed, compact) is read through h5py slices.

bfloat16 (Keras' pure `bfloat16` policy) is stored as 2-byte opaque data
marked by a `dtype="bfloat16"` attribute; it is averaged as bfloat16 and
written back the same way. tf_keras stores bfloat16 as 2-byte opaque data
with no mark: in a Keras 2 file that can only be bfloat16 (TF's one 2-byte
type numpy has no kind for), so it is read as bfloat16.

The output is a new HDF5 file whose layout is fixed before any data byte is
written: every group, attribute and dataset of the newest input (a Keras 2
model's `optimizer_weights/` left out when none of its datasets is), in
name order, datasets contiguous and allocated at creation, with h5py's default
(earliest) file format, which stores no times. The parts' bytes are then
written at their datasets' offsets, so the same inputs give the same bytes
whichever thread writes what. A `.keras` output is the zip of that file
with the newest input's other members, the data written in place inside it
(`keras_zip.ArchiveWriter`).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import struct
import threading
import weakref
from typing import Any, Optional
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from t2t_avg.errors import ArgumentError, AveragingError, Phrase, error_text
from t2t_avg.files import crc32
from t2t_avg.formats import base
from t2t_avg.formats import detect
from t2t_avg.formats import extra_dtypes
from t2t_avg.formats import keras_zip

WEIGHTS_SUFFIX, ARCHIVE_SUFFIX = detect.KERAS_SUFFIXES
# The real iteration count first: under mixed_float16 Keras wraps the
# optimizer in a LossScaleOptimizer whose own counter (`optimizer/vars/0`)
# stays 0; the inner optimizer's is `optimizer/inner_optimizer/vars/0`.
STEP_KEYS = ("optimizer/inner_optimizer/vars/0", "optimizer/vars/0")
# Top-level groups of Keras 3 weights (`_layer_checkpoint_dependencies`: 2.13).
_KERAS3_GROUPS = ("layers", "optimizer", "vars",
                  "_layer_checkpoint_dependencies")
# Root attributes of Keras 2 (legacy) `.h5` models and weights.
_LEGACY_ATTRS = ("keras_version", "model_config", "layer_names", "backend")
# A Keras 2 full model's groups: the weights, and what `load_model` restores
# into the optimizer only when the group is there.
KERAS2_MODEL_WEIGHTS, KERAS2_OPTIMIZER = "model_weights", "optimizer_weights"
# Keras 2 optimizers' iteration counters, by dataset name: `iteration:0`
# (tf_keras' optimizers), `<name>/iter:0` (its legacy ones), `iteration`
# (Keras 3 saving to `.h5`).
_KERAS2_COUNTERS = ("iteration", "iter")
_DTYPE_ATTR = "dtype"  # Marks ml_dtypes data (bfloat16) stored as opaque.
_MAX_DEPTH = 64


class _Window(io.RawIOBase):
  """A read-only file over `size` bytes from `offset` of a file (for h5py)."""

  def __init__(self, path: str, offset: int, size: int):
    super().__init__()
    self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    self._offset, self._size, self._position = offset, size, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
    start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position,
             io.SEEK_END: self._size}[whence]
    self._position = start + position
    return self._position

  def tell(self) -> int:
    return self._position

  def readinto(self, buffer: Any) -> int:
    count = max(0, min(len(buffer), self._size - self._position))
    data = os.pread(self._fd, count, self._offset + self._position)
    buffer[:len(data)] = data
    self._position += len(data)
    return len(data)

  def close(self) -> None:
    if not self.closed:
      os.close(self._fd)
    super().close()


# --- reading -----------------------------------------------------------------

def _superblock_end(path: str, offset: int) -> Optional[tuple[int, int]]:
  """(base address, end-of-file address) from an HDF5 superblock, or None."""
  with open(path, "rb") as f:
    f.seek(offset)
    head = f.read(64)
  if len(head) < 16 or not head.startswith(detect.HDF5_SIGNATURE):
    return None
  version = head[8]
  if version in (0, 1):
    width, start = head[13], 24 + (4 if version == 1 else 0)
  elif version in (2, 3):
    width, start = head[9], 12
  else:
    return None
  if width not in (4, 8) or len(head) < start + 3 * width:
    return None
  fmt = "<I" if width == 4 else "<Q"
  base_address = struct.unpack_from(fmt, head, start)[0]
  end = struct.unpack_from(fmt, head, start + 2 * width)[0]
  return base_address, end


def _check_complete(path: str, offset: int, size: int, label: str) -> None:
  """Refuses an HDF5 image whose superblock gives another size: truncated,
  or still being written (HDF5 writes the real end when it closes a file)."""
  found = _superblock_end(path, offset)
  if found is None:
    return  # h5py says what is wrong when it opens it.
  base_address, end = found
  if size in (end, end - base_address, end + offset):
    return
  state = ("truncated" if size < end else
           "incomplete (still being written?)")
  raise AveragingError(f"{label} is {state}: its HDF5 superblock says it "
                       f"ends at byte {end}, but it has {size} bytes")


def open_hdf5(path: str, offset: int, size: int, label: str) -> h5py.File:
  """h5py over `size` bytes from `offset` of `path`, read-only, unlocked.

  Unlocked: a trainer must stay free to write its next file while an
  average is being made.

  Raises:
    AveragingError: naming `label`, when it is not a complete HDF5 file.
  """
  _check_complete(path, offset, size, label)
  try:
    if offset == 0 and size == os.path.getsize(path):
      return h5py.File(path, "r", locking=False)
    return h5py.File(_Window(path, offset, size), "r")
  except OSError as e:
    raise AveragingError(f"{label} is a truncated or damaged HDF5 file: "
                         f"{error_text(e)}") from e


def dtype_of(dataset: h5py.Dataset, where: str, *,
             unmarked_bfloat16: bool = False) -> base.DType:
  """The engine's view of a dataset's type (`unmarked_bfloat16`: 2-byte
  opaque data without a `dtype` attribute is bfloat16, as tf_keras writes it).

  Raises:
    AveragingError: a type that is not numbers of a fixed size.
  """
  dtype = dataset.dtype
  marked = dataset.attrs.get(_DTYPE_ATTR)
  if isinstance(marked, bytes):
    marked = marked.decode("utf-8", "replace")
  if unmarked_bfloat16 and dtype.kind == "V" and dtype.fields is None and (
      dtype.itemsize == 2 and marked is None):
    marked = "bfloat16"
  if (dtype.kind == "V" and dtype.fields is None and isinstance(marked, str)
      and marked.startswith(("bfloat16", "float8"))):
    looked_up = extra_dtypes.lookup(marked)
    if looked_up is None:
      raise AveragingError(f"{dataset.name}: {extra_dtypes.missing(marked)}")
    numpy = np.dtype(looked_up)
    if numpy.itemsize == dtype.itemsize:
      return base.DType(marked, base.Kind.FLOAT, numpy)
  kind = {"f": base.Kind.FLOAT, "c": base.Kind.COMPLEX}.get(
      dtype.kind, base.Kind.OTHER)
  if dtype.kind in "fciub" or (dtype.kind == "S" and dtype.itemsize):
    name = dtype.name if dtype.kind != "S" else f"bytes{dtype.itemsize}"
    if dtype.byteorder == ">":
      name += " (big-endian)"
    return base.DType(name, kind, dtype)
  raise AveragingError(f"{where}: dataset {dataset.name.lstrip('/')} holds "
                       f"{dtype} values; t2t_avg reads numbers only")


def _walk(group: h5py.Group, label: str, prefix: str = "",
          depth: int = 0) -> Iterator[tuple[str, object]]:
  """(path, group or dataset) below `group`, parents first, in name order.

  Raises:
    AveragingError: soft or external links (Keras refuses them too), named
      datatypes, or nesting too deep to be a model.
  """
  if depth > _MAX_DEPTH:
    raise AveragingError(f"{label}: groups nested deeper than {_MAX_DEPTH} "
                         f"at {prefix} (a cycle of hard links?)")
  for key in sorted(group.keys()):
    path = prefix + key
    link = group.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink):
      raise AveragingError(f"{label}: {path} is a {type(link).__name__}; "
                           "Keras weights hold plain groups and datasets")
    item = group[key]
    if isinstance(item, h5py.Dataset):
      yield path, item
    elif isinstance(item, h5py.Group):
      yield path, item
      yield from _walk(item, label, path + "/", depth + 1)
    else:
      raise AveragingError(f"{label}: {path} is a {type(item).__name__}, "
                           "not a group or dataset")


def _raw_offset(dataset: h5py.Dataset, size: int) -> Optional[int]:
  """The offset of a dataset's bytes when they are one uncompressed run."""
  if size == 0:
    return None
  plist = dataset.id.get_create_plist()
  if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or (
      plist.get_external_count()):
    return None
  offset = dataset.id.get_offset()
  if offset is None or dataset.id.get_storage_size() != size:
    return None
  return offset


def _tensor(name: str, dataset: h5py.Dataset, label: str, image: tuple[
    str, int, int], unmarked_bfloat16: bool) -> base.Tensor:
  """One dataset as a Tensor whose part points at its bytes, if it can."""
  if dataset.shape is None or dataset.is_virtual:
    state = "empty (no shape)" if dataset.shape is None else "virtual"
    raise AveragingError(f"{label}: dataset {name} is {state}")
  file, offset, size = image
  dtype = dtype_of(dataset, label, unmarked_bfloat16=unmarked_bfloat16)
  shape = tuple(int(d) for d in dataset.shape)
  nbytes = math.prod(shape) * dataset.dtype.itemsize
  where = _raw_offset(dataset, nbytes)
  key = name.encode("utf-8", "surrogateescape")
  if where is None:
    part = base.Part(key, None, shape, nbytes)
  else:
    if where + nbytes > size:
      raise AveragingError(f"{label} is truncated: dataset {name} ends past "
                           "its end")
    part = base.Part(key, None, shape, nbytes, file=file, offset=offset + where)
  return base.Tensor(name, dtype, shape, (part,))


def _read_flat(dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
  """Elements [start, stop) of a dataset in C order, reading whole rows only
  where they are small, so memory stays near the chunk asked for."""
  shape = dataset.shape
  if not shape:
    return np.asarray(dataset[()], dataset.dtype).reshape(1)
  return _read_block(dataset, (), shape, start, stop)


def _read_block(dataset: h5py.Dataset, index: tuple, shape: tuple, start: int,
                stop: int) -> np.ndarray:
  inner = math.prod(shape[1:])
  first, last = start // inner, -(-stop // inner)  # rows touched
  if len(shape) == 1 or (start % inner == 0 and stop % inner == 0) or (
      (last - first) * inner <= 2 * (stop - start)):
    rows = dataset[index + (slice(first, last),)].reshape(-1)
    return rows[start - first * inner:stop - first * inner]
  pieces = []
  row = first
  while row * inner < stop:
    lo, hi = max(start, row * inner), min(stop, (row + 1) * inner)
    pieces.append(_read_block(dataset, index + (row,), shape[1:],
                              lo - row * inner, hi - row * inner))
    row += 1
  return np.concatenate(pieces)


class KerasSource(base.Source):
  """A Keras weights file (Keras 3 `.weights.h5`, Keras 2 `.h5`), or the
  weights of a `.keras` file."""

  def __init__(self, path: str, fmt: Optional[KerasFormat],
               image: tuple[str, int, int],
               member: Optional[keras_zip.WeightsMember] = None, *,
               check_crc: bool = True):
    """Opens the HDF5 image (file, offset, size) of `path`.

    Args:
      path: the checkpoint's path, for messages and its name's number.
      fmt: what it must be; None: a Keras 3 or Keras 2 weights file, read
        from its root group.
      image: where its HDF5 bytes are.
      member: a `.keras` file's weights member, for `.keras` files.
      check_crc: add up the member's CRC-32 from what is read (see
        `check_integrity`); else only once `verify` asks for it.
    """
    super().__init__(path)
    self.member = member
    # A stored member's CRC-32, added up from what is read (check_integrity).
    self._pieces = crc32.Pieces(member.size) if (
        check_crc and member is not None and member.crc is not None) else None
    label = (path if member is None else
             f"{path} (its {keras_zip.WEIGHTS_MEMBER})")
    # An extracted member is removed on close, or when the source is lost.
    self._remove_extracted = weakref.finalize(
        self, _remove_quietly, member.extracted) if (
            member is not None and member.extracted) else None
    self.hdf5 = open_hdf5(*image, label)
    self._h5_lock = threading.Lock()
    try:
      self._format = _format_of(self.hdf5, path, fmt)
      keras2 = isinstance(self._format, Keras2Format)
      self._tensors = {
          name: _tensor(name, item, label, image, keras2)
          for name, item in _walk(self.hdf5, label)
          if isinstance(item, h5py.Dataset)}
    except (OSError, ValueError, KeyError, RuntimeError) as e:
      self.hdf5.close()
      raise AveragingError(f"{label} is a damaged HDF5 file: "
                           f"{error_text(e)}") from e
    except AveragingError:
      self.hdf5.close()
      raise
    self.step_keys = tuple(
        k for k in (_keras2_counters(self._tensors) if keras2 else STEP_KEYS)
        if k in self._tensors and self._tensors[k].is_integer_scalar)

  @property
  def format(self) -> base.Format:
    return self._format

  def tensors(self) -> dict[str, base.Tensor]:
    return self._tensors

  def verify(self) -> None:
    """Has a `.keras` file opened without its CRC-32 check
    (`open_path(check_crc=False)`, while listing) checked from what is read
    from now on (`check_integrity`); bytes read before are read again."""
    member = self.member
    if self._pieces is None and member is not None and member.crc is not None:
      self._pieces = crc32.Pieces(member.size)

  def read(self, part: base.Part, offset: int, out: memoryview) -> None:
    if part.file is not None:
      super().read(part, offset, out)
      if self._pieces is not None and self.member is not None:
        self._pieces.add(part.offset + offset - self.member.offset, out)
      return
    name = part.key.decode("utf-8", "surrogateescape")
    itemsize = self._tensors[name].element.itemsize
    first, last = offset // itemsize, -(-(offset + len(out)) // itemsize)
    try:
      with self._h5_lock:
        values = _read_flat(self.hdf5[name], first, last)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
      raise AveragingError(f"cannot read dataset {name} of {self.path}: "
                           f"{error_text(e)}") from e
    data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    skip = offset - first * itemsize
    np.frombuffer(out, np.uint8)[:] = data[skip:skip + len(out)]

  def check_integrity(self) -> None:
    """Checks a stored `.keras` member's CRC-32, once: the pieces read so
    far, combined with the bytes between them (HDF5 metadata, datasets
    nobody read), read now.

    Raises:
      AveragingError: it fails its CRC-32 (corrupted) or is truncated.
    """
    member, pieces = self.member, self._pieces
    if member is None or pieces is None:
      return
    whole = base.Part(b"", None, (), member.size, file=member.path,
                      offset=member.offset)

    def read(offset: int, length: int) -> bytes:
      data = bytearray(length)
      base.Source.read(self, whole, offset, memoryview(data))
      return bytes(data)

    if pieces.total(read) != member.crc:
      raise keras_zip.corrupted(self.path)
    # Checked: later averages of this source (continuous windows, greedy
    # candidates) neither add up nor check it again, as when it was checked
    # on opening.
    self._pieces = None

  def close(self) -> None:
    super().close()
    self.hdf5.close()
    if self._remove_extracted is not None:
      self._remove_extracted()


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def _format_of(h5: h5py.File, path: str,
               expected: Optional[KerasFormat]) -> KerasFormat:
  """The format an HDF5 file's root group says it is in.

  Raises:
    AveragingError: it is not Keras weights, or not of `expected`'s kind.
  """
  found: KerasFormat
  if KERAS2_MODEL_WEIGHTS in h5:
    found = KERAS2_MODEL_FORMAT
  elif any(a.startswith("layer_names") for a in h5.attrs):
    found = KERAS2_WEIGHTS_FORMAT  # (long lists: layer_names0, 1, ...)
  elif any(group in h5 for group in _KERAS3_GROUPS):
    found = WEIGHTS_FORMAT
  else:
    legacy = [a for a in _LEGACY_ATTRS if a in h5.attrs]
    if legacy:
      raise AveragingError(f"{path} is a Keras 2 HDF5 file ({legacy[0]}) "
                           "without weights (no layer_names attribute, no "
                           f"{KERAS2_MODEL_WEIGHTS} group)")
    top = ", ".join(sorted(h5.keys())[:5]) or "nothing"
    raise AveragingError(
        f"{path} is an HDF5 file but not Keras weights (no layers/, "
        f"optimizer/ or vars/ group at its root as Keras 3 writes, no "
        f"layer_names attribute as Keras 2 writes; it holds {top})")
  if expected is not None and expected.layout != found.layout:
    raise AveragingError(f"{path} holds {found.layout} weights, not "
                         f"{expected.layout} weights as a {expected.name} does")
  return expected or found


def _keras2_counters(tensors: dict[str, base.Tensor]) -> list[str]:
  """A Keras 2 file's optimizer iteration counters, the real count first:
  a mixed precision optimizer's own counter (Keras 3's
  `loss_scale_optimizer/iteration`) stays 0 while its inner one counts."""
  prefix = KERAS2_OPTIMIZER + "/"
  found = [name for name in tensors if name.startswith(prefix) and (
      name.rpartition("/")[2].removesuffix(":0") in _KERAS2_COUNTERS)]
  return sorted(found, key=lambda name: (
      "lossscale" in name.lower().replace("_", ""), name.count("/"), name))


def open_path(path: str, *, check_crc: bool = True,
              kind: Optional[str] = None) -> KerasSource:
  """A source for a `.weights.h5`, Keras 2 `.h5` or `.keras` file, told
  apart by content (`kind`: what `detect.kind_of` found, when the caller
  has asked it).

  A `.keras` file's weights are checked against their CRC-32 by
  `check_integrity`, once read (`check_crc`); when they do not open as
  HDF5, at once.

  Raises:
    AveragingError: it is none of them, or cannot be read (the message says
      what it is or what is wrong).
  """
  kind = kind or detect.kind_of(path)
  if kind == detect.KERAS_WEIGHTS:
    return KerasSource(path, None, (path, 0, os.path.getsize(path)))
  if kind == detect.KERAS_ARCHIVE:
    member = keras_zip.open_weights(path)
    try:
      return KerasSource(path, ARCHIVE_FORMAT,
                         (member.path, member.offset, member.size), member,
                         check_crc=check_crc)
    except AveragingError as e:
      if check_crc:  # A damaged HDF5 file may be a corrupted member.
        try:
          keras_zip.check_whole(path, member)
        except AveragingError as corrupted:
          raise corrupted from e
      raise
  raise AveragingError(f"{path} is not a Keras .weights.h5, .h5 or .keras "
                       "file")


# --- writing -----------------------------------------------------------------

def _copy_attrs(source: Any, target: Any) -> None:
  """Every attribute of an h5py object, its stored type kept, by name."""
  for key in sorted(source.attrs.keys()):
    target.attrs.create(key, source.attrs[key],
                        dtype=source.attrs.get_id(key).dtype)


def _create_dataset(parent: h5py.Group, leaf: str,
                    source: h5py.Dataset) -> h5py.Dataset:
  """A contiguous dataset of the source's type and shape, its space
  allocated now and never filled (every byte is written afterwards)."""
  plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
  plist.set_layout(h5py.h5d.CONTIGUOUS)
  plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
  plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
  plist.set_obj_track_times(False)
  shape = tuple(source.shape)
  space = (h5py.h5s.create(h5py.h5s.SCALAR) if not shape
           else h5py.h5s.create_simple(shape))
  dataset_id = h5py.h5d.create(parent.id, leaf.encode("utf-8"),
                               source.id.get_type(), space, dcpl=plist)
  return h5py.Dataset(dataset_id)


# HDF5's file drivers say "errno = 27, error message = 'File too large'".
_ERRNO = re.compile(r"\berrno = (\d+)")


@contextlib.contextmanager
def _file_system_errors(path: str) -> Iterator[None]:
  """HDF5's failures to write `path` as `OSError(errno, strerror, path)`.

  h5py raises them as OSError or RuntimeError (from a close) with HDF5's
  whole message, over two lines with a time and a buffer address; the
  caller names the output, with the system's words for the errno.
  """
  try:
    yield
  except (OSError, RuntimeError) as e:
    found = _ERRNO.search(str(e))
    number = getattr(e, "errno", None) or (found and int(found.group(1)))
    if not number:
      raise
    raise OSError(number, os.strerror(number), path) from e


def write_layout(path: str, newest: h5py.File, tensors: Sequence[base.Tensor],
                 optional_groups: Sequence[str] = ()) -> dict[str,
                                                              Optional[int]]:
  """Creates the output HDF5 file without its data; returns each tensor's
  data offset (None for empty tensors).

  Every group and attribute of `newest` is copied, and a dataset for each
  tensor, in name order (parents first); but not the top-level
  `optional_groups` none of the tensors is in.
  """
  wanted = {t.name for t in tensors}
  left_out = tuple(group + "/" for group in optional_groups if not any(
      name.startswith(group + "/") for name in wanted))
  offsets = {}
  # h5py's default format: no times.
  with _file_system_errors(path), h5py.File(path, "x") as out:
    _copy_attrs(newest, out)
    for name, item in _walk(newest, path):
      if (name + "/").startswith(left_out):
        continue
      parent_name, _, leaf = name.rpartition("/")
      parent = out[parent_name] if parent_name else out
      if isinstance(item, h5py.Group):
        _copy_attrs(item, parent.create_group(leaf))
      elif name in wanted:
        dataset = _create_dataset(parent, leaf, item)
        _copy_attrs(item, dataset)
        offsets[name] = dataset.id.get_offset()
  missing = wanted - set(offsets)
  if missing:
    raise AveragingError(f"internal error: no dataset for "
                         f"{sorted(missing)[:3]}")
  return offsets


class KerasSink(base.PositionedSink):
  """Writes a Keras weights file, or a `.keras` file with the weights
  written in place inside it (`keras_zip.ArchiveWriter`).

  The HDF5 layout is written first (every dataset allocated, contiguous);
  then each dataset's bytes are written at its offset.
  """

  def __init__(self, temporary: str, tensors: Sequence[base.Tensor],
               newest: KerasSource, *, archive: bool = False,
               optional_groups: Sequence[str] = ()):
    self._tensors = list(tensors)
    self._output = temporary
    weights = temporary + ("." + keras_zip.WEIGHTS_MEMBER if archive else "")
    offsets = write_layout(weights, newest.hdf5, self._tensors,
                           optional_groups)
    self._sizes = {t.name: t.parts[0].size for t in self._tensors}
    data: base.OutputFile
    if archive:
      data = _ArchiveData(_archive_writer(temporary, newest, weights, [
          (offset, offset + self._sizes[name])
          for name, offset in offsets.items() if offset is not None]))
      os.remove(weights)  # its metadata is copied, its data never written
    else:
      data = base.OutputFile(weights)
    # HDF5 stores no checksum for contiguous data.
    super().__init__(data, {
        t.parts[0].key: (offsets[t.name] or 0, t.parts[0].size)
        for t in self._tensors}, checksums=False)

  def place(self, key: bytes) -> Optional[int]:
    """None: datasets are written one by one, never joined into runs (a
    dataset's offset is HDF5's choice, not a layout of back-to-back parts)."""
    del key
    return None

  def close(self) -> None:
    """Flushes the output (for `.keras`, its CRC-32 set first)."""
    self.close_data()

  def verify(self) -> None:
    """Reopens the output (zip and HDF5) and checks every dataset's shape
    and dtype.

    Raises:
      AveragingError: it does not read back as written.
    """
    try:
      # The CRC-32 was computed from the bytes written: not read again.
      output = open_path(self._output, check_crc=False)
    except AveragingError as e:
      raise AveragingError(f"internal error: the output written at "
                           f"{self._output} does not read back: {e}") from e
    try:
      found = output.tensors()
      for tensor in self._tensors:
        other = found.get(tensor.name)
        if other is None or other.shape != tensor.shape or (
            other.dtype.name != tensor.dtype.name):
          raise AveragingError(f"internal error: dataset {tensor.name} of "
                               f"the output {self._output} reads back as "
                               f"{other and (other.shape, other.dtype.name)}")
      if set(found) != set(self._sizes):
        extra = sorted(set(found) - set(self._sizes))[:3]
        raise AveragingError(f"internal error: the output {self._output} has "
                             f"datasets never written: {extra}")
    finally:
      output.close()

  def publication(self, output: str) -> list[tuple[str, str]]:
    return [(self._output, output)]


def _archive_writer(temporary: str, newest: KerasSource, layout: str,
                    filled: Sequence[tuple[int, int]]) -> keras_zip.ArchiveWriter:
  """The `.keras` output around `layout`, with `newest`'s other members."""
  member = newest.member
  if member is None:
    raise AveragingError(f"internal error: {newest.path} is not a .keras "
                         "file")
  return keras_zip.ArchiveWriter(temporary, newest.path, member.members,
                                 layout, filled)


class _ArchiveData(base.OutputFile):
  """The weights member of a `.keras` file being written, as an output file:
  offsets are the member's, and its CRC-32 comes from what is written."""
  def __init__(self, archive: keras_zip.ArchiveWriter):  # pylint: disable=super-init-not-called
    self.path = archive.output_path
    self._archive: Optional[keras_zip.ArchiveWriter] = archive

  def write_at(self, data: memoryview, offset: int) -> None:
    archive = self._archive
    if archive is None:
      raise AveragingError(f"internal error: writing to {self.path} after "
                           "it was closed")
    archive.pieces.add(offset, data)
    offset += archive.weights_offset
    while data:
      written = os.pwrite(archive.fd, data, offset)
      data, offset = data[written:], offset + written

  def close(self) -> None:
    archive, self._archive = self._archive, None
    if archive is None:
      raise AveragingError(f"internal error: {self.path} is closed twice")
    archive.finish()

  def abort(self) -> None:
    archive, self._archive = self._archive, None
    if archive is not None:
      archive.abort()


# --- the formats -------------------------------------------------------------

class KerasFormat(base.Format):
  """Keras files: the output is named by `--output_path` as given."""

  archive = False
  loader = ""
  layout = "Keras 3"  # Which Keras' layout of groups and datasets.
  # Top-level groups a Keras file may go without (see `write_layout`).
  optional_groups: tuple[str, ...] = ()
  # Why an output must end in `suffix`.
  suffix_reason = "Keras reads them only under such names"

  def check_output_path(self, output_path: str,
                        taken: Optional[Phrase] = None) -> None:
    if output_path.endswith(self.suffix):
      return
    path = output_path[:-1] if output_path.endswith("/") else output_path
    stem = detect.keras_stem(path)  # `avg.keras` → `avg`
    if stem == os.path.basename(path):
      stem = os.path.splitext(stem)[0]  # `avg.ckpt` → `avg`
    raise ArgumentError(
        "{output_path} {path!r} must end in {suffix} for {kind} inputs" +
        (" ({taken})" if taken else "") + ": {reason} (e.g. {example})",
        path=output_path, suffix=self.suffix, kind=self.name, taken=taken,
        reason=self.suffix_reason, example=os.path.join(
            os.path.dirname(path), stem + self.suffix))

  def output_name(self, output_path: str, step: int) -> str:
    del step  # Keras files are named by the user (legacy's -<step>: TF only).
    return output_path

  def files(self, output: str) -> list[str]:
    return [output]

  def exists(self, output: str) -> bool:
    return os.path.isfile(output)

  def make_sink(self, temporary: str, tensors: Sequence[base.Tensor],
                newest: base.Source) -> base.Sink:
    assert isinstance(newest, KerasSource)
    return KerasSink(temporary, tensors, newest, archive=self.archive,
                     optional_groups=self.optional_groups)

  def how_to_load(self, output: str) -> str:
    return f"load it with {self.loader}({output!r})"


class KerasWeightsFormat(KerasFormat):
  name = "Keras .weights.h5 file"
  suffix = WEIGHTS_SUFFIX
  loader = "model.load_weights"


class KerasArchiveFormat(KerasFormat):
  name = "Keras .keras file"
  suffix = ARCHIVE_SUFFIX
  archive = True
  loader = "keras.models.load_model"


class Keras2Format(KerasFormat):
  """Keras 2 (tf_keras, legacy) `.h5` files, in the newest input's layout."""
  layout = "Keras 2"
  suffix = detect.LEGACY_H5_SUFFIX
  suffix_reason = "tf_keras writes and finds HDF5 weights under such names"


class Keras2WeightsFormat(Keras2Format):
  name = "Keras 2 .h5 weights file"
  loader = "model.load_weights"


class Keras2ModelFormat(Keras2Format):
  name = "Keras 2 .h5 model file"
  loader = "tf_keras.models.load_model"
  # `load_model` restores the optimizer's state when this group is there:
  # a model whose optimizer weights were all left out goes without.
  optional_groups = (KERAS2_OPTIMIZER,)


WEIGHTS_FORMAT = KerasWeightsFormat()
ARCHIVE_FORMAT = KerasArchiveFormat()
KERAS2_WEIGHTS_FORMAT = Keras2WeightsFormat()
KERAS2_MODEL_FORMAT = Keras2ModelFormat()
