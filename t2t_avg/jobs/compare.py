"""Compares two checkpoints variable by variable; its command line is `t2t_avg.cli.compare`."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Optional
from collections.abc import Sequence

import numpy as np

from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.formats import base
from t2t_avg.formats import tf_bundle

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SIGNED_OF_WIDTH = {2: np.int16, 4: np.int32, 8: np.int64}
_UNSIGNED_OF_WIDTH = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# Elements compared per pass over a float variable.
_CHUNK = 1 << 20


class Status(enum.Enum):
  """How one variable compares."""
  IDENTICAL = "identical"
  WITHIN_TOLERANCE = "within tolerance"
  DIFFERENT = "different"
  ONLY_IN_A = "only in A"
  ONLY_IN_B = "only in B"
  DTYPE_DIFFERS = "dtype differs"
  SHAPE_DIFFERS = "shape differs"


@dataclasses.dataclass(frozen=True)
class VariableComparison:
  """One variable of the two checkpoints.

  Attributes:
    name: the checkpoint key.
    status: how the variable compares.
    is_float: a floating-point variable (float16, bfloat16, float32, float64),
      compared numerically; others are compared for equality.
    dtype_a, dtype_b: dtype names, None where the variable is absent.
    shape_a, shape_b: shapes, None where the variable is absent.
    differing: elements that are not equal (NaN equals NaN; strings and
      variants compared element by element, whatever their lengths).
    outside_tolerance: elements beyond `atol + rtol*|b|` (floats; NaN in only
      one of the two is always outside).
    nan_mismatches: elements that are NaN in only one of the two.
    max_abs_diff: max |a-b| over elements that are NaN in neither (floats).
    max_ulp_diff: max distance in units in the last place of the variable's
      own dtype, over the same elements (floats).
    relative_l2: ||a-b|| / ||b|| over the same elements; 0 when both norms
      are 0, inf when only ||b|| is (floats).
  """
  name: str
  status: Status
  is_float: bool
  dtype_a: Optional[str]
  dtype_b: Optional[str]
  shape_a: Optional[tuple]
  shape_b: Optional[tuple]
  differing: int = 0
  outside_tolerance: int = 0
  nan_mismatches: int = 0
  max_abs_diff: Optional[float] = None
  max_ulp_diff: Optional[int] = None
  relative_l2: Optional[float] = None

  @property
  def size(self) -> int:
    """Elements in the variable (of A where the shapes differ)."""
    shape = self.shape_a if self.shape_a is not None else self.shape_b
    return math.prod(shape or ())

  def fails(self, *, strict: bool = False) -> bool:
    """Whether this variable makes the comparison fail."""
    if self.status in (Status.IDENTICAL, Status.WITHIN_TOLERANCE):
      return False
    if not self.is_float and self.status in (Status.DIFFERENT,
                                             Status.SHAPE_DIFFERS):
      return strict  # Copied, not averaged: their shapes may change too.
    return True


@dataclasses.dataclass(frozen=True)
class ComparisonReport:
  """Every variable of two checkpoints, by name.

  Attributes:
    path_a, path_b: the checkpoint prefixes compared (directories resolved
      to their latest checkpoint). B is the reference of `rtol` and of the
      relative L2 distance.
    atol, rtol: the tolerances used.
    variables: one comparison per key of either checkpoint, sorted by name.
  """
  path_a: str
  path_b: str
  atol: float
  rtol: float
  variables: tuple

  def failures(self, *, strict: bool = False) -> tuple:
    """The variables that make the comparison fail."""
    return tuple(v for v in self.variables if v.fails(strict=strict))

  def passed(self, *, strict: bool = False) -> bool:
    """Same keys and dtypes, floats of the same shapes within tolerance.

    Args:
      strict: non-float variables must be equal too (values and shapes).
    """
    return not self.failures(strict=strict)

  @property
  def common_floats(self) -> tuple:
    """Float variables present in both with the same dtype and shape."""
    return tuple(v for v in self.variables if v.is_float and v.status in (
        Status.IDENTICAL, Status.WITHIN_TOLERANCE, Status.DIFFERENT))

  @property
  def common_nonfloats(self) -> tuple:
    """Non-float variables present in both with the same dtype."""
    return tuple(v for v in self.variables if not v.is_float and v.status in (
        Status.IDENTICAL, Status.DIFFERENT, Status.SHAPE_DIFFERS))

  @property
  def largest_difference(self) -> Optional[VariableComparison]:
    """The common float variable with the largest max |a-b|, if any differs."""
    differing = [v for v in self.common_floats if v.differing]
    if not differing:
      return None
    return max(differing, key=lambda v: (v.nan_mismatches > 0,
                                         v.max_abs_diff, v.max_ulp_diff))


def max_ulp_difference(a: np.ndarray, b: np.ndarray) -> int:
  """The largest distance between `a` and `b` in representable values.

  Computed in the arrays' own float dtype: each value's bits become an
  integer that orders like the values (+0 and -0 are the same), and the
  distance is the difference of those integers. Elements that are NaN in
  either array are left out.

  Args:
    a, b: float arrays (float16, bfloat16, float32 or float64) of the same
      dtype and shape.

  Returns:
    The maximum distance, 0 for empty arrays (a Python int: for float64 it can
    exceed the int64 range).

  Raises:
    ValueError: the dtypes or shapes differ, or the dtype is not a float.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    raise ValueError(f"cannot compare {a.dtype}{list(a.shape)} with "
                     f"{b.dtype}{list(b.shape)}")
  if a.dtype.name not in _FLOAT_DTYPES:
    raise ValueError(f"ULPs need a float dtype, not {a.dtype}")
  a, b = a.reshape(-1), b.reshape(-1)
  comparable = ~(np.isnan(a) | np.isnan(b))
  if not comparable.all():
    a, b = a[comparable], b[comparable]
  if not a.size:
    return 0
  ordered_a, ordered_b = _ordered_bits(a), _ordered_bits(b)
  return int(np.max(np.maximum(ordered_a, ordered_b) -
                    np.minimum(ordered_a, ordered_b)))


def _ordered_bits(values: np.ndarray) -> np.ndarray:
  """Unsigned integers, of the values' width, that order like the values."""
  width = values.dtype.itemsize
  signed = np.ascontiguousarray(values).view(_SIGNED_OF_WIDTH[width])
  # Sign-magnitude to two's complement: a negative float's bits are
  # lowest + magnitude, so lowest - bits = -magnitude (no overflow; -0 -> 0).
  lowest = signed.dtype.type(np.iinfo(signed.dtype).min)
  ordered = np.where(signed < 0, lowest - signed, signed)
  # Flipping the sign bit orders two's complement as unsigned, so the
  # difference of two of them fits the unsigned type, even for float64.
  unsigned = _UNSIGNED_OF_WIDTH[width]
  return ordered.view(unsigned) ^ unsigned(1 << (8 * width - 1))


def compare_checkpoints(a: str, b: str, *, atol: float = 0.0,
                        rtol: float = 0.0) -> ComparisonReport:
  """Compares every variable of two checkpoints, one variable at a time.

  Float variables pass when |a-b| <= atol + rtol*|b| elementwise, NaN equal
  to NaN at the same position; non-float ones are compared for equality.
  Only one variable of each checkpoint is in memory at a time.

  Args:
    a: a checkpoint prefix, or a directory meaning its latest checkpoint.
    b: the same for the reference checkpoint.
    atol: absolute tolerance, >= 0.
    rtol: tolerance relative to |b|, >= 0.

  Returns:
    The comparison of every key of either checkpoint.

  Raises:
    ValueError: a tolerance is negative or NaN.
    AveragingError: a checkpoint is missing or cannot be read (the message
      names the file, and the variable where one is at fault).
  """
  for name, value in (("atol", atol), ("rtol", rtol)):
    if not value >= 0:
      raise ArgumentError("{%s} must be >= 0, not {value}" % name, value=value)
  # TensorFlow takes seconds to import: only now that arguments are valid.
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import formats
  from t2t_avg.inputs import checkpoints
  path_a, path_b = checkpoints.resolve(a), checkpoints.resolve(b)
  source_a = formats.open_source(path_a)
  source_b = formats.open_source(path_b)
  tensors_a, tensors_b = source_a.tensors(), source_b.tensors()
  variables = []
  for name in sorted(set(tensors_a) | set(tensors_b)):
    variables.append(_compare_variable(name, source_a, tensors_a.get(name),
                                       source_b, tensors_b.get(name),
                                       atol=atol, rtol=rtol))
  source_a.check_integrity()
  source_b.check_integrity()
  return ComparisonReport(path_a=path_a, path_b=path_b, atol=atol, rtol=rtol,
                          variables=tuple(variables))




def _compare_variable(name: str, source_a: base.Source,
                      tensor_a: Optional[base.Tensor], source_b: base.Source,
                      tensor_b: Optional[base.Tensor], *, atol: float,
                      rtol: float) -> VariableComparison:
  """One variable of both checkpoints (either may be None: absent)."""
  present = tensor_a or tensor_b
  assert present is not None
  metadata: dict[str, Any] = dict(
      name=name,
      dtype_a=tensor_a.dtype.name if tensor_a else None,
      dtype_b=tensor_b.dtype.name if tensor_b else None,
      shape_a=tuple(tensor_a.shape) if tensor_a else None,
      shape_b=tuple(tensor_b.shape) if tensor_b else None,
      is_float=present.dtype.name in _FLOAT_DTYPES)
  if tensor_b is None:
    return VariableComparison(status=Status.ONLY_IN_A, **metadata)
  if tensor_a is None:
    return VariableComparison(status=Status.ONLY_IN_B, **metadata)
  if metadata["dtype_a"] != metadata["dtype_b"]:
    return VariableComparison(status=Status.DTYPE_DIFFERS, **metadata)
  if metadata["shape_a"] != metadata["shape_b"]:
    return VariableComparison(status=Status.SHAPE_DIFFERS, **metadata)
  value_a = _values(source_a, tensor_a)
  value_b = _values(source_b, tensor_b)
  if metadata["is_float"]:
    measures = _compare_floats(value_a, value_b, atol=atol, rtol=rtol)
  else:
    measures = _compare_exactly(value_a, value_b)
  return VariableComparison(**metadata, **measures)


def _values(source: base.Source, tensor: base.Tensor) -> np.ndarray:
  """A tensor's values; strings and variants as their elements' bytes."""
  if tensor.dtype.numpy is not None:
    return base.read_array(source, tensor)
  whole: np.ndarray = np.empty(tensor.shape, object)
  for part in tensor.parts:
    data = bytearray(part.size)
    source.read(part, 0, memoryview(data))
    try:
      elements = tf_bundle.decode_elements(tensor.dtype, bytes(data),
                                           math.prod(part.shape))
    except (ValueError, IndexError) as e:
      raise AveragingError(f"cannot read variable {tensor.name} from "
                           f"checkpoint {source.path}: {e}") from e
    flat = np.empty(len(elements), object)
    flat[:] = elements  # Each a bytes object, whatever its length.
    value = flat.reshape(part.shape)
    if part.extents is None:
      whole = value
    else:
      whole[tuple(slice(start, None if length < 0 else start + length)
                  for start, length in part.extents)] = value
  return whole


def _compare_floats(a: np.ndarray, b: np.ndarray, *, atol: float,
                    rtol: float) -> dict:
  """The VariableComparison measures of two float tensors, same dtype/shape.

  Works through the flattened tensors in chunks, so that the float64
  temporaries stay small next to the two tensors themselves.
  """
  a, b = a.reshape(-1), b.reshape(-1)
  differing = outside = nan_mismatches = max_ulp_diff = 0
  max_abs_diff = 0.0
  diff_parts, reference_parts = [], []
  for start in range(0, a.size, _CHUNK):
    chunk_a, chunk_b = a[start:start + _CHUNK], b[start:start + _CHUNK]
    max_ulp_diff = max(max_ulp_diff, max_ulp_difference(chunk_a, chunk_b))
    # float64 holds every float16/bfloat16/float32 value exactly.
    x, y = chunk_a.astype(np.float64), chunk_b.astype(np.float64)
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    nan_mismatches += int(np.count_nonzero(nan_x != nan_y))
    comparable = ~(nan_x | nan_y)
    if not comparable.all():
      x, y = x[comparable], y[comparable]
    equal = x == y
    with np.errstate(over="ignore", invalid="ignore"):
      # Where equal, inf - inf would give NaN: the difference is 0.
      diff = np.where(equal, 0.0, np.abs(x - y))
      within = equal | (np.isfinite(x) & np.isfinite(y) &
                        (diff <= atol + rtol * np.abs(y)))
    differing += int(np.count_nonzero(~equal))
    outside += int(np.count_nonzero(~within))
    if diff.size:
      max_abs_diff = max(max_abs_diff, float(diff.max()))
    diff_parts.append(_scaled_sum_of_squares(diff))
    reference_parts.append(_scaled_sum_of_squares(y))
  differing += nan_mismatches
  outside += nan_mismatches
  if not differing:
    status = Status.IDENTICAL
  elif outside:
    status = Status.DIFFERENT
  else:
    status = Status.WITHIN_TOLERANCE
  diff_norm = _l2_norm(diff_parts)
  reference_norm = _l2_norm(reference_parts)
  if diff_norm == 0:
    relative_l2 = 0.0
  elif math.isinf(diff_norm) or reference_norm == 0:
    relative_l2 = math.inf
  else:
    relative_l2 = diff_norm / reference_norm
  return dict(status=status, differing=differing, outside_tolerance=outside,
              nan_mismatches=nan_mismatches, max_abs_diff=max_abs_diff,
              max_ulp_diff=max_ulp_diff, relative_l2=relative_l2)


def _scaled_sum_of_squares(values: np.ndarray) -> tuple:
  """(m, sum((values/m)^2)) with m = max |values|: squares cannot overflow."""
  largest = float(np.max(np.abs(values))) if values.size else 0.0
  if largest == 0 or not math.isfinite(largest):
    return largest, 0.0
  return largest, float(np.sum(np.square(values / largest)))


def _l2_norm(parts: Sequence[tuple]) -> float:
  """The L2 norm from the `_scaled_sum_of_squares` of each chunk."""
  largest = max((m for m, _ in parts), default=0.0)
  if largest == 0 or not math.isfinite(largest):
    return largest
  return largest * math.sqrt(sum(s * (m / largest)**2 for m, s in parts))


def _compare_exactly(a: np.ndarray, b: np.ndarray) -> dict:
  """The VariableComparison measures of two non-float tensors, same shape."""
  differing = int(np.count_nonzero(a != b))
  return dict(status=Status.DIFFERENT if differing else Status.IDENTICAL,
              differing=differing, outside_tolerance=differing)


def format_report(report: ComparisonReport, *, verbose: bool = False,
                  strict: bool = False) -> str:
  """The report as a table: differing variables (all when `verbose`).

  The last line is the summary: `identical`, `within tolerance` or
  `different`, how many variables differ and the largest difference.

  Args:
    report: what `compare_checkpoints` returned.
    verbose: list every variable, not only those that differ.
    strict: count non-float differences, as `passed(strict=True)` does.

  Returns:
    The text, without a final newline.
  """
  lines = [f"A: {report.path_a}", f"B: {report.path_b} (reference)"]
  shown = [v for v in report.variables
           if verbose or v.status is not Status.IDENTICAL]
  if shown:
    lines.extend(_table([_row(v) for v in shown]))
  nonfloat_line = _nonfloat_summary(report, strict=strict)
  if nonfloat_line:
    lines.append(nonfloat_line)
  lines.append(_summary(report, strict=strict))
  return "\n".join(lines)


_HEADER = ("status", "dtype", "shape", "differ", "max |a-b|", "max ULPs",
           "rel L2", "variable")


def _row(v: VariableComparison) -> tuple:
  status = v.status.value
  if not v.is_float and v.status is Status.DIFFERENT:
    status = "non-float differs"
  dtype = (v.dtype_a if v.dtype_a == v.dtype_b or v.dtype_b is None else
           v.dtype_b if v.dtype_a is None else f"{v.dtype_a}|{v.dtype_b}")
  shape = (_shape(v.shape_a) if v.shape_a == v.shape_b or v.shape_b is None
           else _shape(v.shape_b) if v.shape_a is None
           else f"{_shape(v.shape_a)}|{_shape(v.shape_b)}")
  compared = v.status in (Status.IDENTICAL, Status.WITHIN_TOLERANCE,
                          Status.DIFFERENT)
  differ = f"{v.differing}/{v.size}" if compared else "-"
  name = v.name
  if v.nan_mismatches:
    name += f"  ({v.nan_mismatches} NaN in only one)"
  if v.max_abs_diff is None:
    numbers = ("-", "-", "-")
  else:
    numbers = (f"{v.max_abs_diff:.6g}", str(v.max_ulp_diff),
               f"{v.relative_l2:.3g}")
  return (status, dtype, shape, differ) + numbers + (name,)


def _shape(shape: Optional[tuple]) -> str:
  return "[" + ",".join(str(d) for d in shape or ()) + "]"


def _table(rows: Sequence[tuple]) -> list:
  widths = [max(len(row[i]) for row in [_HEADER, *rows])
            for i in range(len(_HEADER) - 1)]
  return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] +
                    [row[-1]]) for row in [_HEADER, *rows]]


def _nonfloat_summary(report: ComparisonReport, *, strict: bool) -> str:
  nonfloats = report.common_nonfloats
  if not nonfloats:
    return ""
  differing = [v.name for v in nonfloats if v.status is not Status.IDENTICAL]
  if not differing:
    return f"non-float: all {len(nonfloats)} variables equal"
  counted = ("counted (--strict)" if strict else
             "not counted (--strict counts them)")
  return (f"non-float: {len(differing)} of {len(nonfloats)} variables differ "
          f"({', '.join(differing)}); {counted}")


def _summary(report: ComparisonReport, *, strict: bool) -> str:
  floats = report.common_floats
  tolerance = f"atol={report.atol:g} rtol={report.rtol:g}"
  differing = sum(1 for v in floats if v.differing)
  if not report.passed(strict=strict):
    verdict = "different"
    outside = sum(1 for v in floats if v.status is Status.DIFFERENT)
    parts = [f"{outside} of {len(floats)} float variables outside {tolerance}"]
    for status in (Status.ONLY_IN_A, Status.ONLY_IN_B, Status.DTYPE_DIFFERS,
                   Status.SHAPE_DIFFERS):
      # Non-floats of other shapes are among the non-float differences.
      count = sum(1 for v in report.variables if v.status is status and (
          v.fails(strict=False)))
      if count:
        parts.append(f"{count} {status.value}")
    if strict:
      count = sum(1 for v in report.common_nonfloats
                  if v.status is not Status.IDENTICAL)
      if count:
        parts.append(f"{count} non-float differ")
    text = f"{verdict}: " + ", ".join(parts)
  elif differing:
    text = (f"within tolerance: {differing} of {len(floats)} float variables "
            f"differ, all within {tolerance}")
  else:
    text = f"identical: all {len(floats)} float variables are equal"
  largest = report.largest_difference
  if largest is not None:
    text += (f"; largest |a-b| {largest.max_abs_diff:.6g} "
             f"({largest.max_ulp_diff} ULPs, rel L2 {largest.relative_l2:.3g}"
             f"{', NaN in only one' if largest.nan_mismatches else ''}) "
             f"in {largest.name}")
  return text

