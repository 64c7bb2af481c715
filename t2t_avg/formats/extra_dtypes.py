"""Types numpy lacks (bfloat16, float8, int4, …), from ml_dtypes when first met.

ml_dtypes is not a requirement of t2t_avg: every library that writes such
types brings it (TensorFlow from 2.14, Keras 3, JAX), and an unpinned
requirement would let pip replace the numpy 1.x that an older TensorFlow
needs (ml_dtypes 0.5 and later are built for numpy 2).
"""
from __future__ import annotations

from typing import Any, Optional


def lookup(name: str) -> Optional[Any]:
  """The ml_dtypes type called `name`, or None (no such type, or no ml_dtypes)."""
  try:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return getattr(ml_dtypes, name, None)


def missing(name: str) -> str:
  """Why `lookup(name)` found nothing, for an error message."""
  try:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
  except ImportError:
    return (f"dtype {name} needs ml_dtypes, which is not installed "
            "(pip install ml_dtypes)")
  return (f"dtype {name} needs a newer ml_dtypes than the "
          f"{ml_dtypes.__version__} installed")
