"""Tests of t2t_avg.inputs.selection: tables of steps in, chosen indices out."""
import logging
import math

from hypothesis import given, settings, strategies as st
import pytest

from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.options import SelectionOptions
from t2t_avg.inputs.selection import (best_window, choose, last_n,
                               strided, within_bounds)

NAN = math.nan
INF = math.inf
FIVE = [1000, 2000, 3000, 4000, 5000]
TWELVE = [1000 * s for s in range(1, 13)]


@pytest.mark.parametrize("steps, min_step, max_step, expected", [
    (FIVE, None, None, [0, 1, 2, 3, 4]),
    (FIVE, 2000, 4000, [1, 2, 3]),
    (FIVE, 3000, 3000, [2]),
    (FIVE, 1000, 5000, [0, 1, 2, 3, 4]),
    (FIVE, 3500, 3600, []),
    (FIVE, 6000, None, []),
    (FIVE, None, 2500, [0, 1]),
    (FIVE, 4000, None, [3, 4]),
    (FIVE, 0, 0, []),
    ([0, 10], 0, 0, [0]),
    ([5000, 1000, 3000], 2000, None, [0, 2]),
    ([None, None, 7], None, None, [0, 1, 2]),
    ([], 1, 2, []),
])
def test_within_bounds_is_inclusive(steps, min_step, max_step, expected):
  options = SelectionOptions(min_step=min_step, max_step=max_step)

  assert within_bounds(steps, options) == expected


@pytest.mark.parametrize("names, min_step, max_step, message", [
    (None, 1000, None,
     "the step of the checkpoint at position 1 (0 = the oldest) is unknown, "
     "so --min_step=1000 cannot place it (see --step_from)"),
    (["a-1", "b", "c-3"], 1000, 2000,
     "the step of checkpoint b is unknown, so --min_step=1000 "
     "--max_step=2000 cannot place it (see --step_from)"),
    (None, None, 0,
     "the step of the checkpoint at position 1 (0 = the oldest) is unknown, "
     "so --max_step=0 cannot place it (see --step_from)"),
])
def test_an_unknown_step_cannot_be_bounded(names, min_step, max_step,
                                           message):
  options = SelectionOptions(min_step=min_step, max_step=max_step)

  with pytest.raises(AveragingError) as error:
    within_bounds([1000, None, 3000], options, names)

  assert error.value.message(as_flags=True) == message


@pytest.mark.parametrize("indices, stride, expected", [
    (range(10), 1, list(range(10))),
    (range(10), 3, [0, 3, 6, 9]),
    (range(10), 4, [1, 5, 9]),
    (range(10), 9, [0, 9]),
    (range(10), 10, [9]),
    (range(5), 50, [4]),
    ([2, 5, 7, 8], 2, [5, 8]),
    ([3], 2, [3]),
    ([], 3, []),
])
def test_strided_counts_back_from_the_newest(indices, stride, expected):
  assert strided(indices, stride) == expected


@pytest.mark.parametrize("indices, n, expected", [
    (range(5), 2, [3, 4]),
    (range(5), 1, [4]),
    (range(5), 5, [0, 1, 2, 3, 4]),
    (range(5), 9, [0, 1, 2, 3, 4]),
    ([4, 6, 9], 2, [6, 9]),
    ([], 3, []),
])
def test_last_n_is_the_newest_n(indices, n, expected):
  assert last_n(indices, n) == expected


# (values, n, mode, indices (None: all), steps, expected window)
BEST_WINDOWS = [
    ([1, 2, 5, 3, 4], 3, "max", None, None, [0, 1, 2]),
    ([5, 4, 1, 3, 2], 2, "min", None, None, [1, 2]),
    ([1, 2, 3, 9], 2, "max", None, None, [2, 3]),
    ([1, 2, 3, 9], 1, "max", None, None, [3]),
    ([1, 3, 2], None, "max", None, None, [0, 1]),
    # ties go to the newer
    ([1, 5, 2, 5, 3], 2, "max", None, None, [2, 3]),
    ([7, 7, 7], 2, "min", None, None, [1, 2]),
    ([5, 5, 1], 1, "max", None, [200, 100, 50], [0]),
    ([5, 5], 1, "max", None, [None, 100], [1]),
    # a None, NaN or infinity is never the best
    ([1, NAN, None, 2, INF], 2, "max", None, None, [2, 3]),
    ([3, -INF, 2, NAN], 2, "min", None, None, [1, 2]),
    ([None, 4, None], 3, "max", None, None, [0, 1]),
    # consecutive within the candidates given
    ([0, 1, 0, 3, 0, 9, 0, 2], 2, "max", [1, 3, 5, 7], None, [3, 5]),
    ([0, 1, 0, 3, 0, 9, 0, 2], 9, "max", [3, 5, 7], None, [3, 5]),
]


@pytest.mark.parametrize("values, n, mode, indices, steps, expected",
                         BEST_WINDOWS)
def test_best_window_ends_at_the_best(values, n, mode, indices, steps,
                                      expected):
  indices = range(len(values)) if indices is None else indices

  assert best_window(indices, values, n, mode, steps) == expected


def test_best_window_at_the_oldest_is_one_checkpoint_with_a_warning(caplog):
  with caplog.at_level(logging.INFO):
    window = best_window(range(4), [0.9, 0.1, 0.2, 0.3], 3, "max",
                         steps=[100, 200, 300, 400])

  assert window == [0]
  assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
      (logging.INFO, "--select=best_window: the best metric value, 0.9, is "
                     "at step 100; the window ending there holds 1 of 4 "
                     "checkpoints"),
      (logging.WARNING, "--select=best_window: only 1 checkpoints lead up to "
                        "the best, step 100: the window is shorter than 3")]


def test_best_window_without_a_valid_value_is_an_error():
  with pytest.raises(AveragingError) as error:
    # The one valid value is not among the candidates.
    best_window([0, 2], [NAN, 1.0, None], 2, "max")

  assert str(error.value) == ("no valid metric value among the 2 checkpoints "
                              "to find the best window in (all NaN, inf or "
                              "missing)")


@pytest.mark.parametrize("call, message", [
    (lambda: strided([1, 2], 0), "stride must be >= 1, not 0"),
    (lambda: strided([1, 2], -2), "stride must be >= 1, not -2"),
    (lambda: last_n([1, 2], 0), "num_last_checkpoints must be >= 1, not 0"),
    (lambda: best_window([0], [1.0], 0, "max"),
     "num_last_checkpoints must be >= 1, not 0"),
    (lambda: best_window([0], [1.0], 1, "best"),
     "metric_mode must be 'min' or 'max', not 'best'"),
])
def test_function_arguments_are_checked(call, message):
  with pytest.raises(ArgumentError) as error:
    call()

  assert str(error.value) == message


WINDOW_VALUES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize("options, n, expected", [
    ({}, 5, [7, 8, 9, 10, 11]),
    ({}, 12, list(range(12))),
    ({}, 40, list(range(12))),
    ({}, None, list(range(12))),
    ({"max_step": 5000}, 3, [2, 3, 4]),
    ({"max_step": 5000}, None, [0, 1, 2, 3, 4]),
    ({"min_step": 4000, "max_step": 4000}, 8, [3]),
    ({"min_step": 3000, "max_step": 9000, "stride": 2}, None, [2, 4, 6, 8]),
    ({"stride": 3}, 2, [8, 11]),
    ({"stride": 3}, 10, [2, 5, 8, 11]),
    ({"stride": 20}, 5, [11]),
    ({"min_step": 11500, "stride": 2}, 3, [11]),
    ({"select": "best_window"}, 3, [3, 4, 5]),
    ({"select": "best_window"}, None, [0, 1, 2, 3, 4, 5]),
    ({"select": "best_window", "max_step": 5000}, 2, [3, 4]),
    ({"select": "best_window", "min_step": 7000}, 3, [6]),
    ({"select": "best_window", "stride": 2}, 2, [3, 5]),
    ({"select": "best_window", "stride": 2, "min_step": 7000}, 3, [7]),
])
def test_choose_applies_bounds_then_stride_then_last_or_best(options, n,
                                                             expected):
  chosen = choose(TWELVE, options=SelectionOptions(**options), n=n,
                  values=WINDOW_VALUES, mode="max")

  assert chosen == expected


def test_choose_logs_one_line_per_step_that_leaves_something_out(caplog):
  options = SelectionOptions(min_step=3000, max_step=9000, stride=2)

  with caplog.at_level(logging.INFO):
    chosen = choose(TWELVE, options=options, n=3)

  assert chosen == [4, 6, 8]
  assert [r.getMessage() for r in caplog.records] == [
      "--min_step=3000 --max_step=9000 leaves 7 of 12 checkpoints",
      "--stride=2 leaves 4 of 7 checkpoints",
      "--num_last_checkpoints=3 leaves 3 of 4 checkpoints"]


def test_choose_logs_nothing_when_nothing_is_left_out(caplog):
  options = SelectionOptions(min_step=0, max_step=99000, stride=1)

  with caplog.at_level(logging.INFO):
    chosen = choose(TWELVE, options=options, n=12)

  assert chosen == list(range(12))
  assert not caplog.records


@pytest.mark.parametrize("options, n, expected", [
    ({}, 2, [1, 2]),
    ({"stride": 2}, None, [0, 2]),
])
def test_choose_without_bounds_needs_no_steps(options, n, expected):
  chosen = choose([None, None, None], options=SelectionOptions(**options),
                  n=n)

  assert chosen == expected


@pytest.mark.parametrize("steps, options, message", [
    (TWELVE, {"min_step": 13000},
     "no checkpoint has a step within --min_step=13000 (the steps run from "
     "1000 to 12000)"),
    (TWELVE, {"min_step": 3500, "max_step": 3900},
     "no checkpoint has a step within --min_step=3500 --max_step=3900 (the "
     "steps run from 1000 to 12000)"),
    ([], {}, "no checkpoints to choose from"),
    ([], {"max_step": 10}, "no checkpoints to choose from"),
    ([5, None], {"max_step": 10},
     "the step of checkpoint b is unknown, so --max_step=10 cannot place it "
     "(see --step_from)"),
])
def test_choose_refuses_when_nothing_is_left(steps, options, message):
  with pytest.raises(AveragingError) as error:
    choose(steps, options=SelectionOptions(**options), n=3,
           names=["a", "b"] if steps else None)

  assert error.value.message(as_flags=True) == message


@pytest.mark.parametrize("values, mode", [(None, "max"), ([1.0] * 12, None)])
def test_best_window_needs_values_and_a_mode(values, mode):
  with pytest.raises(ArgumentError) as error:
    choose(TWELVE, options=SelectionOptions(select="best_window"), n=3,
           values=values, mode=mode)

  assert error.value.message(as_flags=True) == (
      "--select=best_window needs metric values and a --metric_mode")


@pytest.mark.parametrize("kwargs, message, flags_message", [
    ({"min_step": -1}, "min_step must be >= 0, not -1",
     "--min_step must be >= 0, not -1"),
    ({"max_step": -5}, "max_step must be >= 0, not -5",
     "--max_step must be >= 0, not -5"),
    ({"min_step": 6000, "max_step": 5000},
     "min_step=6000 is above max_step=5000",
     "--min_step=6000 is above --max_step=5000"),
    ({"stride": 0}, "stride must be >= 1, not 0",
     "--stride must be >= 1, not 0"),
    ({"select": "best"}, "select must be 'last' or 'best_window', not 'best'",
     "--select must be 'last' or 'best_window', not 'best'"),
    ({"select": "{best}"},
     "select must be 'last' or 'best_window', not '{best}'",
     "--select must be 'last' or 'best_window', not '{best}'"),
])
def test_selection_options_refuse_bad_values(kwargs, message, flags_message):
  with pytest.raises(ArgumentError) as error:
    SelectionOptions(**kwargs)

  assert str(error.value) == message
  assert error.value.message(as_flags=True) == flags_message


@pytest.mark.parametrize("kwargs, is_default", [
    ({}, True),
    ({"stride": 1, "select": "last"}, True),
    ({"stride": 2}, False),
    ({"min_step": 0}, False),
    ({"max_step": 10**9}, False),
    ({"select": "best_window"}, False),
])
def test_is_default_only_without_any_selection_flag(kwargs, is_default):
  assert SelectionOptions(**kwargs).is_default is is_default


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.integers(0, 50), max_size=15, unique=True).map(sorted),
       low=st.none() | st.integers(0, 50), high=st.none() | st.integers(0, 50),
       stride=st.integers(1, 6), n=st.none() | st.integers(1, 8))
def test_property_choose_keeps_the_newest_within_bounds(steps, low, high,
                                                        stride, n):
  if low is not None and high is not None and low > high:
    low, high = high, low
  options = SelectionOptions(min_step=low, max_step=high, stride=stride)
  inside = [i for i, s in enumerate(steps)
            if (low is None or s >= low) and (high is None or s <= high)]
  if not inside:
    with pytest.raises(AveragingError):
      choose(steps, options=options, n=n)
    return

  chosen = choose(steps, options=options, n=n)

  assert chosen == sorted(set(chosen)) and set(chosen) <= set(inside)
  assert chosen[-1] == inside[-1]
  assert all((inside[-1] - i) % stride == 0 for i in chosen)
  expected = len(range(len(inside) - 1, -1, -stride))
  assert len(chosen) == (expected if n is None else min(n, expected))
