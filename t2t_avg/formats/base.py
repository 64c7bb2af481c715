"""What the engine needs of a checkpoint format: named tensors it can read in chunks.

A source is one input checkpoint: its tensors (name, dtype, shape) and, for
each, the parts its bytes are stored in (one part for a whole tensor; one per
slice of a partitioned variable), readable at any byte offset into a
caller's buffer. The engine never asks which format it is reading.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
import os
import threading
from typing import NamedTuple, Optional
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from t2t_avg.files import crc
from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.errors import AveragingError, Phrase

Extent = tuple[int, int]  # (start, length) along one dimension


class Kind(enum.Enum):
  """What a dtype is to the engine."""
  FLOAT = "float"  # averaged in float64, cast once back
  COMPLEX = "complex"  # averaged in complex128, cast once back
  OTHER = "other"  # integers, bool, quantized, strings, variants: copied


@dataclasses.dataclass(frozen=True)
class DType:
  """A tensor's element type, as its format names it.

  Attributes:
    name: e.g. 'float32', 'bfloat16', 'qint8', 'string', 'variant'.
    kind: averaged (FLOAT, COMPLEX) or copied (OTHER).
    numpy: the stored element type for arithmetic; None for kinds whose
      elements have no fixed size (strings, variants).
  """
  name: str
  kind: Kind
  numpy: Optional[np.dtype]

  @property
  def averaged(self) -> bool:
    return self.kind is not Kind.OTHER


class Part(NamedTuple):
  """Where one run of a tensor's bytes is stored.

  (A NamedTuple, not a dataclass: a checkpoint of many small tensors has
  hundreds of thousands, built in a tight loop.)

  Attributes:
    key: the format's key for it (a TF slice key, or the tensor's own name).
    extents: (start, length) per dimension within the full tensor; None for
      a whole tensor.
    shape: the shape of this part.
    size: its bytes.
    file: the file holding the bytes, or None when only the source can
      produce them (`Source.read` decides).
    offset: where the bytes start in `file`.
    crc: the masked crc32c the format stores for them, or None.
  """
  key: bytes
  extents: Optional[tuple[Extent, ...]]
  shape: tuple[int, ...]
  size: int
  file: Optional[str] = None
  offset: int = 0
  crc: Optional[int] = None


class Tensor(NamedTuple):
  """One named tensor of a checkpoint and the parts holding it."""
  name: str
  dtype: DType
  shape: tuple[int, ...]
  parts: tuple[Part, ...]

  @property
  def nbytes(self) -> int:
    return sum(part.size for part in self.parts)

  @property
  def element(self) -> np.dtype:
    """The numpy type of its elements, for tensors that are numbers (those
    averaged, and step counters; strings and variants are only copied)."""
    numpy = self.dtype.numpy
    if numpy is None:
      where = "".join(f" in {p.file}" for p in self.parts[:1] if p.file)
      raise AveragingError(f"internal error: variable {self.name}{where} "
                           f"holds {self.dtype.name} values, which have no "
                           "fixed size")
    return numpy

  @property
  def is_integer_scalar(self) -> bool:
    """A scalar of integers (what a step counter is)."""
    numpy = self.dtype.numpy
    return self.shape == () and numpy is not None and numpy.kind in "iu"

  @property
  def layout(self) -> tuple[Optional[tuple[Extent, ...]], ...]:
    """How the tensor is cut into parts (slices), for comparing inputs."""
    return tuple(part.extents for part in self.parts)


class Source(abc.ABC):
  """One input checkpoint, read part by part in chunks.

  The default `read` makes positioned reads from `Part.file` (safe from
  several threads); formats whose bytes are not in a plain file override it.
  """

  # Scalar integer tensors that count training steps, most telling first.
  step_keys: tuple[str, ...] = ()
  # Whether outputs get a `global_step` when the inputs have none (legacy).
  adds_global_step = False

  def __init__(self, path: str):
    self.path = path
    self._files: dict[str, _PositionedFile] = {}
    self._lock = threading.Lock()

  @property
  @abc.abstractmethod
  def format(self) -> Format:
    """The checkpoint format this source is in."""

  @abc.abstractmethod
  def tensors(self) -> Mapping[str, Tensor]:
    """{name: Tensor} of every tensor in the checkpoint."""

  def verify(self) -> None:  # noqa: B027 (most formats check on opening)
    """Checks what opening left unchecked (a `.keras` file's CRC)."""

  def read(self, part: Part, offset: int, out: memoryview) -> None:
    """Reads `len(out)` bytes of `part` from byte `offset` into `out`.

    Raises:
      AveragingError: the file is missing or truncated.
    """
    if part.file is None:
      raise NotImplementedError(f"{type(self).__name__} must read {part.key!r}")
    with self._lock:
      handle = self._files.get(part.file)
      if handle is None:
        handle = self._files[part.file] = _PositionedFile(part.file)
    handle.read_into(out, part.offset + offset)

  def check_integrity(self) -> None:
    """Checks a checksum over the whole input, once what is needed of it
    has been read: the bytes read are counted as they are read, the rest
    read now (a `.keras` file's CRC-32). Nothing to do for formats whose
    every part has a checksum of its own, checked as it is read.

    Raises:
      AveragingError: naming the input, when it fails.
    """
    return None

  def close(self) -> None:
    with self._lock:
      for handle in self._files.values():
        handle.close()
      self._files.clear()


class Sink(abc.ABC):
  """One output being written under temporary names, then published.

  The layout is fixed when the sink is made (from the tensors, in name
  order), so the bytes never depend on which thread writes which part.
  """

  @abc.abstractmethod
  def open_part(self, key: bytes) -> PartWriter:
    """A writer for the output part `key` (thread-safe)."""

  @abc.abstractmethod
  def place(self, key: bytes) -> Optional[int]:
    """Where part `key` starts in the output's one data file, when it has
    one: parts placed back to back may be written in one call
    (`write_parts`). None: write part by part."""

  @abc.abstractmethod
  def write_parts(self, keys: Sequence[bytes], data: np.ndarray,
                  bounds: Sequence[int]) -> None:
    """Writes parts `keys`, placed back to back, whose bytes are
    data[bounds[k]:bounds[k + 1]]."""

  @abc.abstractmethod
  def close(self) -> None:
    """Finishes the output and flushes it to disk."""

  @abc.abstractmethod
  def abort(self) -> None:
    """Gives up (the temporary files are removed with their directory)."""

  @abc.abstractmethod
  def verify(self) -> None:
    """Checks that the format's own reader opens the output and lists every
    tensor; raises AveragingError otherwise."""

  @abc.abstractmethod
  def publication(self, output: str) -> list[tuple[str, str]]:
    """(temporary path, final path) to rename, in order; the last makes the
    output visible."""


class PositionedSink(Sink):
  """A sink whose parts have fixed places in one data file.

  Each part is written chunk by chunk at its place (positioned writes, safe
  from several threads); a run of parts placed back to back is written in
  one call. With `checksums`, each part's masked crc32c is computed on the
  way (`offset_and_crc`), for formats that store it.
  """

  def __init__(self, data: OutputFile, places: Mapping[bytes, Extent], *,
               checksums: bool):
    self._data = data
    self._places = places  # {key: (offset, size)}
    self._checksums = checksums
    self._crcs: dict[bytes, Optional[int]] = {}
    self._lock = threading.Lock()

  def open_part(self, key: bytes) -> PartWriter:
    offset, size = self._places[key]
    return PartWriter(self._data, key, offset, size,
                      checksum=self._checksums, done=self._finished)

  def place(self, key: bytes) -> Optional[int]:
    return self._places[key][0]

  def write_parts(self, keys: Sequence[bytes], data: np.ndarray,
                  bounds: Sequence[int]) -> None:
    start = self._places[keys[0]][0]
    for key, a, b in zip(keys, bounds[:-1], bounds[1:]):
      if self._places[key] != (start + a, b - a):
        raise AveragingError(f"internal error: parts {keys[0]!r}.. are not "
                             "back to back in the output")
    view = memoryview(data)  # type: ignore[arg-type]
    self._data.write_at(view, start)
    crcs = {key: crc.masked(crc.crc32c(view[a:b])) if self._checksums
            else None for key, a, b in zip(keys, bounds[:-1], bounds[1:])}
    with self._lock:
      self._crcs.update(crcs)

  def offset_and_crc(self, key: bytes) -> tuple[int, int]:
    """Where a written part starts, and its masked crc32c (`checksums`)."""
    value = self._crcs[key]
    if value is None:
      raise AveragingError(f"internal error: part {key!r} has no checksum")
    return self._places[key][0], value

  def _finished(self, key: bytes, crc_value: Optional[int]) -> None:
    with self._lock:
      self._crcs[key] = crc_value

  def close_data(self) -> None:
    """Flushes and closes the data file; every part must be written.

    Raises:
      AveragingError: (an internal error) parts were never written.
    """
    self._data.close()
    missing = [k for k in self._places if k not in self._crcs]
    if missing:
      raise AveragingError(f"internal error: parts never written: "
                           f"{missing[:3]}")

  def abort(self) -> None:
    self._data.abort()


class PartWriter:
  """Writes one part's bytes in order at its place in an output file.

  `done(key, crc)` is called when the part is complete, with its masked
  crc32c when `checksum` (computed on the way) or a copied part's own.
  """

  def __init__(self, data: OutputFile, key: bytes, offset: int, size: int, *,
               checksum: bool,
               done: Callable[[bytes, Optional[int]], None]):
    self._data, self._key, self._done = data, key, done
    self._offset, self._end = offset, offset + size
    self._crc: Optional[int] = 0 if checksum else None

  def write(self, chunk: np.ndarray) -> None:
    """Appends a chunk (any dtype; its bytes are written)."""
    data = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(
        np.uint8))  # type: ignore[arg-type]
    if self._offset + len(data) > self._end:
      raise AveragingError(f"internal error: part {self._key!r} overflows")
    if self._crc is not None:
      self._crc = crc.crc32c(data, self._crc)
    self._data.write_at(data, self._offset)
    self._offset += len(data)

  def close(self, stored_crc: Optional[int] = None) -> None:
    """Ends the part; `stored_crc` keeps a copied string/variant's checksum."""
    if self._offset != self._end:
      raise AveragingError(f"internal error: part {self._key!r} is short")
    if self._crc is not None and stored_crc is None:
      stored_crc = crc.masked(self._crc)
    self._done(self._key, stored_crc)


class OutputFile:
  """An output data file written at byte offsets, from several threads."""

  def __init__(self, path: str, *, size: Optional[int] = None):
    """Opens `path`: an existing file, or with `size` a new one of that size.

    Raises:
      OSError: it cannot be opened (or, with `size`, it exists).
    """
    create = os.O_CREAT | os.O_EXCL if size is not None else 0
    self.path = path
    self._fd: Optional[int] = os.open(
        path, os.O_WRONLY | create | getattr(os, "O_BINARY", 0), 0o644)
    if size is not None:
      os.ftruncate(self._fd, size)
    self._pwrite = getattr(os, "pwrite", None)
    self._lock = threading.Lock()

  def write_at(self, data: memoryview, offset: int) -> None:
    fd = self._fd
    if fd is None:
      raise AveragingError(f"internal error: writing to {self.path} after "
                           "it was closed")
    if self._pwrite is not None:
      while data:
        written = self._pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
      return
    with self._lock:  # Windows: no pwrite.
      os.lseek(fd, offset, os.SEEK_SET)
      while data:
        data = data[os.write(fd, data):]

  def close(self) -> None:
    """Flushes the file to disk and closes it."""
    fd, self._fd = self._fd, None
    if fd is None:
      raise AveragingError(f"internal error: {self.path} is closed twice")
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

  def abort(self) -> None:
    """Closes the file unflushed, if it is open."""
    fd, self._fd = self._fd, None
    if fd is not None:
      try:
        os.close(fd)
      except OSError:
        pass


class Format(abc.ABC):
  """A checkpoint format: how outputs are named, found and written."""

  name: str = ""
  # What an output name must end in (Keras: `.weights.h5`, `.keras`).
  suffix: str = ""
  # Whether a `checkpoint` state file lists outputs (TF), and a `.meta`
  # graph can be written beside them.
  has_state_file = False
  # Whether TensorFlow's own reader checks an output before it is published.
  checked_by_tensorflow = False

  def state_not_weights(self, names: Sequence[str]) -> dict[str, str]:
    """{name: what it is} for float tensors that are state, not weights.

    They are copied from the newest input like non-float tensors.
    """
    del names
    return {}

  @abc.abstractmethod
  def check_output_path(self, output_path: str,
                        taken: Optional[Phrase] = None) -> None:
    """Refuses an output name that is not this format's, before any work.

    Args:
      output_path: the output name asked for.
      taken: which inputs were taken and why, for the message.

    Raises:
      ArgumentError: naming the parameter, the name and the inputs' format.
    """

  @abc.abstractmethod
  def output_name(self, output_path: str, step: int) -> str:
    """The output's path from `output_path` (checked) and the output step."""

  @abc.abstractmethod
  def files(self, output: str) -> list[str]:
    """Every file an output at `output` has now, the one that makes it
    visible first (replacing an output removes them in this order)."""

  @abc.abstractmethod
  def exists(self, output: str) -> bool:
    """Whether a checkpoint of this format is at `output`."""

  @abc.abstractmethod
  def make_sink(self, temporary: str, tensors: Sequence[Tensor],
                newest: Source) -> Sink:
    """A sink writing `tensors` under the temporary path `temporary`;
    format metadata (e.g. a `.keras` file's config) comes from `newest`.

    `temporary` has the output's file name, in a private directory, so an
    output of several files that name each other (sharded Keras weights)
    is written as it will be published."""

  def how_to_load(self, output: str) -> str:
    """What the log says to do with a written output."""
    return f"decode with --checkpoint_path={output}"

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Format) and other.name == self.name

  def __hash__(self) -> int:
    return hash(self.name)


class _PositionedFile:
  """Positioned reads from one file: `os.pread` where the system has it."""

  def __init__(self, path: str):
    self.path = path
    self._local = paths.is_local(path)
    if self._local:
      try:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
      except OSError as e:
        raise AveragingError(f"cannot open {path}: {e.strerror}") from e
      if hasattr(os, "posix_fadvise"):  # Each tensor is read front to back.
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
      self._pread = getattr(os, "preadv", None)
    else:
      with filesystem.gfile() as gfile:
        self._gfile = gfile.GFile(path, "rb")
    self._lock = threading.Lock()

  def read_into(self, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
      n = self._read_some(out[done:], offset + done)
      if n == 0:
        raise AveragingError(f"{self.path} is truncated (reading at byte "
                             f"{offset + done})")
      done += n

  def _read_some(self, out: memoryview, offset: int) -> int:
    if self._local and self._pread is not None:
      return self._pread(self._fd, [out], offset)
    with self._lock:  # Windows and object stores: seek, then read.
      if self._local:
        os.lseek(self._fd, offset, os.SEEK_SET)
        data = os.read(self._fd, len(out))
      else:
        with filesystem.gfile():  # TF's errors as OSError
          self._gfile.seek(offset)
          data = self._gfile.read(len(out))
    out[:len(data)] = data
    return len(data)

  def close(self) -> None:
    if self._local:
      os.close(self._fd)
    else:
      self._gfile.close()



def read_array(source: Source, tensor: Tensor) -> np.ndarray:
  """A whole tensor as a numpy array, its parts joined, their crc checked.

  Raises:
    AveragingError: the tensor has no fixed-size elements (strings,
      variants), or its bytes fail their checksum.
  """
  if tensor.dtype.numpy is None:
    raise AveragingError(f"variable {tensor.name} of {source.path} holds "
                         f"{tensor.dtype.name} values, not numbers")
  whole = np.empty(tensor.shape, tensor.dtype.numpy)
  for part in tensor.parts:
    value = whole if part.extents is None else np.empty(part.shape,
                                                        whole.dtype)
    data = memoryview(value.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    source.read(part, 0, data)
    if part.crc is not None and crc.masked(crc.crc32c(data)) != part.crc:
      raise AveragingError(f"cannot read variable {tensor.name} from "
                           f"checkpoint {source.path}: it fails its checksum "
                           "(corrupted)")
    if part.extents is not None:
      whole[tuple(slice(start, None if length < 0 else start + length)
                  for start, length in part.extents)] = value
  return whole
