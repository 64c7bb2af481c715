"""One-shot mode: choose the checkpoints, weigh them, average them, report."""
import os
from typing import Optional, Sequence, Union

from absl import logging

from t2t_avg import averaging
from t2t_avg import checkpoints as ckpts
from t2t_avg import events
from t2t_avg import safe_files
from t2t_avg import weighting


def choose(checkpoints: Optional[Sequence[str]], prefix: str,
           num_last: int) -> list:
  """The input prefixes, from `--checkpoints` or the last N of a state file."""
  if checkpoints:
    return ckpts.from_list(checkpoints, prefix)
  return ckpts.last_n(prefix, num_last)


def weigh(inputs: Sequence[ckpts.Checkpoint], *, scheme: str,
          explicit: Optional[Sequence[float]], event_sources: Sequence[str],
          tag: str, mode: str, temperature: float, top_k: int,
          max_step_gap: int, missing_metric: str) -> weighting.Weighing:
  """Reads the metric (if asked for) and weighs the checkpoints by it."""
  points = None
  if event_sources:
    points = events.read_metric(event_sources, tag)
    if mode == "auto" and scheme in weighting.METRIC_SCHEMES:
      mode = events.infer_direction(tag)
      logging.info("Metric %s: %s is better (from its name; override with "
                   "--metric_mode)", tag,
                   "lower" if mode == "min" else "higher")
  return weighting.weigh_checkpoints(
      inputs, points, scheme=scheme, mode=mode, temperature=temperature,
      top_k=top_k, explicit=explicit, max_step_gap=max_step_gap,
      missing_metric=missing_metric, tag=tag)


def run(*, checkpoints: Optional[Sequence[str]], prefix: str, num_last: int,
        output_path: str, output_step: Union[str, int], exclude_variables: str,
        allow_nonfinite: bool, step_from: str, write_meta: bool, dry_run: bool,
        weight_summaries: bool, **weighting_args) -> averaging.AveragingResult:
  """The whole one-shot job, as `python -m t2t_avg` runs it."""
  summaries = os.path.join(os.path.dirname(output_path), "t2t_avg")
  if weight_summaries and safe_files.is_local(summaries):
    safe_files.check_own_dir(summaries)
  inputs = [ckpts.load(p, step_from) for p in choose(checkpoints, prefix,
                                                       num_last)]
  for c in inputs:
    logging.info("%s: step %s (from %s)", c.path, c.step, c.step_source)
  weighing = weigh(inputs, **weighting_args)
  result = averaging.average_checkpoints(
      weighing.checkpoints, output_path, weights=weighing.weights,
      metrics=weighing.metrics, output_step=output_step,
      exclude_variables=exclude_variables, allow_nonfinite=allow_nonfinite,
      step_from=step_from, write_meta=write_meta, dry_run=dry_run,
      record_extra=weighing.record)
  if dry_run:
    print(averaging.format_table(result))
    return result
  if weight_summaries:
    events.write_weight_summaries(summaries, result.rows,
                                  weighting_args["tag"])
  return result
