"""Checkpoint formats behind one interface: `open_source(path)` → a `base.Source`."""
from t2t_avg.formats import detect
from t2t_avg.formats.base import Format, Source


def open_source(path: str) -> Source:
  """A source for the checkpoint at `path` (a resolved prefix or file).

  Keras 3 files (`.weights.h5`, `.keras`) are told from TF checkpoints by
  their content.

  Raises:
    AveragingError: it is incomplete or cannot be read, or it is no
      checkpoint (the message says what it is).
  """
  # pylint: disable=import-outside-toplevel
  kind = detect.kind_of(path)
  if kind != detect.TF:
    from t2t_avg.formats import keras_h5
    return keras_h5.open_path(path, kind=kind)
  from t2t_avg.formats import tf_bundle
  return tf_bundle.open_source(path)


def format_named(path: str) -> Format:
  """The format a checkpoint's name says it is in, without opening it.

  (`open_source` tells by content; this is for checks before any work.)
  """
  # pylint: disable=import-outside-toplevel
  if path.endswith(detect.KERAS_SUFFIXES):
    from t2t_avg.formats import keras_h5
    return (keras_h5.WEIGHTS_FORMAT if path.endswith(keras_h5.WEIGHTS_SUFFIX)
            else keras_h5.ARCHIVE_FORMAT)
  from t2t_avg.formats import tf_bundle
  return tf_bundle.FORMAT
