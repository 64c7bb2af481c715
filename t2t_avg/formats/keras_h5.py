"""Keras 3 `.weights.h5` and `.keras` files, read in place and written in chunks.

A Keras 3 weights file is HDF5: groups `layers/<class>[_N]/vars`,
`optimizer/vars`, `vars` (nested models nest `layers/`), holding datasets
`0`, `1`, ... Tensor names here are the datasets' paths
(`layers/dense/vars/0`). Keras writes every dataset contiguous and
uncompressed, so its bytes are one run of the file at the offset HDF5
reports: they are read with positioned reads, in chunks, as TF bundles are
(inside a `.keras` file, see `keras_zip`). A dataset stored otherwise
(chunked, compressed, compact) is read through h5py slices.

bfloat16 (Keras' pure `bfloat16` policy) is stored as 2-byte opaque data
marked by a `dtype="bfloat16"` attribute; it is averaged as bfloat16 and
written back the same way.

The output is a new HDF5 file whose layout is fixed before any data byte is
written: every group, attribute and dataset of the newest input, in name
order, datasets contiguous and allocated at creation, with h5py's default
(earliest) file format, which stores no times. The parts' bytes are then
written at their datasets' offsets, so the same inputs give the same bytes
whichever thread writes what. A `.keras` output zips that file with the
newest input's other members (`keras_zip.write_archive`).
"""
from __future__ import annotations

import io
import math
import os
import struct
import threading
import weakref
from typing import Any, Optional
from collections.abc import Iterator, Sequence

import h5py
import ml_dtypes
import numpy as np

from t2t_avg.inputs import keras_checkpoints
from t2t_avg.errors import ArgumentError, AveragingError, Phrase, error_text
from t2t_avg.formats import base
from t2t_avg.formats import detect
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


def dtype_of(dataset: h5py.Dataset, where: str) -> base.DType:
  """The engine's view of a dataset's type.

  Raises:
    AveragingError: a type that is not numbers of a fixed size.
  """
  dtype = dataset.dtype
  marked = dataset.attrs.get(_DTYPE_ATTR)
  if isinstance(marked, bytes):
    marked = marked.decode("utf-8", "replace")
  if (dtype.kind == "V" and dtype.fields is None and isinstance(marked, str)
      and marked.startswith(("bfloat16", "float8"))
      and hasattr(ml_dtypes, marked)):
    numpy = np.dtype(getattr(ml_dtypes, marked))
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


def _tensor(name: str, dataset: h5py.Dataset, label: str, file: str,
            offset: int, size: int) -> base.Tensor:
  """One dataset as a Tensor whose part points at its bytes, if it can."""
  if dataset.shape is None or dataset.is_virtual:
    state = "empty (no shape)" if dataset.shape is None else "virtual"
    raise AveragingError(f"{label}: dataset {name} is {state}")
  dtype = dtype_of(dataset, label)
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
  """A Keras 3 weights file, or the weights of a `.keras` file."""

  def __init__(self, path: str, fmt: KerasFormat, image: tuple[str, int,
                                                                  int],
               member: Optional[keras_zip.WeightsMember] = None):
    super().__init__(path)
    self._format = fmt
    self.member = member
    file, offset, size = image
    label = (path if member is None else
             f"{path} (its {keras_zip.WEIGHTS_MEMBER})")
    # An extracted member is removed on close, or when the source is lost.
    self._remove_extracted = weakref.finalize(
        self, _remove_quietly, member.extracted) if (
            member is not None and member.extracted) else None
    self.hdf5 = open_hdf5(file, offset, size, label)
    self._h5_lock = threading.Lock()
    try:
      _refuse_other_hdf5(self.hdf5, path)
      self._tensors = {
          name: _tensor(name, item, label, file, offset, size)
          for name, item in _walk(self.hdf5, label)
          if isinstance(item, h5py.Dataset)}
    except (OSError, ValueError, KeyError, RuntimeError) as e:
      self.hdf5.close()
      raise AveragingError(f"{label} is a damaged HDF5 file: "
                           f"{error_text(e)}") from e
    except AveragingError:
      self.hdf5.close()
      raise
    self.step_keys = tuple(k for k in STEP_KEYS if k in self._tensors and
                           self._tensors[k].is_integer_scalar)

  @property
  def format(self) -> base.Format:
    return self._format

  def tensors(self) -> dict[str, base.Tensor]:
    return self._tensors

  def name_step(self) -> Optional[int]:
    """The number `ModelCheckpoint` put in the file name (`{epoch}`)."""
    return keras_checkpoints.name_number(self.path)

  def read(self, part: base.Part, offset: int, out: memoryview) -> None:
    if part.file is not None:
      super().read(part, offset, out)
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


def _refuse_other_hdf5(h5: h5py.File, path: str) -> None:
  """Refuses Keras 2 (legacy) `.h5` files and HDF5 files that are no weights."""
  legacy = [a for a in _LEGACY_ATTRS if a in h5.attrs]
  if legacy or "model_weights" in h5:
    found = legacy[0] if legacy else "group model_weights"
    raise AveragingError(
        f"{path} is a Keras 2 (legacy) HDF5 file ({found}), not Keras 3 "
        "weights; load it with Keras 3 and save_weights() to a .weights.h5 "
        "file")
  if not any(group in h5 for group in _KERAS3_GROUPS):
    top = ", ".join(sorted(h5.keys())[:5]) or "nothing"
    raise AveragingError(
        f"{path} is an HDF5 file but not Keras 3 weights (no layers/, "
        f"optimizer/ or vars/ group at its root; it holds {top})")


def open_path(path: str, *, check_crc: bool = True,
              kind: Optional[str] = None) -> KerasSource:
  """A source for a `.weights.h5` or `.keras` file, told apart by content
  (`kind`: what `detect.kind_of` found, when the caller has asked it).

  Raises:
    AveragingError: it is neither, or cannot be read (the message says what
      it is or what is wrong).
  """
  kind = kind or detect.kind_of(path)
  if kind == detect.KERAS_WEIGHTS:
    return KerasSource(path, WEIGHTS_FORMAT, (path, 0, os.path.getsize(path)))
  if kind == detect.KERAS_ARCHIVE:
    member = keras_zip.open_weights(path, check_crc=check_crc)
    return KerasSource(path, ARCHIVE_FORMAT,
                       (member.path, member.offset, member.size), member)
  raise AveragingError(f"{path} is not a Keras 3 .weights.h5 or .keras file")


def read_counter(path: str) -> tuple[Optional[int], str]:
  """(the optimizer's iteration count, its dataset path) of a Keras file, or
  (None, '') when it has no counter; a `.keras` file's CRC is not checked.

  Raises:
    AveragingError: the file cannot be read (yet).
  """
  source = open_path(path, check_crc=False)
  try:
    if not source.step_keys:
      return None, ""
    key = source.step_keys[0]
    return int(base.read_array(source, source.tensors()[key])), key
  finally:
    source.close()


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


def write_layout(path: str, newest: h5py.File,
                 tensors: Sequence[base.Tensor]) -> dict[str, Optional[int]]:
  """Creates the output HDF5 file without its data; returns each tensor's
  data offset (None for empty tensors).

  Every group and attribute of `newest` is copied, and a dataset for each
  tensor, in name order (parents first).
  """
  wanted = {t.name for t in tensors}
  offsets = {}
  with h5py.File(path, "x") as out:  # h5py's default format: no times.
    _copy_attrs(newest, out)
    for name, item in _walk(newest, path):
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
  """Writes a Keras weights file (and for `.keras`, the zip around it).

  The HDF5 layout is written first (every dataset allocated, contiguous);
  then each dataset's bytes are written at its offset.
  """

  def __init__(self, temporary: str, tensors: Sequence[base.Tensor],
               newest: KerasSource, *, archive: bool):
    self._tensors = list(tensors)
    self._newest = newest
    self._archive = archive
    self._output = temporary
    self._weights = temporary + ("." + keras_zip.WEIGHTS_MEMBER if archive
                                 else "")
    offsets = write_layout(self._weights, newest.hdf5, self._tensors)
    self._sizes = {t.name: t.parts[0].size for t in self._tensors}
    # HDF5 stores no checksum for contiguous data.
    super().__init__(base.OutputFile(self._weights), {
        t.parts[0].key: (offsets[t.name] or 0, t.parts[0].size)
        for t in self._tensors}, checksums=False)

  def place(self, key: bytes) -> Optional[int]:
    """None: datasets are written one by one, never joined into runs (a
    dataset's offset is HDF5's choice, not a layout of back-to-back parts)."""
    del key
    return None

  def close(self) -> None:
    """Flushes the weights file; for `.keras`, writes the zip around it."""
    self.close_data()
    if self._archive:
      member = self._newest.member
      if member is None:
        raise AveragingError(f"internal error: {self._newest.path} is not a "
                             ".keras file")
      keras_zip.write_archive(self._output, self._newest.path,
                              member.members, self._weights)

  def verify(self) -> None:
    """Reopens the output (zip and HDF5) and checks every dataset's shape
    and dtype.

    Raises:
      AveragingError: it does not read back as written.
    """
    try:
      # zipfile computed the CRC from the bytes it wrote: not read again.
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


# --- the formats -------------------------------------------------------------

class KerasFormat(base.Format):
  """Keras 3 files: the output is named by `--output_path` as given."""

  archive = False
  loader = ""

  def check_output_path(self, output_path: str,
                        taken: Optional[Phrase] = None) -> None:
    if output_path.endswith(self.suffix):
      return
    stem = output_path[:-1] if output_path.endswith("/") else output_path
    raise ArgumentError(
        "{output_path} {path!r} must end in {suffix} for {kind} inputs" +
        (" ({taken})" if taken else "") + ": Keras reads them only under "
        "such names (e.g. {example})", path=output_path, suffix=self.suffix,
        kind=self.name, taken=taken,
        example=os.path.splitext(stem)[0] + self.suffix)

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
    return KerasSink(temporary, tensors, newest, archive=self.archive)

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


WEIGHTS_FORMAT = KerasWeightsFormat()
ARCHIVE_FORMAT = KerasArchiveFormat()
