"""One-shot mode: choose the checkpoints, weigh them, average them."""
from __future__ import annotations

import os
from typing import Optional
from collections.abc import Sequence

from absl import logging

from t2t_avg import averaging
from t2t_avg import checkpoints as ckpts
from t2t_avg import events
from t2t_avg import metrics
from t2t_avg import options
from t2t_avg import weighting
from t2t_avg.metrics import MetricPoint
from t2t_avg.record import AveragingResult

def choose(inputs: options.InputOptions) -> list[str]:
  """The input prefixes, from `checkpoints` or the last N of a state file."""
  if inputs.checkpoints:
    return ckpts.from_list(inputs.checkpoints, inputs.prefix)
  return ckpts.last_n(inputs.prefix, inputs.num_last_checkpoints)


def read_points(settings: options.WeightingOptions) -> Optional[
    list[MetricPoint]]:
  """The metric's points, when event files are given; None otherwise.

  A metric that is read but not used to weigh is said so.
  """
  if not settings.metrics_from_events:
    return None
  points = events.read_metric(settings.metrics_from_events, settings.metric)
  if not settings.uses_metric:
    logging.warning(
        "--metrics_from_events is read and shown, but --weighting=%s does not "
        "use it; pass --weighting=softmax, rank, top_k or proportional to "
        "weigh by %s", settings.weighting, settings.metric)
  return points


def weigh(inputs: Sequence[ckpts.Checkpoint],
          settings: options.WeightingOptions) -> weighting.Weighing:
  """Reads the metric (if asked for) and weighs the checkpoints by it."""
  points = read_points(settings)
  mode = None
  if settings.uses_metric:
    mode = metrics.direction(settings.metric, settings.metric_mode)
  return weighting.weigh_checkpoints(inputs, points, settings, mode=mode)


def run(inputs: options.InputOptions, output: options.OutputOptions,
        averaging_options: options.AveragingOptions,
        weighting_options: options.WeightingOptions) -> AveragingResult:
  """The whole one-shot job, as `python -m t2t_avg` runs it."""
  summaries = (events.summaries_directory(os.path.dirname(output.output_path))
               if averaging_options.weight_summaries else None)
  chosen = [ckpts.load(p, averaging_options.step_from)
            for p in choose(inputs)]
  weighting_options.check_count(len(chosen))
  if not output.dry_run:  # A dry run shows them in its table.
    for c in chosen:
      logging.info("%s: step %s (from %s)", c.path, c.step, c.step_source)
  weighing = weigh(chosen, weighting_options)
  result = averaging.average_checkpoints(
      weighing.checkpoints, output.output_path, weights=weighing.weights,
      metrics=weighing.metrics, output_step=output.output_step,
      exclude_variables=averaging_options.exclude_variables,
      allow_nonfinite=averaging_options.allow_nonfinite,
      step_from=averaging_options.step_from, write_meta=output.write_meta,
      dry_run=output.dry_run, record_extra=weighing.record)
  if result.written and summaries:
    events.write_weight_summaries(summaries, result.rows,
                                  weighting_options.metric)
  return result
