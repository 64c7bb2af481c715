"""Tests of t2t_avg.metrics.weighting: the defining properties of each scheme."""
import logging
import math
import subprocess
import sys

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.metrics.points import MetricPoint
from t2t_avg.metrics.weighting import (SCHEMES, align_metrics_to_checkpoints,
                               compute_weights, effective_count)

NAN = math.nan

VALUE_TABLES = [
    [1.0],
    [2.0, 1.0],
    [3.1, 2.7, 2.5, 2.6],
    [25.0, 26.5, 27.25, 27.0, 26.0],
    [0.5, 0.5, 0.5],
    [1e-3, 1.0, 1e3, 1e6],
    [4.0, 3.0, NAN, 2.0, math.inf],
]


def _weights(values, scheme, mode="max", **kwargs):
  if scheme == "top_k":
    kwargs.setdefault("top_k", 2 if np.isfinite(values).sum() >= 2 else 1)
  if scheme == "explicit":
    kwargs.setdefault("explicit", [float(i + 1) for i in range(len(values))])
  weights, _ = compute_weights(values, scheme=scheme, mode=mode, **kwargs)
  return weights


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("values", VALUE_TABLES)
def test_weights_are_non_negative_floats_summing_to_one(values, mode, scheme):
  weights = _weights(values, scheme, mode)

  assert len(weights) == len(values)
  assert all(type(w) is float and w >= 0 for w in weights)
  assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1,
                       max_size=12),
       scheme=st.sampled_from(SCHEMES), mode=st.sampled_from(["min", "max"]),
       temperature=st.sampled_from([0.0, 1e-3, 1.0, 1e3]))
def test_property_weights_sum_to_one_and_are_non_negative(values, scheme, mode,
                                                          temperature):
  weights = _weights(values, scheme, mode, temperature=temperature)

  assert all(math.isfinite(w) and w >= 0 for w in weights)
  assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("scheme", ["softmax", "proportional", "rank", "top_k"])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_weights_follow_the_metric_and_its_direction(scheme, mode):
  values = [3.0, 1.0, 4.0, 1.5, 2.0]
  weights = _weights(values, scheme, mode, temperature=1.0, top_k=3)

  better_first = sorted(range(5), key=lambda i: values[i],
                        reverse=mode == "max")
  ordered = [weights[i] for i in better_first]
  assert ordered == sorted(ordered, reverse=True)
  assert weights[better_first[0]] > weights[better_first[-1]]


def test_softmax_is_exp_of_distance_to_best_over_temperature():
  weights, details = compute_weights([1.0, 2.0, 4.0], scheme="softmax",
                                     mode="min", temperature=2.0)
  expected = np.exp([0.0, -0.5, -1.5])
  assert weights == pytest.approx(expected / expected.sum(), rel=1e-15)
  assert details["temperature"] == 2.0


@pytest.mark.parametrize("mode", ["min", "max"])
def test_softmax_high_temperature_is_nearly_uniform(mode):
  weights = _weights([27.0, 26.0, 25.0, 24.5], "softmax", mode,
                     temperature=1e6)
  assert weights == pytest.approx([0.25] * 4, abs=1e-6)


@pytest.mark.parametrize("mode, best", [("min", 3), ("max", 0)])
def test_softmax_low_temperature_puts_all_on_the_best(mode, best):
  weights = _weights([27.0, 26.0, 25.0, 24.5], "softmax", mode,
                     temperature=1e-3)
  assert weights[best] == pytest.approx(1.0, abs=1e-12)


def test_softmax_zero_temperature_uses_population_std(caplog):
  values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # population std = 2
  with caplog.at_level(logging.INFO):
    weights, details = compute_weights(values, scheme="softmax", mode="max")
  explicit, _ = compute_weights(values, scheme="softmax", mode="max",
                                temperature=2.0)
  assert details["temperature"] == 2.0
  assert weights == explicit
  assert any("std" in r.getMessage() for r in caplog.records)


def test_softmax_zero_temperature_with_equal_values_is_uniform():
  weights, details = compute_weights([3.0, 3.0, NAN, 3.0], scheme="softmax",
                                     mode="min")
  assert weights == [1 / 3, 1 / 3, 0.0, 1 / 3]
  assert details["temperature"] == 0.0


@pytest.mark.parametrize("temperature", [-1.0, NAN])
def test_softmax_negative_temperature_is_refused(temperature):
  with pytest.raises(ValueError, match="temperature"):
    compute_weights([1.0, 2.0], scheme="softmax", mode="min",
                    temperature=temperature)


@pytest.mark.parametrize("mode, expected", [
    ("max", [0.2, 0.3, 0.5]),
    ("min", [15 / 31, 10 / 31, 6 / 31]),
])
def test_proportional_is_the_value_or_its_inverse(mode, expected):
  assert _weights([2.0, 3.0, 5.0], "proportional", mode) == pytest.approx(
      expected, rel=1e-15)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("values", [[-4.0, -2.0], [0.0, 1.0], [3.0, -0.1]])
def test_proportional_refuses_non_positive_values(values, mode):
  with pytest.raises(AveragingError, match="softmax or rank"):
    _weights(values, "proportional", mode)


@pytest.mark.parametrize("values, mode, ranks", [
    ([10.0, 30.0, 20.0], "max", [1, 3, 2]),
    ([10.0, 30.0, 20.0], "min", [3, 1, 2]),
    ([1.0, 2.0, 3.0, 4.0, 5.0], "max", [1, 2, 3, 4, 5]),
    ([5.0, 7.0, 7.0, 9.0], "max", [1, 2.5, 2.5, 4]),
    ([1.0, 1.0, 1.0], "min", [2, 2, 2]),
    ([2.0, NAN, 1.0], "max", [2, 0, 1]),
])
def test_rank_gives_n_to_the_best_and_1_to_the_worst(values, mode, ranks):
  expected = [r / sum(ranks) for r in ranks]
  assert _weights(values, "rank", mode) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("values, mode, k, steps, selected", [
    ([1.0, 5.0, 3.0, 4.0], "max", 2, None, [1, 3]),
    ([1.0, 5.0, 3.0, 4.0], "min", 2, None, [0, 2]),
    ([1.0, 5.0, 3.0, 4.0], "max", 4, None, [0, 1, 2, 3]),
    ([2.0, 2.0, 2.0, 1.0], "max", 2, None, [1, 2]),  # ties: later position
    ([2.0, 2.0, 2.0, 1.0], "max", 2, [300, 100, 200, 400], [0, 2]),  # step
    ([2.0, 2.0, 2.0], "max", 1, [100, 200, 200], [2]),  # same step: later
    ([NAN, 1.0, 2.0], "min", 1, None, [1]),
])
def test_top_k_selects_the_best_with_ties_to_newer(values, mode, k, steps,
                                                    selected):
  weights, details = compute_weights(values, scheme="top_k", mode=mode,
                                     top_k=k, steps=steps)
  assert weights == [1 / k if i in selected else 0.0
                     for i in range(len(values))]
  assert details["selected"] == selected


@pytest.mark.parametrize("k", [0, -1, 3])
def test_top_k_out_of_range_is_refused(k):
  with pytest.raises(ValueError, match="top_k"):
    compute_weights([1.0, 2.0, NAN], scheme="top_k", mode="max", top_k=k)


@pytest.mark.parametrize("explicit, expected", [
    ([1.0, 1.0, 2.0], [0.25, 0.25, 0.5]),
    ([0.0, 3.0, 0.0], [0.0, 1.0, 0.0]),
    ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
])
def test_explicit_weights_are_normalised(explicit, expected):
  weights, _ = compute_weights(None, scheme="explicit", mode="auto",
                               explicit=explicit, steps=[1, 2, 3])
  assert weights == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("explicit, match", [
    ([1.0, -1.0, 2.0], ">= 0"),
    ([1.0, NAN, 2.0], ">= 0"),
    ([1.0, math.inf, 2.0], ">= 0"),
    ([0.0, 0.0, 0.0], "with a sum > 0"),
    ([1.0, 2.0], "weights gives 2 weights for 3 checkpoints"),
    (None, r"with a sum > 0, not \[\]"),
])
def test_explicit_weights_are_validated(explicit, match):
  with pytest.raises(ArgumentError, match=match):
    compute_weights([NAN, NAN, NAN], scheme="explicit", mode="min",
                    explicit=explicit)


def test_uniform_is_one_over_n_whatever_the_values():
  weights, _ = compute_weights([3.0, NAN, 1.0, 2.0], scheme="uniform",
                               mode="auto")
  assert weights == [0.25] * 4


@pytest.mark.parametrize("scheme", ["softmax", "proportional", "rank", "top_k"])
def test_nonfinite_metric_gets_weight_zero_with_a_warning(scheme, caplog):
  values = [2.0, NAN, 3.0, math.inf, None, 1.0]
  with caplog.at_level(logging.WARNING):
    weights, details = compute_weights(values, scheme=scheme, mode="max",
                                       top_k=2,
                                       steps=[10, 20, 30, 40, 50, 60])
  assert [weights[i] for i in (1, 3, 4)] == [0.0, 0.0, 0.0]
  assert all(weights[i] > 0 for i in (0, 2))
  assert details["excluded"] == [1, 3, 4]
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING]
  assert len(warnings) == 3
  assert all(f"step {s}" in w for s, w in zip((20, 40, 50), warnings))


@pytest.mark.parametrize("scheme", ["softmax", "proportional", "rank", "top_k"])
def test_all_nonfinite_metrics_is_an_error(scheme):
  with pytest.raises(AveragingError, match="No valid metric value"):
    compute_weights([NAN, math.inf, -math.inf], scheme=scheme, mode="min",
                    top_k=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "best", "mode": "min"}, "weighting must be one of"),
    ({"scheme": "softmax", "mode": "auto"},
     "metric_mode must be 'min' or 'max', not 'auto'"),
    ({"scheme": "rank", "mode": "lower"}, "metric_mode must be 'min' or 'max'"),
])
def test_bad_arguments_are_argument_errors(kwargs, match):
  with pytest.raises(ArgumentError, match=match):
    compute_weights([1.0, 2.0], **kwargs)


def _points(*steps):
  return [MetricPoint(step=s, wall_time=float(s), value=s / 10) for s in steps]


@pytest.mark.parametrize("steps, gap, expected_steps", [
    ([100, 200, 300], 0, [100, None, 300]),
    ([100, 200, 300], 5, [100, None, 300]),
    ([100, 200, 300], 10, [100, 190, 300]),
    ([100, 200, 300], 1000, [100, 190, 300]),
    ([95, 100, 180, 400], 0, [None, 100, None, None]),
    ([95, 100, 180, 400], 100, [None, 100, 150, 300]),
    ([300, 100], 0, [300, 100]),
])
def test_align_takes_the_exact_or_nearest_preceding_point(steps, gap,
                                                          expected_steps):
  points = _points(100, 150, 190, 300)
  aligned = align_metrics_to_checkpoints(steps, points, max_step_gap=gap)
  assert [p and p.step for p in aligned] == expected_steps


def test_align_refuses_negative_gap():
  with pytest.raises(ValueError, match="max_step_gap"):
    align_metrics_to_checkpoints([1], _points(1), max_step_gap=-1)


@pytest.mark.parametrize("weights, expected", [
    ([0.25] * 4, 4.0),
    ([1 / 7] * 7, 7.0),
    ([1.0, 0.0, 0.0], 1.0),
    ([0.5, 0.5, 0.0], 2.0),
    ([0.5, 0.25, 0.25], 1 / 0.375),
])
def test_effective_count(weights, expected):
  assert effective_count(weights) == pytest.approx(expected, rel=1e-12)


def test_weighting_does_not_import_tensorflow():
  code = ("import sys, t2t_avg.metrics.weighting, t2t_avg.metrics.events; "
          "sys.exit('tensorflow' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code], check=False,
                        timeout=120).returncode == 0
