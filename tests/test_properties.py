"""Properties over random inputs (hypothesis): averaged numbers and weights.

Checkpoints are written with TF's own `SaveV2` (what TF1 `Saver` calls) in a
fresh temporary directory per example and averaged in-process.
"""
import contextlib
import math
import os
import shutil
import tempfile
from unittest import mock

from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import ml_dtypes
import numpy as np
import pytest

from t2t_avg.errors import AveragingError
from t2t_avg.metrics.weighting import compute_weights

FLOAT_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
                "float32": np.float32, "float64": np.float64}
# Largest finite values (bfloat16 is drawn as float32, then rounded). The
# float64 sum of up to 5 of them cannot overflow, except for float64 itself:
# see test_float64_sum_that_overflows_is_refused_naming_the_variable.
_LIMITS = {name: float(ml_dtypes.finfo(dtype).max)
           for name, dtype in FLOAT_DTYPES.items()}
_LIMITS["float64"] = 1e307
_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
# Chunk sizes for the streaming engine: tiny ones cut tensors mid-way.
_CHUNKS = st.sampled_from([None, 8, 24, 1000])
_SLOW = settings(max_examples=100, deadline=None)


def _elements(name):
  width = {"float16": 16, "bfloat16": 32, "float32": 32, "float64": 64}[name]
  return st.floats(width=width, allow_nan=False, allow_infinity=False,
                   min_value=-_LIMITS[name], max_value=_LIMITS[name])


def _array(name, shape):
  draw_dtype = np.float32 if name == "bfloat16" else FLOAT_DTYPES[name]
  return hnp.arrays(draw_dtype, shape, elements=_elements(name)).map(
      lambda a: a.astype(FLOAT_DTYPES[name]))


@st.composite
def _checkpoint_sets(draw, min_n=1, max_n=5, identical=False):
  """n checkpoints, each with one variable of every float dtype."""
  n = draw(st.integers(min_n, max_n))
  tensors = {}
  for name in FLOAT_DTYPES:
    shape = draw(_SHAPES)
    if identical:
      tensors[name] = [draw(_array(name, shape))] * n
    else:
      tensors[name] = [draw(_array(name, shape)) for _ in range(n)]
  return [{f"model/{name}": tensors[name][i] for name in FLOAT_DTYPES}
          for i in range(n)]


def _average(checkpoints, chunk_bytes=None, **kwargs):
  """Saves each {name: array} with SaveV2, averages them, returns the output."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg.engine import averaging
  from t2t_avg.engine import streaming
  directory = tempfile.mkdtemp(prefix="t2t_avg_property_")
  try:
    prefixes = []
    for i, values in enumerate(checkpoints):
      prefix = os.path.join(directory, "train", f"model.ckpt-{i + 1}")
      names = sorted(values)
      tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                        shape_and_slices=[""] * len(names),
                        tensors=[values[k] for k in names])
      prefixes.append(prefix)
    patch = (mock.patch.object(streaming, "CHUNK_BYTES", chunk_bytes)
             if chunk_bytes else contextlib.nullcontext())
    with patch:
      result = averaging.average_checkpoints(
          prefixes, os.path.join(directory, "out", "avg"), **kwargs)
    reader = tf.train.load_checkpoint(result.output_path)
    return {name: reader.get_tensor(name) for name in checkpoints[0]}
  finally:
    shutil.rmtree(directory)


def _bits(array):
  return np.ascontiguousarray(array).view(np.uint8).tobytes()


def _explicit_weights(n):
  return st.lists(st.floats(0, 100), min_size=n, max_size=n).filter(
      lambda w: sum(w) > 0)


@_SLOW
@given(checkpoints=_checkpoint_sets(identical=True), data=st.data(),
       chunk_bytes=_CHUNKS)
def test_averaging_identical_checkpoints_changes_no_bit(checkpoints, data,
                                                        chunk_bytes):
  weights = data.draw(st.none() | _explicit_weights(len(checkpoints)))
  out = _average(checkpoints, chunk_bytes, weights=weights)
  for name, value in checkpoints[0].items():
    assert out[name].dtype == value.dtype, name
    assert out[name].shape == value.shape, name
    # The float64 sum starts at +0.0, so -0.0 comes out as +0.0, as in
    # legacy T2T (np.zeros, then +=): the one change of a bit allowed.
    expected = value + np.zeros_like(value)
    if value.dtype != np.float64:
      assert _bits(out[name]) == _bits(expected), name
    else:
      # The contract's float64 sum / n (legacy's too) is not exact for
      # float64 itself: 3x / 3 can be 1 ulp off x (see the next test), and
      # each weighted term and partial sum rounds (half an ulp each, at most
      # twice the input's ulp near a power of two).
      np.testing.assert_array_max_ulp(out[name], expected,
                                      maxulp=2 * len(checkpoints))


def test_uniform_average_of_three_identical_float64_rounds_like_legacy():
  value = np.random.default_rng(3).standard_normal(1000)
  out = _average([{"x": value}] * 3)
  expected = (value + value + value) / 3  # The contract's (and legacy's) sum.
  assert _bits(out["x"]) == _bits(expected)
  assert not np.array_equal(out["x"], value)  # Some values move by 1 ulp.
  np.testing.assert_array_max_ulp(out["x"], value, maxulp=1)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_float64_sum_that_overflows_is_refused_naming_the_variable():
  big = np.full(3, 1e308)
  with pytest.raises(AveragingError, match="variable x: the average is not"):
    _average([{"x": big}, {"x": big}])


@_SLOW
@given(checkpoints=_checkpoint_sets(), chunk_bytes=_CHUNKS)
def test_uniform_average_is_float64_mean_rounded_once(checkpoints,
                                                      chunk_bytes):
  out = _average(checkpoints, chunk_bytes)
  for name, value in checkpoints[0].items():
    total = np.zeros(value.shape, np.float64)
    for values in checkpoints:  # In checkpoint order.
      total += values[name].astype(np.float64)
    expected = (total / len(checkpoints)).astype(value.dtype)
    assert out[name].dtype == value.dtype, name
    assert _bits(out[name]) == _bits(expected), name


# --- weights ---------------------------------------------------------------
# tests/test_weighting.py checks positive tables in [1e-6, 1e6]; these add
# what event files can really hold: negative values, zeros, NaN, inf, missing
# points (None), float32's whole range, and random temperatures and k.

_METRIC_SCHEMES = ["softmax", "proportional", "rank", "top_k"]
_FLOAT32_METRIC = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True), st.none())


def _weigh(values, scheme, mode, temperature, k):
  valid = [v for v in values if v is not None and math.isfinite(v)]
  return compute_weights(values, scheme=scheme, mode=mode,
                         temperature=temperature,
                         top_k=min(k, max(len(valid), 1)))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_FLOAT32_METRIC, min_size=1, max_size=10),
       scheme=st.sampled_from(_METRIC_SCHEMES),
       mode=st.sampled_from(["min", "max"]),
       temperature=st.just(0.0) | st.floats(1e-30, 1e30),
       k=st.integers(1, 10))
def test_weights_are_a_distribution_for_any_float32_metric_table(
    values, scheme, mode, temperature, k):
  valid = [v is not None and math.isfinite(v) for v in values]
  assume(any(valid))
  assume(scheme != "proportional" or all(
      v > 0 for v, ok in zip(values, valid) if ok))
  weights, details = _weigh(values, scheme, mode, temperature, k)

  assert len(weights) == len(values)
  assert all(type(w) is float and math.isfinite(w) and w >= 0
             for w in weights)
  assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
  assert details["excluded"] == [i for i, ok in enumerate(valid) if not ok]
  assert all(w == 0 for w, ok in zip(weights, valid) if not ok)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # The overflows.
@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False),
                       min_size=1, max_size=8),
       scheme=st.sampled_from(_METRIC_SCHEMES),
       mode=st.sampled_from(["min", "max"]),
       temperature=st.just(0.0) | st.floats(1e-300, 1e300),
       k=st.integers(1, 8))
def test_weights_over_all_of_float64_are_a_distribution_or_explained(
    values, scheme, mode, temperature, k):
  assume(scheme != "proportional" or all(v > 0 for v in values))
  try:
    weights, _ = _weigh(values, scheme, mode, temperature, k)
  except AveragingError as e:  # Values near the float64 limits overflow.
    assert scheme in str(e) and scheme in ("softmax", "proportional"), e
    assert max(abs(v) for v in values) > 1e100 or min(
        abs(v) for v in values) < 1e-300, values
    return
  assert all(math.isfinite(w) and w >= 0 for w in weights), weights
  assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(explicit=st.lists(st.floats(0, 1e300), min_size=1, max_size=10).filter(
    lambda w: math.fsum(w) > 0))
def test_explicit_weights_are_the_given_ones_normalised(explicit):
  weights, _ = compute_weights(None, scheme="explicit", mode="min",
                               explicit=explicit)
  total = math.fsum(explicit)
  assert weights == pytest.approx([w / total for w in explicit], rel=1e-12,
                                  abs=1e-300)
  assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
