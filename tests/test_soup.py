"""Tests of t2t_avg.inputs.greedy: the greedy rule, against hand-derived expectations."""
import logging
import math

from hypothesis import given, settings, strategies as st
import pytest

from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.inputs.greedy import SoupStep, greedy_soup, plan_order

NAN = math.nan


class Scorer:
  """score_soup from a function of the set of candidates; records its calls."""

  def __init__(self, score):
    self.score = score
    self.calls = []

  def __call__(self, indices):
    self.calls.append(list(indices))
    return self.score(frozenset(indices))


def _mean_with_bonus(quality, bonus, sign=1.0):
  """A soup scores the mean quality of its members plus `bonus` per extra
  member (minus, for a loss): averaging helps, a bad member hurts."""
  def score(members):
    mean = sum(quality[i] for i in members) / len(members)
    return mean + sign * bonus * (len(members) - 1)
  return score


# (mode, per-candidate quality, bad candidate). Every good candidate is
# within 0.03 of the best, so adding it gains more (bonus 0.02) than the mean
# loses; the bad one costs more than any bonus.
QUALITY_TABLES = [
    ("max", [0.80, 0.82, 0.81, 0.40, 0.79], 3),
    ("max", [0.10, 0.52, 0.53, 0.51, 0.54, 0.52], 0),
    ("min", [2.10, 2.12, 9.00, 2.11], 2),
    ("min", [3.00, 3.01, 3.02, 3.00, 8.50, 3.01, 3.02], 4),
]


@pytest.mark.parametrize("mode, quality, bad", QUALITY_TABLES)
@pytest.mark.parametrize("from_command", [True, False])
def test_soup_keeps_every_good_candidate_and_leaves_out_the_bad_one(
    mode, quality, bad, from_command):
  sign = 1.0 if mode == "max" else -1.0
  scorer = Scorer(_mean_with_bonus(quality, 0.02, sign))

  result = greedy_soup(quality, mode=mode, tolerance=0.0, score_soup=scorer,
                       own_scores_from_command=from_command)

  assert result.kept == tuple(i for i in range(len(quality)) if i != bad)
  assert [s.kept for s in result.steps] == [
      s.candidate != bad for s in result.steps]
  assert result.steps[-1].candidate == bad  # the worst is tried last


def _table(scores):
  """score_soup from a hand-written table {candidates: soup score}."""
  table = {frozenset(k): v for k, v in scores.items()}
  return Scorer(table.__getitem__)


def test_own_scores_from_the_command_are_not_evaluated_again():
  # Own scores 0.5, 0.7, 0.6: order 1, 2, 0.
  scorer = _table({(1, 2): 0.72, (0, 1, 2): 0.71})

  result = greedy_soup([0.5, 0.7, 0.6], mode="max", tolerance=0.0,
                       score_soup=scorer, own_scores_from_command=True)

  assert scorer.calls == [[1, 2], [0, 1, 2]]
  assert result.kept == (1, 2)
  assert result.steps == (SoupStep(1, 0.7, 0.7, True),
                          SoupStep(2, 0.6, 0.72, True),
                          SoupStep(0, 0.5, 0.71, False))


def test_own_scores_from_events_evaluate_the_best_alone_first():
  # Logged metrics (BLEU) are not the command's score (accuracy): the
  # starting soup is scored by the command.
  scorer = _table({(1,): 0.80, (1, 2): 0.79, (0, 1): 0.81})

  result = greedy_soup([25.0, 27.0, 26.0], mode="max", tolerance=0.0,
                       score_soup=scorer, own_scores_from_command=False)

  assert scorer.calls == [[1], [1, 2], [0, 1]]
  assert result.kept == (0, 1)
  assert result.steps == (SoupStep(1, 27.0, 0.80, True),
                          SoupStep(2, 26.0, 0.79, False),
                          SoupStep(0, 25.0, 0.81, True))


# (mode, tolerance, kept): own losses 1.0, 1.1, 1.2 (order 0, 1, 2); soups
# {0, 1} 1.004 (worse by 0.004), {0, 1, 2} 1.010 (worse by a further 0.006),
# {0, 2} 1.003.
@pytest.mark.parametrize("tolerance, kept, calls", [
    (0.0, (0,), [[0, 1], [0, 2]]),
    (0.003, (0, 2), [[0, 1], [0, 2]]),
    (0.005, (0, 1), [[0, 1], [0, 1, 2]]),
    (0.006, (0, 1, 2), [[0, 1], [0, 1, 2]]),
])
def test_tolerance_keeps_candidates_that_score_slightly_worse(tolerance, kept,
                                                               calls):
  scorer = _table({(0, 1): 1.004, (0, 1, 2): 1.010, (0, 2): 1.003})

  result = greedy_soup([1.0, 1.1, 1.2], mode="min", tolerance=tolerance,
                       score_soup=scorer, own_scores_from_command=True)

  assert result.kept == kept
  assert scorer.calls == calls


def test_an_equal_score_is_kept_at_zero_tolerance():
  scorer = _table({(0, 1): 0.5})

  result = greedy_soup([0.5, 0.4], mode="max", tolerance=0.0,
                       score_soup=scorer, own_scores_from_command=True)

  assert result.kept == (0, 1)


@pytest.mark.parametrize("own, mode, newer, order", [
    ([0.5, 0.5, 0.5], "max", None, [2, 1, 0]),
    ([0.5, 0.5, 0.5], "max", [100, 300, 200], [1, 2, 0]),
    ([0.5, 0.7, 0.5, 0.1], "max", [400, 300, 200, 100], [1, 0, 2, 3]),
    ([1.0, 0.2, 0.2, 0.3], "min", [10, 30, 20, 40], [1, 2, 3, 0]),
    ([0.2, NAN, 0.3, None, math.inf, 0.1], "min", None, [5, 0, 2, 1, 3, 4]),
    ([NAN, NAN], "max", None, [0, 1]),
    ([], "max", None, []),
])
def test_plan_order_is_best_first_ties_to_the_newer_unscored_last(
    own, mode, newer, order):
  assert plan_order(own, mode=mode, newer=newer) == order


def test_ties_start_the_soup_from_the_newer_checkpoint():
  scorer = _table({(0, 2): 0.6, (0, 1, 2): 0.59})

  result = greedy_soup([0.6, 0.6, 0.6], mode="max", tolerance=0.0,
                       score_soup=scorer, newer=[200, 100, 300],
                       own_scores_from_command=True)

  assert [s.candidate for s in result.steps] == [2, 0, 1]
  assert scorer.calls == [[0, 2], [0, 1, 2]]
  assert result.kept == (0, 2)


def test_candidates_without_an_own_score_are_not_tried(caplog):
  scorer = _table({(0, 2): 0.75})

  with caplog.at_level(logging.INFO):
    result = greedy_soup([0.7, NAN, 0.8, None], mode="max", tolerance=0.0,
                         score_soup=scorer, own_scores_from_command=True,
                         names=["a", "b", "c", "d"])

  assert scorer.calls == [[0, 2]]
  assert result.kept == (2,)
  not_tried = result.steps[2:]
  assert [(s.candidate, s.soup_score, s.kept) for s in not_tried] == [
      (1, None, False), (3, None, False)]
  assert math.isnan(not_tried[0].own_score) and not_tried[1].own_score is None
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert warnings == ["Greedy soup: not trying b, its own score is nan",
                      "Greedy soup: not trying d, its own score is None"]


def test_no_candidate_with_an_own_score_is_an_error():
  with pytest.raises(AveragingError, match=r"^none of the 3 candidates of "
                     r"the greedy soup has a score of its own"):
    greedy_soup([NAN, None, math.inf], mode="max", tolerance=0.0,
                score_soup=_table({}), own_scores_from_command=False)


def test_a_soup_of_only_the_best_says_so_in_the_log(caplog):
  scorer = _table({(0, 1): 0.69, (1, 2): 0.65})

  with caplog.at_level(logging.INFO):
    result = greedy_soup([0.6, 0.7, 0.5], mode="max", tolerance=0.0,
                         score_soup=scorer, own_scores_from_command=True,
                         names=["ckpt-100", "ckpt-200", "ckpt-300"])

  assert result.kept == (1,)
  messages = [r.getMessage() for r in caplog.records]
  assert ("The greedy soup kept only the best single checkpoint, ckpt-200: "
          "no average scored at least as well as it") in messages
  assert messages[:3] == [
      "Greedy soup: ckpt-200 (own score 0.7): soup with it 0.7, kept",
      "Greedy soup: ckpt-100 (own score 0.6): soup with it 0.69, rejected",
      "Greedy soup: ckpt-300 (own score 0.5): soup with it 0.65, rejected"]


@pytest.mark.parametrize("own", [[0.7], [0.7, NAN]])
def test_a_single_candidate_is_not_reported_as_a_failed_soup(own, caplog):
  with caplog.at_level(logging.INFO):
    result = greedy_soup(own, mode="max", tolerance=0.0,
                         score_soup=_table({}), own_scores_from_command=True)

  assert result.kept == (0,)
  assert not any("kept only" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs, message", [
    ({"tolerance": -0.1}, "greedy_tolerance must be >= 0, not -0.1"),
    ({"tolerance": NAN}, "greedy_tolerance must be >= 0, not nan"),
    ({"mode": "maximize"}, "metric_mode must be 'min' or 'max', not "
                           "'maximize'"),
    ({"newer": [1, 2]}, "newer has 2 values for 3 candidates"),
])
def test_bad_arguments_are_refused_naming_the_flag(kwargs, message):
  arguments = dict(mode="max", tolerance=0.0, score_soup=_table({}),
                   own_scores_from_command=True)
  arguments.update(kwargs)

  with pytest.raises(ArgumentError) as error:
    greedy_soup([0.1, 0.2, 0.3], **arguments)

  assert str(error.value) == message
  assert error.value.message(as_flags=True) == "--" + message


@settings(max_examples=300, deadline=None)
@given(data=st.data(), count=st.integers(1, 8),
       mode=st.sampled_from(["min", "max"]), from_command=st.booleans())
def test_property_soup_never_worse_than_its_start_and_follows_the_rule(
    data, count, mode, from_command):
  finite = st.floats(-100, 100, allow_nan=False)
  # An additive scoring: a soup scores the sum of its members' gains.
  gain = data.draw(st.lists(finite, min_size=count, max_size=count))
  scorer = Scorer(lambda members: math.fsum(gain[i] for i in sorted(members)))
  if from_command:
    own = [gain[i] for i in range(count)]
  else:
    own = data.draw(st.lists(finite, min_size=count, max_size=count))
  missing = data.draw(st.sets(st.integers(0, count - 1), max_size=count - 1))
  own = [NAN if i in missing else v for i, v in enumerate(own)]
  valid = count - len(missing)

  result = greedy_soup(own, mode=mode, tolerance=0.0, score_soup=scorer,
                       own_scores_from_command=from_command)

  sign = 1 if mode == "max" else -1
  best = result.steps[0].candidate
  final = scorer.score(frozenset(result.kept))
  assert sign * final >= sign * scorer.score(frozenset([best]))
  if from_command:
    assert all(sign * final >= sign * own[i] for i in range(count)
               if i not in missing)
  assert len(scorer.calls) == valid - 1 + (0 if from_command else 1)
  soup_score = result.steps[0].soup_score
  for step in result.steps[1:valid]:
    assert step.kept == (sign * step.soup_score >= sign * soup_score)
    if step.kept:
      soup_score = step.soup_score
  assert soup_score == final
  assert result.kept == tuple(sorted(s.candidate for s in result.steps
                                     if s.kept))


@pytest.mark.parametrize("tolerance, warned", [(0.0, False), (0.006, True)])
def test_tolerance_adding_up_past_the_best_alone_is_flagged(tolerance, warned,
                                                           caplog):
  # With 0.006, the soup {0, 1, 2} scores 1.010: each step lost at most the
  # tolerance, but together 0.010, worse than candidate 0 alone (1.0).
  scorer = _table({(0, 1): 1.004, (0, 1, 2): 1.010, (0, 2): 1.003})
  with caplog.at_level(logging.WARNING):
    greedy_soup([1.0, 1.1, 1.2], mode="min", tolerance=tolerance,
                score_soup=scorer, own_scores_from_command=True)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  expected = ("The greedy soup scores 1.01, worse than candidate 0 alone (1): "
              "a tolerance of 0.006 per step let its losses add up")
  assert warnings == ([expected] if warned else [])
