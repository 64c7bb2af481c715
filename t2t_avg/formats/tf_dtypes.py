"""TF's DataType enums, as the engine sees them, without TensorFlow.

One row per enum of `tensorflow/core/framework/types.proto` (the `_REF`
ones never appear in checkpoints): TF's dtype name, its kind, and the numpy
dtype of its bytes (quantized types: the plain integer of their size;
strings, variants and resources: None, their bytes are only copied; a
string: the `ml_dtypes` type of that name, looked up when first met, since
the ml_dtypes that TF 2.16 pins has no int2, uint2 or float4_e2m1fn).
tests/test_tf_free.py checks every row against `tf.as_dtype`.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from t2t_avg.errors import AveragingError
from t2t_avg.formats import base
from t2t_avg.formats import extra_dtypes

_F, _C, _O = base.Kind.FLOAT, base.Kind.COMPLEX, base.Kind.OTHER
# enum: (TF's name, kind, numpy dtype, ml_dtypes name or None)
TABLE: dict[int, tuple[str, base.Kind, Any]] = {
    1: ("float32", _F, np.float32),
    2: ("float64", _F, np.float64),
    3: ("int32", _O, np.int32),
    4: ("uint8", _O, np.uint8),
    5: ("int16", _O, np.int16),
    6: ("int8", _O, np.int8),
    7: ("string", _O, None),
    8: ("complex64", _C, np.complex64),
    9: ("int64", _O, np.int64),
    10: ("bool", _O, np.bool_),
    11: ("qint8", _O, np.int8),
    12: ("quint8", _O, np.uint8),
    13: ("qint32", _O, np.int32),
    14: ("bfloat16", _F, "bfloat16"),
    15: ("qint16", _O, np.int16),
    16: ("quint16", _O, np.uint16),
    17: ("uint16", _O, np.uint16),
    18: ("complex128", _C, np.complex128),
    19: ("float16", _F, np.float16),
    20: ("resource", _O, None),
    21: ("variant", _O, None),
    22: ("uint32", _O, np.uint32),
    23: ("uint64", _O, np.uint64),
    24: ("float8_e5m2", _F, "float8_e5m2"),
    25: ("float8_e4m3fn", _F, "float8_e4m3fn"),
    26: ("float8_e4m3fnuz", _F, "float8_e4m3fnuz"),
    27: ("float8_e4m3b11fnuz", _F, "float8_e4m3b11fnuz"),
    28: ("float8_e5m2fnuz", _F, "float8_e5m2fnuz"),
    29: ("int4", _O, "int4"),
    30: ("uint4", _O, "uint4"),
    31: ("int2", _O, "int2"),
    32: ("uint2", _O, "uint2"),
    33: ("float4_e2m1fn", _F, "float4_e2m1fn"),
}
_ENUM_OF_NAME = {name: enum for enum, (name, _, _) in TABLE.items()}


@functools.cache
def dtype_of(enum: int) -> base.DType:
  """The engine's view of a TF dtype enum.

  Raises:
    AveragingError: an enum this version does not know.
  """
  row = TABLE.get(enum)
  if row is None:
    raise AveragingError(f"unknown TensorFlow dtype enum {enum} (DataType "
                         f"{enum} is not one t2t_avg knows)")
  name, kind, numpy = row
  if isinstance(numpy, str):
    looked_up = extra_dtypes.lookup(numpy)
    if looked_up is None:
      raise AveragingError(f"TensorFlow {extra_dtypes.missing(name)}")
    numpy = looked_up
  return base.DType(name, kind, None if numpy is None else np.dtype(numpy))


def dtype_enum(dtype: base.DType) -> int:
  """The TF dtype enum a bundle entry stores for `dtype`."""
  try:
    return _ENUM_OF_NAME[dtype.name]
  except KeyError:
    raise AveragingError(f"dtype {dtype.name} has no TensorFlow DataType "
                         "enum") from None
