"""Metric values to checkpoint weights: pure functions, no TensorFlow.

Each scheme is one small function in `_SCHEMES`, from the valid metric
values (and how good each is) to unnormalised weights.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Optional
from collections.abc import Callable, Sequence

from absl import logging
import numpy as np

from t2t_avg.metrics import keras_logs
from t2t_avg.metrics import points as metric_points
from t2t_avg import options
from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.metrics.points import MetricPoint

# The schemes with a formula; a greedy soup's weights come from evaluating
# averages (see `greedy`).
SCHEMES = tuple(s for s in options.SCHEMES if s != "greedy")
METRIC_SCHEMES = options.METRIC_SCHEMES
MODES = metric_points.MODES


@dataclasses.dataclass(frozen=True)
class Weighing:
  """The checkpoints to average, with their weights and metric values."""
  checkpoints: tuple  # of checkpoints.Checkpoint
  weights: tuple
  metrics: Optional[tuple]  # one value (or None) per checkpoint, or no metric
  record: dict  # for the JSON record: scheme, metric tag, details


def weigh_checkpoints(checkpoints: Sequence, points: Optional[Sequence[
    MetricPoint]], settings: options.WeightingOptions, *,
                      mode: Optional[str] = None) -> Weighing:
  """Matches metric points to checkpoints by step and weighs the checkpoints.

  Args:
    checkpoints: `Checkpoint`s (path, step), in averaging order.
    points: the metric's points, or None when no events were given.
    settings: the weighting settings.
    mode: 'min' or 'max', the metric's direction (resolved by the caller);
      needed by the metric schemes.

  Returns:
    A Weighing; under `missing_metric='skip'` its checkpoints are those
    that have a metric.

  Raises:
    AveragingError: a checkpoint without a metric (under 'error'; the
      message lists the steps that have one), or without a step.
  """
  given = list(checkpoints)
  checkpoints, values = given, None
  if points is not None:
    checkpoints, aligned = _align(given, points, settings)
    values = tuple(None if p is None else p.value for p in aligned)
  weights, details = compute_weights(
      values, scheme=settings.weighting, mode=mode or "min",
      temperature=settings.temperature, top_k=settings.top_k,
      explicit=settings.weights, steps=[c.step for c in checkpoints])
  record: dict = {"weighting": details}
  if points is not None:
    record["metric"] = {"tag": settings.metric, "mode": mode,
                        "max_step_gap": settings.max_step_gap}
    kept = {id(c) for c in checkpoints}
    left_out = [{"path": c.path, "step": c.step} for c in given
                if id(c) not in kept]
    if left_out:  # Under missing_metric='skip'.
      record["left_out"] = left_out
  return Weighing(tuple(checkpoints), tuple(weights), values, record)


def _align(checkpoints: list, points: Sequence[MetricPoint],
           settings: options.WeightingOptions) -> tuple[list, list]:
  """The checkpoints (those with a metric, under 'skip') and their points.

  A checkpoint's position on the metric's step axis depends on what the
  metric's steps count (training steps, Keras epochs or iterations): see
  `keras_logs.checkpoint_positions`.
  """
  kind = points[0].kind if points else metric_points.STEP
  positions = keras_logs.checkpoint_positions(checkpoints, kind, log=True)
  aligned = align_metrics_to_checkpoints(
      positions, points, max_step_gap=settings.max_step_gap)
  if not settings.uses_metric:
    return checkpoints, aligned
  missing = [(c, at) for c, at, p in zip(checkpoints, positions, aligned)
             if p is None]
  tag = settings.metric
  if missing and settings.missing_metric == "error":
    c, at = missing[0]
    raise AveragingError(
        "no {tag} metric at {at} (checkpoint {path}, {max_step_gap}={gap}); "
        "{axis} with one: {steps} (or pass {missing_metric}=skip)", tag=tag,
        at=keras_logs.position_text(kind, at), path=c.path,
        gap=settings.max_step_gap, axis=keras_logs.AXES[kind],
        steps=_steps_text(points))
  for c, at in missing:
    logging.warning("Leaving out checkpoint %s: no %s metric at %s", c.path,
                    tag, keras_logs.position_text(kind, at))
  kept = [(c, p) for c, p in zip(checkpoints, aligned) if p is not None]
  if not kept:
    raise AveragingError(f"no checkpoint has a {tag} metric")
  return [c for c, _ in kept], [p for _, p in kept]


def _steps_text(points: Sequence[MetricPoint], most: int = 20) -> str:
  steps = [str(p.step) for p in points]
  if len(steps) > most:
    steps = steps[:most // 2] + ["..."] + steps[-most // 2:]
  return ", ".join(steps) if steps else "none"


def align_metrics_to_checkpoints(
    steps: Sequence[int], points: Sequence[MetricPoint], *,
    max_step_gap: int = 0) -> list[Optional[MetricPoint]]:
  """Finds the metric point that belongs to each checkpoint.

  Args:
    steps: the checkpoints' steps.
    points: metric points, one per step (as `events.read_metric` returns).
    max_step_gap: 0: only a point logged at the checkpoint's exact step
      counts; g > 0: the nearest point with a step in [step - g, step].

  Returns:
    One point or None per checkpoint, in the order of `steps`.

  Raises:
    ArgumentError: `max_step_gap` < 0.
  """
  if max_step_gap < 0:
    raise ArgumentError("{max_step_gap} must be >= 0, not {g}",
                        g=max_step_gap)
  by_step = {point.step: point for point in points}
  known = sorted(by_step)
  aligned: list[Optional[MetricPoint]] = []
  for step in steps:
    i = bisect.bisect_right(known, step)  # known[i - 1] <= step < known[i]
    if i and step - known[i - 1] <= max_step_gap:
      aligned.append(by_step[known[i - 1]])
    else:
      aligned.append(None)
  return aligned


@dataclasses.dataclass(frozen=True)
class _Values:
  """Metric values as the schemes see them."""
  values: np.ndarray  # float64, NaN where missing
  valid: np.ndarray  # bool: finite
  goodness: np.ndarray  # higher is better; -inf where not valid
  steps: Optional[Sequence[int]]
  mode: str


def compute_weights(
    values: Optional[Sequence[Optional[float]]], *, scheme: str, mode: str,
    temperature: float = 0.0, top_k: int = 0,
    explicit: Optional[Sequence[float]] = None,
    steps: Optional[Sequence[int]] = None) -> tuple[list[float], dict]:
  """Turns per-checkpoint metric values into weights that sum to 1.

  Schemes, where "better" follows `mode`:
    uniform: 1/n each; `values` only give n and are otherwise ignored (so a
      NaN metric does not change a uniform average).
    softmax: w ∝ exp(-|v - best| / T), T in the metric's units; T = 0 means
      the population standard deviation of the valid values (uniform when
      they are all equal).
    proportional: w ∝ v (max) or 1/v (min); every valid value must be > 0.
    rank: the best of n valid values gets n, the worst 1; ties share the mean
      of their ranks.
    top_k: the best k get exactly 1/k each, ties going to the newer
      checkpoint (larger step, then later position). Averaging engines should
      treat this as a uniform average over the selected checkpoints (sum,
      then divide by k) so that the result is bit-identical to a uniform run
      over those k.
    explicit: `explicit` normalised; `values` are ignored (may be None).

  In the metric-based schemes (softmax, proportional, rank, top_k) a NaN,
  inf or None value gives its checkpoint weight 0, with a warning.

  Args:
    values: one metric value per checkpoint (None for uniform/explicit is
      allowed when `steps` or `explicit` give the count).
    scheme: one of `SCHEMES`.
    mode: 'min' (lower is better) or 'max'; used by the metric-based schemes.
    temperature: softmax temperature, >= 0.
    top_k: number of checkpoints selected by top_k.
    explicit: one weight per checkpoint for explicit, each finite and >= 0.
    steps: the checkpoints' steps, to name them in warnings and break top_k
      ties.

  Returns:
    (weights as Python floats in checkpoint order, details for the log and
    the JSON record: the scheme and, where they apply, `temperature`,
    `top_k`, `selected`, and `excluded`, the positions given weight 0 for an
    invalid value).

  Raises:
    ArgumentError: unknown scheme or mode, a bad temperature or top_k,
      explicit weights of the wrong count, not finite and >= 0, or summing
      to 0; no checkpoints.
    AveragingError: no valid metric value; non-positive values for
      proportional; weights that overflow.
  """
  if scheme not in SCHEMES:
    raise ArgumentError("{weighting} must be one of {schemes}, not {scheme!r}",
                        schemes=", ".join(SCHEMES), scheme=scheme)
  n = _count(values, steps, explicit)
  if scheme == "uniform":
    return _normalised(np.ones(n)), {"scheme": scheme}
  if scheme == "explicit":
    given = options.check_weights(explicit or (), n)
    return _normalised(np.asarray(given)), {"scheme": scheme}
  metric = _valid(values, n, scheme=scheme, mode=mode, steps=steps)
  weights, details = _SCHEMES[scheme](metric, temperature=temperature,
                                      top_k=top_k)
  details = {"scheme": scheme,
             "excluded": [int(i) for i in np.flatnonzero(~metric.valid)],
             **details}
  if scheme == "top_k":
    return weights.tolist(), details  # Exactly 1/k: already normalised.
  with np.errstate(all="ignore"):
    result = _normalised(weights)
  if not (all(math.isfinite(w) for w in result) and
          math.isclose(math.fsum(result), 1.0)):
    # Metric values near the limits of float64 (e.g. 1e300) overflow.
    valid = metric.values[metric.valid]
    raise AveragingError(
        "{scheme} weighting overflows with metric values between {low:g} "
        "and {high:g}; use {weighting}=rank or top_k", scheme=scheme,
        low=np.min(valid), high=np.max(valid))
  return result, details


def _count(values: Optional[Sequence], steps: Optional[Sequence],
           explicit: Optional[Sequence]) -> int:
  for given in (values, steps, explicit):
    if given is not None:
      if not len(given):
        raise ArgumentError("no checkpoints to weigh")
      return len(given)
  raise ArgumentError("compute_weights needs values, steps or explicit weights")


def _valid(values: Optional[Sequence[Optional[float]]], n: int, *,
           scheme: str, mode: str,
           steps: Optional[Sequence[int]]) -> _Values:
  metric_points.check_mode(mode)
  if values is None:
    raise ArgumentError("{weighting}={scheme} needs metric values",
                        scheme=scheme)
  if steps is not None and len(steps) != n:
    raise ArgumentError("{count} steps given for {n_values} checkpoints",
                        count=len(steps), n_values=n)
  v = np.asarray([np.nan if x is None else x for x in values], np.float64)
  valid = np.isfinite(v)
  for i in np.flatnonzero(~valid).tolist():
    logging.warning("Checkpoint %d%s has metric value %s: weight 0", i,
                    f" (step {steps[i]})" if steps is not None else "",
                    values[i])
  if not valid.any():
    raise AveragingError(f"No valid metric value among {n} checkpoints "
                         "(all NaN, inf or missing)")
  goodness = np.where(valid, v if mode == "max" else -v, -np.inf)
  return _Values(v, valid, goodness, steps, mode)


def _softmax(m: _Values, *, temperature: float,
             **_: object) -> tuple[np.ndarray,
                                                               dict]:
  if not temperature >= 0:  # also refuses NaN
    raise ArgumentError("{temperature} must be >= 0, not {t}", t=temperature)
  if temperature == 0:
    temperature = float(np.std(m.values[m.valid]))
    logging.info("Softmax temperature = std of the metric values = %g",
                 temperature)
  weights = np.zeros(len(m.values))
  if temperature == 0:  # All valid values are equal.
    weights[m.valid] = 1.0
  else:
    weights[m.valid] = np.exp((m.goodness[m.valid] - m.goodness.max()) /
                              temperature)
  return weights, {"temperature": temperature}


def _proportional(m: _Values, **_: object) -> tuple[np.ndarray, dict]:
  valid = m.values[m.valid]
  if (valid <= 0).any():
    raise AveragingError(
        "Proportional weighting needs metric values > 0, got {low:g}; use "
        "{weighting}=softmax or rank", low=min(valid))
  weights = np.zeros(len(m.values))
  weights[m.valid] = valid if m.mode == "max" else 1.0 / valid
  return weights, {}


def _rank(m: _Values, **_: object) -> tuple[np.ndarray, dict]:
  _unique, inverse, counts = np.unique(m.goodness[m.valid],
                                       return_inverse=True,
                                       return_counts=True)
  upper = np.cumsum(counts)  # Ascending goodness: the worst group has rank 1.
  weights = np.zeros(len(m.values))
  weights[m.valid] = (upper - (counts - 1) / 2)[inverse]
  return weights, {}


def _top_k(m: _Values, *, top_k: int, **_: object) -> tuple[np.ndarray, dict]:
  count = int(m.valid.sum())
  if not 1 <= top_k <= count:
    raise ArgumentError("{top_k} must be between 1 and {count} (checkpoints "
                        "with a valid metric), not {k}", count=count, k=top_k)
  n = len(m.values)
  newer = m.steps if m.steps is not None else range(n)
  order = sorted(range(n), key=lambda i: (m.goodness[i], newer[i], i),
                 reverse=True)
  selected = sorted(order[:top_k])
  weights = np.zeros(n)
  weights[selected] = 1.0 / top_k
  return weights, {"top_k": top_k, "selected": selected}


_SCHEMES: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {
    "softmax": _softmax,
    "proportional": _proportional,
    "rank": _rank,
    "top_k": _top_k,
}


def _normalised(weights: np.ndarray) -> list[float]:
  return (weights / weights.sum()).tolist()


def effective_count(weights: Sequence[float]) -> float:
  """The effective number of checkpoints averaged, (sum w)^2 / sum w^2.

  That is 1 / sum(w^2) for normalised weights: n for a uniform average, 1
  when one checkpoint has all the weight.

  Raises:
    ArgumentError: no weights, or all zero.
  """
  w = np.asarray(weights, dtype=np.float64)
  squares = float(np.sum(w * w))
  if squares == 0:
    raise ArgumentError("effective_count needs a non-zero weight")
  return float(np.sum(w)) ** 2 / squares
