"""Checkpoint formats behind one interface: `open_source(path)` → a `base.Source`.

Importing the package loads no numpy (the state file and detection are read
before numpy loads, so the kernel starts reading inputs sooner).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from t2t_avg.formats import detect

if TYPE_CHECKING:
  from t2t_avg.formats.base import Format, Source


def open_source(path: str, *, check_crc: bool = True) -> Source:
  """A source for the checkpoint at `path` (a resolved prefix or file).

  Keras files (`.weights.h5`, `.keras`, sharded `.weights.json`, Keras 2
  `.h5`) are told from TF checkpoints by their content. `check_crc=False`
  leaves a `.keras` file's CRC-32 to its source's `verify` (for a listing
  that may not average it).

  Raises:
    AveragingError: it is incomplete or cannot be read, or it is no
      checkpoint (the message says what it is).
  """
  # pylint: disable=import-outside-toplevel
  kind = detect.kind_of(path)
  if kind == detect.KERAS_SHARDED:
    from t2t_avg.formats import keras_sharded
    return keras_sharded.open_path(path)
  if kind != detect.TF:
    from t2t_avg.formats import keras_h5
    return keras_h5.open_path(path, check_crc=check_crc, kind=kind)
  from t2t_avg.formats import tf_bundle
  return tf_bundle.open_source(path)


def missing_file(path: str) -> Optional[str]:
  """The first missing file of a checkpoint kept in several (a TF bundle's
  data shard), or None."""
  # pylint: disable=import-outside-toplevel
  from t2t_avg.formats import tf_bundle
  if tf_bundle.is_v2(path):
    return tf_bundle.missing_data_file(path)
  return None


def read_in_full(path: str) -> Optional[str]:
  """None when every tensor of a checkpoint reads, checksums checked (TF
  bundles by TF's own reader); else why not."""
  # pylint: disable=import-outside-toplevel
  from t2t_avg.errors import AveragingError, error_text
  from t2t_avg.formats import base
  try:
    if detect.kind_of(path) == detect.TF:
      from t2t_avg.formats import tf_bundle
      return tf_bundle.read_in_full(path)
    source = open_source(path)
    try:
      for tensor in source.tensors().values():
        base.read_array(source, tensor)
      source.check_integrity()  # A `.keras` member's CRC-32, from the reads.
    finally:
      source.close()
  except (AveragingError, OSError, ValueError, IndexError) as e:
    return error_text(e)
  return None


def format_named(path: str) -> Format:
  """The format a checkpoint's name says it is in, without opening it.

  (`open_source` tells by content; this is for checks before any work.)
  """
  # pylint: disable=import-outside-toplevel
  if path.endswith(detect.SHARDED_SUFFIX):
    from t2t_avg.formats import keras_sharded
    return keras_sharded.FORMAT
  if path.endswith(detect.KERAS_FILE_SUFFIXES):
    from t2t_avg.formats import keras_h5
    for fmt in (keras_h5.WEIGHTS_FORMAT, keras_h5.ARCHIVE_FORMAT):
      if path.endswith(fmt.suffix):
        return fmt
    return keras_h5.KERAS2_WEIGHTS_FORMAT  # `.h5`: weights or a model alike
  from t2t_avg.formats import tf_bundle
  return tf_bundle.FORMAT
