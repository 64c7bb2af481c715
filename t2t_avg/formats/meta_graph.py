"""A `.meta` graph of the bare variables, as legacy T2T wrote beside its average."""
from __future__ import annotations

import re
from typing import Any
from collections.abc import Sequence

from t2t_avg.files import filesystem
from t2t_avg.formats import base

_NOT_IN_OP_NAMES = re.compile(r"[^A-Za-z0-9_.\-/]")


def op_name(key: str, taken: set[str]) -> str:
  """A graph op name for a checkpoint key, unique among `taken` (added to it).

  Checkpoint keys may hold characters op names may not (`a b`, `x:0`); the
  Saver keeps the keys themselves, so only uniqueness matters here.
  """
  name = _NOT_IN_OP_NAMES.sub("_", key).lstrip("_./-") or "variable"
  unique, i = name, 0
  while unique.lower() in taken:  # TF's name scopes ignore case.
    i += 1
    unique = f"{name}_{i}"
  taken.add(unique.lower())
  return unique


def write(path: str, tensors: Sequence[base.Tensor]) -> None:
  """Writes the `.meta` graph: one variable per tensor, saved under its key.

  Raises:
    OSError: TF cannot write it (`filesystem.GFileError`).
  """
  with filesystem.tensorflow() as tf:
    _write(tf, path, tensors)


def _write(tf: Any, path: str, tensors: Sequence[base.Tensor]) -> None:
  graph = tf.Graph()
  taken: set[str] = set()
  with graph.as_default():
    var_list = {}
    for tensor in tensors:
      var_list[tensor.name] = tf.compat.v1.get_variable(
          op_name(tensor.name, taken), shape=tensor.shape,
          dtype=tf.as_dtype(tensor.dtype.name),
          initializer=tf.compat.v1.zeros_initializer(), use_resource=False)
    saver = tf.compat.v1.train.Saver(var_list)
    saver.export_meta_graph(path)
