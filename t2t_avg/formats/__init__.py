"""Checkpoint formats behind one interface: `open_source(path)` → a `base.Source`.

Importing the package loads no numpy (the state file and detection are read
before numpy loads, so the kernel starts reading inputs sooner).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from t2t_avg.formats import detect

if TYPE_CHECKING:
  from t2t_avg.formats.base import Source


def open_source(path: str) -> Source:
  """A source for the checkpoint at `path` (a resolved prefix or file).

  Keras files (`.weights.h5`, `.keras`, sharded `.weights.json`, Keras 2
  `.h5`) are told from TF checkpoints by their content.

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
    return keras_h5.open_path(path, kind=kind)
  from t2t_avg.formats import tf_bundle
  return tf_bundle.open_source(path)
