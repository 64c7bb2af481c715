"""The greedy model soup: which candidates to keep, given a way to score one.

Model soups' greedy rule (Wortsman et al., 2022): order the candidates by
their own score, best first; start from the best; add each next one when the
uniform average of the soup and it scores at least as well as the soup.
Nothing here makes or evaluates an average: the caller's `score_soup` does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from absl import logging

from t2t_avg.metrics import points
from t2t_avg.errors import ArgumentError, AveragingError



@dataclasses.dataclass(frozen=True)
class SoupStep:
  """One row of the soup's table.

  Attributes:
    candidate: the candidate's index.
    own_score: its own score (NaN or None: not tried).
    soup_score: the score of the uniform average of the soup and it (for the
      first row, the starting soup's score); None when not tried.
    kept: whether it is in the soup.
  """
  candidate: int
  own_score: float | None
  soup_score: float | None
  kept: bool


@dataclasses.dataclass(frozen=True)
class SoupResult:
  """The candidates kept (ascending indices) and every step, in trial order."""
  kept: tuple[int, ...]
  steps: tuple[SoupStep, ...]


def plan_order(own_scores: Sequence[float | None], *, mode: str,
               newer: Sequence[int] | None = None) -> list[int]:
  """The order in which the greedy soup tries the candidates (for --dry_run).

  Args:
    own_scores: each candidate's own score; NaN, an infinity or None means
      none.
    mode: 'max' (higher is better) or 'min'.
    newer: one number per candidate, higher for newer (e.g. the step), to
      break ties; the index breaks the remaining ties (later first).

  Returns:
    Indices of the candidates with a score, best first, then those without
    one (never tried), in index order.

  Raises:
    ArgumentError: an unknown mode, or `newer` of the wrong length.
  """
  points.check_mode(mode)
  count = len(own_scores)
  if newer is None:
    newer = range(count)
  elif len(newer) != count:
    raise ArgumentError("{newer} has {given} values for {count} candidates",
                        given=len(newer), count=count)
  sign = 1.0 if mode == "max" else -1.0
  scored = [i for i in range(count) if points.is_valid(own_scores[i])]
  order = sorted(scored, key=lambda i: (sign * float(own_scores[i] or 0),
                                       newer[i], i), reverse=True)
  return order + [i for i in range(count) if not points.is_valid(own_scores[i])]


def greedy_soup(own_scores: Sequence[float | None], *, mode: str,
                tolerance: float,
                score_soup: Callable[[Sequence[int]], float],
                own_scores_from_command: bool,
                newer: Sequence[int] | None = None,
                names: Sequence[str] | None = None) -> SoupResult:
  """Runs the greedy soup over candidates of known own scores.

  Args:
    own_scores: each candidate's own score, oldest candidate first; NaN, an
      infinity or None: the candidate is not tried (a row, kept False).
    mode: 'max' (higher is better) or 'min'.
    tolerance: >= 0; a candidate is kept when the soup with it scores
      `>= soup - tolerance` (max) or `<= soup + tolerance` (min), and the
      soup's score becomes that score.
    score_soup: the score of the uniform average of the candidates at the
      given ascending indices; it must be finite (`evaluation.evaluate`
      raises otherwise).
    own_scores_from_command: True when the own scores came from the same
      scoring as `score_soup`, so the best one's own score is the starting
      soup's; False (e.g. logged metrics) scores the best alone first.
    newer: as for `plan_order`.
    names: each candidate's name for the log (default "candidate <index>").

  Returns:
    The kept candidates and one step per candidate, in trial order.

  Raises:
    ArgumentError: a tolerance < 0 (or NaN), an unknown mode.
    AveragingError: no candidate has an own score.
  """
  if not tolerance >= 0:
    raise ArgumentError("{greedy_tolerance} must be >= 0, not {tolerance}",
                        tolerance=tolerance)
  order = plan_order(own_scores, mode=mode, newer=newer)
  tried = [i for i in order if points.is_valid(own_scores[i])]
  if not tried:
    raise AveragingError(f"none of the {len(order)} candidates of the greedy "
                         "soup has a score of its own (all NaN, inf or "
                         "missing)")
  name = (lambda i: names[i]) if names is not None else "candidate {}".format
  best = tried[0]
  soup = [best]
  soup_score = (float(own_scores[best] or 0) if own_scores_from_command
                else score_soup([best]))
  steps = [_step(best, own_scores, soup_score, True, name)]
  for i in tried[1:]:
    score = score_soup(sorted(soup + [i]))
    kept = _at_least_as_good(score, soup_score, mode, tolerance)
    if kept:
      soup.append(i)
      soup_score = score
    steps.append(_step(i, own_scores, score, kept, name))
  steps += [_step(i, own_scores, None, False, name)
            for i in order[len(tried):]]
  _log_outcome(soup, len(tried), soup_score, name)
  return SoupResult(tuple(sorted(soup)), tuple(steps))




def _at_least_as_good(score: float, soup_score: float, mode: str,
                      tolerance: float) -> bool:
  if mode == "max":
    return score >= soup_score - tolerance
  return score <= soup_score + tolerance


def _step(candidate: int, own_scores: Sequence[float | None],
          soup_score: float | None, kept: bool,
          name: Callable[[int], str]) -> SoupStep:
  """The step's row, logged."""
  own = own_scores[candidate]
  if soup_score is None:
    logging.warning("Greedy soup: not trying %s, its own score is %s",
                    name(candidate), own)
  else:
    logging.info("Greedy soup: %s (own score %g): soup with it %g, %s",
                 name(candidate), own, soup_score,
                 "kept" if kept else "rejected")
  return SoupStep(candidate, own, soup_score, kept)


def _log_outcome(soup: list[int], tried: int, soup_score: float,
                 name: Callable[[int], str]) -> None:
  if len(soup) == 1 and tried > 1:
    logging.info("The greedy soup kept only the best single checkpoint, %s: "
                 "no average scored at least as well as it", name(soup[0]))
  else:
    logging.info("The greedy soup keeps %d of %d candidates (score %g): %s",
                 len(soup), tried, soup_score,
                 ", ".join(name(i) for i in sorted(soup)))
