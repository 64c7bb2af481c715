"""Checkpoint formats behind one interface: `open_source(path)` → a `base.Source`."""
from t2t_avg.formats.base import Source


def open_source(path: str) -> Source:
  """A source for the checkpoint at `path` (a resolved prefix or file).

  Raises:
    AveragingError: it is incomplete or cannot be read.
  """
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg.formats import tf_bundle
  return tf_bundle.open_source(path)
