"""Metric values to checkpoint weights: pure functions, no TensorFlow."""
import bisect
import dataclasses
import math
from typing import Optional, Sequence

from absl import logging
import numpy as np

from t2t_avg.errors import AveragingError
from t2t_avg.events import MetricPoint

SCHEMES = ("uniform", "softmax", "proportional", "rank", "top_k", "explicit")
METRIC_SCHEMES = ("softmax", "proportional", "rank", "top_k")
MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class Weighing:
  """The checkpoints to average, with their weights and metric values."""
  checkpoints: tuple  # of checkpoints.Checkpoint
  weights: tuple
  metrics: Optional[tuple]  # one value (or None) per checkpoint, or no metric
  record: dict  # for the JSON record: scheme, metric tag, details


def weigh_checkpoints(checkpoints: Sequence,
                      points: Optional[Sequence[MetricPoint]],
                      *, scheme: str, mode: str, tag: str = "",
                      temperature: float = 0.0, top_k: int = 0,
                      explicit: Optional[Sequence[float]] = None,
                      max_step_gap: int = 0,
                      missing_metric: str = "error") -> Weighing:
  """Matches metric points to checkpoints by step and weighs the checkpoints.

  Args:
    checkpoints: `Checkpoint`s (path, step), in averaging order.
    points: the metric's points, or None when no events were given.
    scheme, mode, temperature, top_k, explicit: as for `compute_weights`.
    tag: the metric's tag, for messages and the record.
    max_step_gap: as for `align_metrics_to_checkpoints`.
    missing_metric: 'error' or 'skip' (leave the checkpoint out, warn) for a
      checkpoint without a metric, under a metric-based scheme.

  Returns:
    A Weighing; under 'skip' its checkpoints are those that have a metric.

  Raises:
    AveragingError: a checkpoint without a metric (under 'error'; the
      message lists the steps that have one), or without a step.
  """
  checkpoints = list(checkpoints)
  metrics = None
  if points is not None:
    for c in checkpoints:
      if c.step is None:
        raise AveragingError(f"the step of checkpoint {c.path} is unknown, so "
                             "no metric can be matched to it (see --step_from)")
    aligned = align_metrics_to_checkpoints([c.step for c in checkpoints],
                                           points, max_step_gap=max_step_gap)
    if scheme in METRIC_SCHEMES:
      missing = [c for c, p in zip(checkpoints, aligned) if p is None]
      if missing and missing_metric == "error":
        raise AveragingError(
            f"no {tag} metric at step {missing[0].step} (checkpoint "
            f"{missing[0].path}, --max_step_gap={max_step_gap}); steps with "
            f"one: {_steps_text(points)} (or pass --missing_metric=skip)")
      for c in missing:
        logging.warning("Leaving out checkpoint %s: no %s metric at step %d",
                        c.path, tag, c.step)
      kept = [(c, p) for c, p in zip(checkpoints, aligned) if p is not None]
      if not kept:
        raise AveragingError(f"no checkpoint has a {tag} metric")
      checkpoints, aligned = [c for c, _ in kept], [p for _, p in kept]
    metrics = tuple(None if p is None else p.value for p in aligned)
  weights, details = compute_weights(
      metrics, scheme=scheme, mode=mode, temperature=temperature, top_k=top_k,
      explicit=explicit, steps=[c.step for c in checkpoints])
  record = {"weighting": details}
  if points is not None:
    record["metric"] = {"tag": tag, "mode": mode, "max_step_gap": max_step_gap}
  return Weighing(tuple(checkpoints), tuple(weights), metrics, record)


def _steps_text(points: Sequence[MetricPoint], most: int = 20) -> str:
  steps = [str(p.step) for p in points]
  if len(steps) > most:
    steps = steps[:most // 2] + ["..."] + steps[-most // 2:]
  return ", ".join(steps) if steps else "none"


def align_metrics_to_checkpoints(
    steps: Sequence[int], points: Sequence[MetricPoint], *,
    max_step_gap: int = 0) -> list[MetricPoint | None]:
  """Finds the metric point that belongs to each checkpoint.

  Args:
    steps: the checkpoints' steps.
    points: metric points, one per step (as `events.read_metric` returns).
    max_step_gap: 0: only a point logged at the checkpoint's exact step
      counts; g > 0: the nearest point with a step in [step - g, step].

  Returns:
    One point or None per checkpoint, in the order of `steps`.

  Raises:
    ValueError: `max_step_gap` < 0.
  """
  if max_step_gap < 0:
    raise ValueError(f"max_step_gap must be >= 0, not {max_step_gap}")
  by_step = {point.step: point for point in points}
  known = sorted(by_step)
  aligned = []
  for step in steps:
    i = bisect.bisect_right(known, step)  # known[i - 1] <= step < known[i]
    if i and step - known[i - 1] <= max_step_gap:
      aligned.append(by_step[known[i - 1]])
    else:
      aligned.append(None)
  return aligned


def compute_weights(
    values: Sequence[float | None] | None, *, scheme: str, mode: str,
    temperature: float = 0.0, top_k: int = 0,
    explicit: Sequence[float] | None = None,
    steps: Sequence[int] | None = None) -> tuple[list[float], dict]:
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
    `top_k`, and `excluded`, the positions given weight 0 for an invalid
    value).

  Raises:
    ValueError: unknown scheme or mode, a bad temperature or top_k, explicit
      weights of the wrong count, not finite and >= 0, or summing to 0; no
      checkpoints.
    AveragingError: no valid metric value; non-positive values for
      proportional.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown weighting {scheme!r}; expected one of "
                     f"{', '.join(SCHEMES)}")
  if values is not None:
    n = len(values)
  elif steps is not None:
    n = len(steps)
  elif explicit is not None:
    n = len(explicit)
  else:
    raise ValueError("compute_weights needs values, steps or explicit weights")
  if n == 0:
    raise ValueError("No checkpoints to weight")
  if scheme == "uniform":
    return _normalised(np.ones(n)), {"scheme": scheme}
  if scheme == "explicit":
    return _explicit(explicit, n), {"scheme": scheme}

  if mode not in MODES:
    raise ValueError(f"Unknown metric mode {mode!r}; expected 'min' or 'max'")
  if values is None:
    raise ValueError(f"Weighting {scheme!r} needs metric values")
  if steps is not None and len(steps) != n:
    raise ValueError(f"{len(steps)} steps given for {n} checkpoints")
  v = np.asarray(values, dtype=np.float64)  # None becomes NaN
  valid = np.isfinite(v)
  excluded = [i for i in range(n) if not valid[i]]
  for i in excluded:
    logging.warning("Checkpoint %d%s has metric value %s: weight 0", i,
                    f" (step {steps[i]})" if steps is not None else "",
                    values[i])
  if not valid.any():
    raise AveragingError(f"No valid metric value among {n} checkpoints "
                         "(all NaN, inf or missing)")
  goodness = np.where(valid, v if mode == "max" else -v, -np.inf)
  details = {"scheme": scheme, "excluded": excluded}
  weights = np.zeros(n)

  if scheme == "softmax":
    if not temperature >= 0:  # also refuses NaN
      raise ValueError(f"Softmax temperature must be >= 0, not {temperature}")
    if temperature == 0:
      temperature = float(np.std(v[valid]))
      logging.info("Softmax temperature = std of the metric values = %g",
                   temperature)
    details["temperature"] = temperature
    if temperature == 0:  # all valid values equal
      weights[valid] = 1.0
    else:
      weights[valid] = np.exp((goodness[valid] - goodness.max()) / temperature)
  elif scheme == "proportional":
    if (v[valid] <= 0).any():
      raise AveragingError(
          "Proportional weighting needs metric values > 0, got "
          f"{min(v[valid]):g}; use --weighting=softmax or rank")
    weights[valid] = v[valid] if mode == "max" else 1.0 / v[valid]
  elif scheme == "rank":
    _, inverse, counts = np.unique(goodness[valid], return_inverse=True,
                                   return_counts=True)
    upper = np.cumsum(counts)  # ascending goodness: worst group has rank 1..
    weights[valid] = (upper - (counts - 1) / 2)[inverse]
  else:  # top_k
    count = int(valid.sum())
    if not 1 <= top_k <= count:
      raise ValueError(f"top_k must be between 1 and {count} (checkpoints "
                       f"with a valid metric), not {top_k}")
    newer = steps if steps is not None else range(n)
    order = sorted(range(n), key=lambda i: (goodness[i], newer[i], i),
                   reverse=True)
    selected = sorted(order[:top_k])
    details.update(top_k=top_k, selected=selected)
    result = [0.0] * n
    for i in selected:
      result[i] = 1.0 / top_k
    return result, details
  with np.errstate(all="ignore"):
    result = _normalised(weights)
  if not (all(math.isfinite(w) for w in result) and
          math.isclose(math.fsum(result), 1.0)):
    # Metric values near the limits of float64 (e.g. 1e300) overflow.
    raise AveragingError(
        f"{scheme} weighting overflows with metric values between "
        f"{np.min(v[valid]):g} and {np.max(v[valid]):g}; use "
        "--weighting=rank or top_k")
  return result, details


def _explicit(explicit: Sequence[float] | None, n: int) -> list[float]:
  if explicit is None or len(explicit) != n:
    given = 0 if explicit is None else len(explicit)
    raise ValueError(f"{given} explicit weights given for {n} checkpoints")
  weights = np.asarray(explicit, dtype=np.float64)
  bad = [w for w in explicit if not (math.isfinite(w) and w >= 0)]
  if bad:
    raise ValueError(f"Explicit weights must be finite and >= 0, got {bad}")
  if weights.sum() <= 0:
    raise ValueError("Explicit weights sum to 0")
  return _normalised(weights)


def _normalised(weights: np.ndarray) -> list[float]:
  return (weights / weights.sum()).tolist()


def effective_count(weights: Sequence[float]) -> float:
  """The effective number of checkpoints averaged, (sum w)^2 / sum w^2.

  That is 1 / sum(w^2) for normalised weights: n for a uniform average, 1
  when one checkpoint has all the weight.

  Raises:
    ValueError: no weights, or all zero.
  """
  w = np.asarray(weights, dtype=np.float64)
  squares = float(np.sum(w * w))
  if squares == 0:
    raise ValueError("effective_count needs a non-zero weight")
  return float(np.sum(w)) ** 2 / squares
