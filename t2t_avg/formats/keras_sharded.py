"""Sharded Keras 3 weights: a `.weights.json` index and its `.weights.h5` shards.

`model.save_weights("m.weights.json", max_shard_size=...)` (Keras'
`ShardedH5IOStore`) writes shards `m_00000.weights.h5`, `m_00001...` beside
the index: their base name is the index's name without `.json` and with
every `.weights` removed, as Keras computes it. The index maps each group of
datasets to the shards holding them:
`{"metadata": {"total_size": ...}, "weight_map": {"/layers/dense/vars":
["m_00000.weights.h5"], ...}}`. Each shard is a Keras 3 weights file holding
some of the datasets (read in place by `keras_h5`); a tensor's name is its
dataset's path, as in an unsharded file, so sharded and unsharded weights
compare name by name.

The output is sharded as the newest input: its k-th shard holds the
datasets, groups and attributes of the newest's k-th shard (the first is
always `<base>_00000.weights.h5`, which Keras opens before reading the
index), named after the output, and its index is the newest's with those
names. Each shard is written as `keras_h5` writes a file; the index is
published last, so it never names a shard that is not there.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import re
from typing import Optional
from collections.abc import Sequence

import numpy as np

from t2t_avg.errors import AveragingError
from t2t_avg.formats import base
from t2t_avg.formats import detect
from t2t_avg.formats import keras_h5

SUFFIX = detect.SHARDED_SUFFIX
SHARD_SUFFIX = ".weights.h5"


def shard_base(index: str) -> str:
  """The base name of an index's shards (Keras: `m.weights.json` → `m`)."""
  return pathlib.Path(index).stem.replace(".weights", "")


def shard_name(index: str, number: int) -> str:
  """The name Keras gives shard `number` of an index."""
  return f"{shard_base(index)}_{number:05}{SHARD_SUFFIX}"


def shard_files(index_path: str, index: dict) -> list[str]:
  """The shard files of an index, its first shard first, then by name.

  Raises:
    AveragingError: the index names something that is not a file name.
  """
  first = shard_name(index_path, 0)
  listed = {name for value in index[detect.SHARD_MAP].values()
            for name in ([value] if isinstance(value, str) else value)}
  others = sorted(listed - {first})
  for name in others:
    if os.path.basename(name) != name or name in (".", ".."):
      raise AveragingError(f"{index_path} names shard {name!r}, which is "
                           "not a file name beside it (Keras would not read "
                           "it)")
  directory = os.path.dirname(index_path)
  return [os.path.join(directory, name) for name in [first] + others]


class ShardedSource(base.Source):
  """Sharded Keras weights: its tensors are those of all its shards."""

  def __init__(self, path: str, index: dict,
               shards: Sequence[keras_h5.KerasSource]):
    super().__init__(path)
    self.index = index
    self.shards = list(shards)
    self._owner: dict[str, keras_h5.KerasSource] = {}
    self._tensors: dict[str, base.Tensor] = {}
    for shard in self.shards:
      for name, tensor in shard.tensors().items():
        if name in self._owner:
          raise AveragingError(
              f"{path}: dataset {name} is in two shards, "
              f"{os.path.basename(self._owner[name].path)} and "
              f"{os.path.basename(shard.path)}")
        self._owner[name] = shard
        self._tensors[name] = tensor
    self.step_keys = tuple(k for k in keras_h5.STEP_KEYS if k in self._tensors
                           and self._tensors[k].is_integer_scalar)

  @property
  def format(self) -> base.Format:
    return FORMAT

  def tensors(self) -> dict[str, base.Tensor]:
    return self._tensors

  def shard_of(self, name: str) -> keras_h5.KerasSource:
    """The shard holding tensor `name`."""
    return self._owner[name]

  def read(self, part: base.Part, offset: int, out: memoryview) -> None:
    name = part.key.decode("utf-8", "surrogateescape")
    self._owner[name].read(part, offset, out)

  def close(self) -> None:
    super().close()
    for shard in self.shards:
      shard.close()


def open_path(path: str) -> ShardedSource:
  """A source for the sharded weights whose index is at `path`.

  Raises:
    AveragingError: the index is not one, a shard is missing, or cannot be
      read (naming it).
  """
  index = detect.read_shard_index(path)
  shards: list[keras_h5.KerasSource] = []
  try:
    for shard in shard_files(path, index):
      if not os.path.isfile(shard):
        raise AveragingError(f"shard {shard} of the sharded Keras weights "
                             f"{path} does not exist")
      shards.append(keras_h5.KerasSource(shard, keras_h5.WEIGHTS_FORMAT, (
          shard, 0, os.path.getsize(shard))))
    return ShardedSource(path, index, shards)
  except BaseException:
    for opened in shards:
      opened.close()
    raise


class ShardedSink(base.Sink):
  """Writes sharded weights: a `keras_h5` sink per shard, then the index."""

  def __init__(self, temporary: str, tensors: Sequence[base.Tensor],
               newest: ShardedSource):
    self._index_path = temporary
    self._newest = newest
    self._tensors = list(tensors)
    directory = os.path.dirname(temporary)
    self._names = {shard.path: shard_name(temporary, k)
                   for k, shard in enumerate(newest.shards)}
    self._sinks: dict[str, keras_h5.KerasSink] = {}
    self._route: dict[str, keras_h5.KerasSink] = {}
    try:
      for shard in newest.shards:
        held = [t for t in self._tensors
                if newest.shard_of(t.name) is shard]
        sink = keras_h5.KerasSink(os.path.join(
            directory, self._names[shard.path]), held, shard)
        self._sinks[shard.path] = sink
        self._route.update((t.name, sink) for t in held)
    except BaseException:
      self.abort()
      raise

  def place(self, key: bytes) -> Optional[int]:
    """None: each dataset is written on its own, into its shard."""
    del key
    return None

  def write_parts(self, keys: Sequence[bytes], data: np.ndarray,
                  bounds: Sequence[int]) -> None:
    raise AveragingError("internal error: sharded Keras outputs place no "
                         "runs of parts")

  def open_part(self, key: bytes) -> base.PartWriter:
    return self._route[key.decode("utf-8", "surrogateescape")].open_part(key)

  def close(self) -> None:
    """Closes every shard, then writes the index naming them."""
    for sink in self._sinks.values():
      sink.close()
    with open(self._index_path, "x", encoding="utf-8") as f:
      f.write(json.dumps(self._index(), indent=4))  # As Keras writes it.
      f.flush()
      os.fsync(f.fileno())

  def _index(self) -> dict:
    """The newest input's index with the output's shard names (and, when
    tensors were left out, the size of those written)."""
    index = copy.deepcopy(self._newest.index)
    by_name = {os.path.basename(old): new for old, new in self._names.items()}
    weight_map = index[detect.SHARD_MAP]
    for group, value in weight_map.items():
      weight_map[group] = (by_name.get(value, value) if isinstance(value, str)
                           else [by_name.get(v, v) for v in value])
    metadata = index.get("metadata")
    if isinstance(metadata, dict) and "total_size" in metadata and (
        len(self._tensors) != len(self._newest.tensors())):
      metadata["total_size"] = float(sum(t.nbytes for t in self._tensors))
    return index

  def abort(self) -> None:
    for sink in self._sinks.values():
      sink.abort()

  def verify(self) -> None:
    """Reopens the output (index and shards) and checks every tensor's
    shape and dtype.

    Raises:
      AveragingError: it does not read back as written.
    """
    try:
      output = open_path(self._index_path)
    except AveragingError as e:
      raise AveragingError(f"internal error: the output written at "
                           f"{self._index_path} does not read back: "
                           f"{e}") from e
    try:
      found = {name: (t.shape, t.dtype.name)
               for name, t in output.tensors().items()}
      wanted = {t.name: (t.shape, t.dtype.name) for t in self._tensors}
      wrong = sorted(n for n in set(found) | set(wanted)
                     if found.get(n) != wanted.get(n))
      if wrong:
        raise AveragingError(f"internal error: dataset {wrong[0]} of the "
                             f"output {self._index_path} reads back as "
                             f"{found.get(wrong[0])}, not "
                             f"{wanted.get(wrong[0])}")
    finally:
      output.close()

  def publication(self, output: str) -> list[tuple[str, str]]:
    directory = os.path.dirname(output)
    temporary = os.path.dirname(self._index_path)
    return [(os.path.join(temporary, name), os.path.join(directory, name))
            for name in self._names.values()] + [(self._index_path, output)]


class ShardedFormat(keras_h5.KerasFormat):
  """Sharded Keras 3 weights: the output is sharded as the newest input."""

  name = "Keras sharded .weights.json file"
  suffix = SUFFIX
  loader = "model.load_weights"

  def files(self, output: str) -> list[str]:
    """The index, then the shards named as its shards are named."""
    directory = os.path.dirname(output) or "."
    pattern = re.compile(re.escape(shard_base(output)) + r"_\d{5,}" +
                         re.escape(SHARD_SUFFIX))
    try:
      names = sorted(n for n in os.listdir(directory) if pattern.fullmatch(n))
    except OSError:
      names = []
    return [output] + [os.path.join(os.path.dirname(output), n)
                       for n in names]

  def exists(self, output: str) -> bool:
    """Whether the index, or a file under one of its shards' names, is
    there (writing would replace it)."""
    return any(os.path.isfile(f) for f in self.files(output))

  def make_sink(self, temporary: str, tensors: Sequence[base.Tensor],
                newest: base.Source) -> base.Sink:
    assert isinstance(newest, ShardedSource)
    return ShardedSink(temporary, tensors, newest)


FORMAT = ShardedFormat()
