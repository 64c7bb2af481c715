"""One-shot mode: choose the checkpoints, weigh them, average them."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Optional

from absl import logging

from t2t_avg import formats
from t2t_avg.engine import averaging
from t2t_avg.errors import ArgumentError, Phrase
from t2t_avg.files import paths
from t2t_avg.inputs import naming
from t2t_avg.formats import base
from t2t_avg.inputs import checkpoints as ckpts
from t2t_avg.jobs import evaluation
from t2t_avg.metrics import events
from t2t_avg.jobs import soup
from t2t_avg.metrics import keras_logs
from t2t_avg.metrics import points as metric_points
from t2t_avg import options
from t2t_avg.inputs import selection
from t2t_avg.inputs import greedy
from t2t_avg.metrics import weighting
from t2t_avg.metrics.points import MetricPoint
from t2t_avg.record import AveragingResult


def choose(inputs: options.InputOptions,
           chooser: options.SelectionOptions = options.SelectionOptions(),
           *, name_pattern: str = "") -> list[str | ckpts.Checkpoint]:
  """The inputs: `checkpoints`' prefixes, or from a state file's directory.

  With the default selection, the last N of the state file (legacy); with
  selection flags, every checkpoint there, for `select_among` to choose from.
  Keras files found in a directory come opened (the caller closes them).
  """
  if inputs.checkpoints:
    return list(ckpts.from_list(inputs.checkpoints, inputs.prefix))
  return list(ckpts.choose_last(inputs.prefix, inputs.num_last_checkpoints
                                if chooser.is_default else None,
                                name_pattern=name_pattern))


def check_output_path(found: Sequence[str], inputs: options.InputOptions,
                      output_path: str) -> None:
  """Refuses an output name that is not the inputs' format, before any work,
  saying which inputs were taken and why.

  Raises:
    ArgumentError: e.g. a Keras name for TF checkpoints that a state file
      listed, or a TF prefix for Keras files.
  """
  kinds = {formats.format_named(p) for p in found}
  if len(kinds) != 1:
    return  # None, or several: averaging refuses to mix formats.
  fmt = kinds.pop()
  try:
    fmt.check_output_path(output_path)
  except ArgumentError:
    fmt.check_output_path(output_path, _taken(found, inputs, fmt))
    raise


def _taken(found: Sequence[str], inputs: options.InputOptions,
           fmt: base.Format) -> Phrase:
  """Which inputs were taken, and why (for a refused output name)."""
  names = [os.path.basename(p) for p in found]
  shown = ", ".join(names if len(names) <= 4 else
                    names[:2] + ["...", names[-1]])
  if inputs.checkpoints:
    return Phrase("named by {checkpoints}: {names}", names=shown)
  if not fmt.has_state_file:
    return Phrase("{names}, found by {prefix}={given}, with no state file "
                  "in its directory", names=shown, given=inputs.prefix)
  directory = os.path.dirname(inputs.prefix) or "."
  taken = Phrase(
      "{state_file} lists {names}: for {prefix}={given}, legacy T2T takes "
      "the checkpoints of the state file in its directory",
      state_file=os.path.join(directory, ckpts.STATE_FILE), names=shown,
      given=inputs.prefix)
  if paths.is_local(directory) and naming.look(directory).keras_files():
    taken = Phrase("{taken}; to average the Keras files there, name them "
                   "with {checkpoints}", taken=taken)
  return taken


def read_points(settings: options.WeightingOptions, *,
                selects: bool = False) -> Optional[list[MetricPoint]]:
  """The metric's points, when event files (or Keras CSV logs) are given;
  None otherwise.

  A metric that is read but used neither to weigh nor to select (`selects`:
  it chooses the best window) is said so.
  """
  if not settings.metrics_from_events:
    return None
  points = keras_logs.read_metric(settings.metrics_from_events,
                                  settings.metric)
  if not (settings.uses_metric or settings.weighting == "greedy" or selects):
    logging.warning(
        "--metrics_from_events is read and shown, but --weighting=%s does not "
        "use it; pass --weighting=softmax, rank, top_k or proportional to "
        "weigh by %s", settings.weighting, settings.metric)
  return points


def weigh(inputs: Sequence[ckpts.Checkpoint],
          settings: options.WeightingOptions, *,
          selects: bool = False) -> weighting.Weighing:
  """Reads the metric (if asked for) and weighs the checkpoints by it."""
  points = read_points(settings, selects=selects)
  mode = None
  if settings.uses_metric:
    mode = metric_points.direction(settings.metric, settings.metric_mode)
  return weighting.weigh_checkpoints(inputs, points, settings, mode=mode)


def select_among(pool: Sequence[ckpts.Checkpoint],
                 settings: options.OneShotSettings) -> list[ckpts.Checkpoint]:
  """The checkpoints the selection flags choose from `pool`."""
  values, mode = None, None
  if settings.selection.select == "best_window":
    mode = metric_points.direction(settings.weighting.metric,
                             settings.weighting.metric_mode)
    aligned = weighting.align_metrics_to_checkpoints(
        [c.step if c.step is not None else -1 for c in pool],
        read_points(settings.weighting, selects=True) or [],
        max_step_gap=settings.weighting.max_step_gap)
    values = [None if p is None else p.value for p in aligned]
  n = settings.inputs.num_last_checkpoints or None
  if settings.inputs.checkpoints:
    n = None
  chosen = selection.choose([c.step for c in pool],
                            options=settings.selection, n=n, values=values,
                            mode=mode, names=[c.path for c in pool])
  return [pool[i] for i in chosen]


def run(settings: options.OneShotSettings) -> AveragingResult:
  """The whole one-shot job, as `python -m t2t_avg` runs it."""
  output, averaging_options = settings.output, settings.averaging
  summaries = (events.summaries_directory(os.path.dirname(output.output_path))
               if averaging_options.weight_summaries else None)
  pool: list[ckpts.Checkpoint] = []
  found = choose(settings.inputs, settings.selection,
                 name_pattern=averaging_options.name_pattern)
  try:
    check_output_path([c if isinstance(c, str) else c.path for c in found],
                      settings.inputs, output.output_path)
    for item in found:
      pool.append(ckpts.load(item, averaging_options.step_from,
                             name_pattern=averaging_options.name_pattern))
    result = _run_on(pool, settings)
  finally:
    for c in pool:
      c.opened.close()
    for item in found[len(pool):]:  # Opened but not loaded (an error).
      if isinstance(item, ckpts.Checkpoint) and item.source is not None:
        item.source.close()
  if result.written and summaries:
    events.write_weight_summaries(summaries, result.rows,
                                  settings.weighting.metric)
  return result


def _run_on(pool: list[ckpts.Checkpoint],
            settings: options.OneShotSettings) -> AveragingResult:
  """Selects among the opened checkpoints, then weighs or soups them."""
  chosen = pool
  if not settings.selection.is_default:
    chosen = select_among(pool, settings)
  settings.weighting.check_count(len(chosen))
  if not settings.output.dry_run:  # A dry run shows them in its table.
    for c in chosen:
      logging.info("%s: step %s (from %s)", c.path, c.step, c.step_source)
  if settings.weighting.weighting == "greedy":
    return _greedy(chosen, settings)
  return _weighted(chosen, settings)


def _average(inputs: Sequence[ckpts.Checkpoint],
             settings: options.OneShotSettings, *,
             weights: Optional[Sequence[float]] = None,
             values: Optional[Sequence[Optional[float]]] = None,
             record: Optional[dict] = None) -> AveragingResult:
  output, averaging_options = settings.output, settings.averaging
  return averaging.average_checkpoints(
      inputs, output.output_path, weights=weights, metrics=values,
      output_step=output.output_step,
      exclude_variables=averaging_options.exclude_variables,
      allow_nonfinite=averaging_options.allow_nonfinite,
      step_from=averaging_options.step_from, write_meta=output.write_meta,
      dry_run=output.dry_run, record_extra=record)


def _weighted(chosen: Sequence[ckpts.Checkpoint],
              settings: options.OneShotSettings) -> AveragingResult:
  """A weighted (or uniform) average, scored by the eval command if given."""
  weighing = weigh(chosen, settings.weighting,
                   selects=settings.selection.select == "best_window")
  result = _average(weighing.checkpoints, settings, weights=weighing.weights,
                    values=weighing.metrics, record=weighing.record)
  if result.written and settings.evaluation is not None:
    _score_beside(weighing, result, settings)
  return result


def _score_beside(weighing: weighting.Weighing, result: AveragingResult,
                  settings: options.OneShotSettings) -> None:
  """Logs the average's score beside the best single's and the uniform's."""
  mode = metric_points.direction(settings.weighting.metric,
                           settings.weighting.metric_mode)
  inputs = list(weighing.checkpoints)
  assert settings.evaluation is not None
  with soup.Candidates(inputs, settings.output.output_path,
                         settings.evaluation, settings.averaging) as scorer:
    scores = [(f"this {settings.weighting.weighting} average",
               evaluation.evaluate(settings.evaluation, result.output_path,
                                   candidate=result.output_path))]
    if settings.weighting.weighting != "uniform":
      scores.append(("uniform average", scorer.score(range(len(inputs)))))
    best, how = _best_single(weighing, mode)
    scores.append((f"{how} single checkpoint, {inputs[best].path}",
                   scorer.score([best])))
  soup.log_comparison(scores, mode)


def _best_single(weighing: weighting.Weighing, mode: str) -> tuple[int, str]:
  """The best checkpoint by its logged metric, or else the newest."""
  values = weighing.metrics or ()
  valid = [i for i, v in enumerate(values) if metric_points.is_valid(v)]
  if not valid:
    return len(weighing.checkpoints) - 1, "last"
  sign = 1 if mode == "max" else -1
  return max(valid, key=lambda i: (sign * (values[i] or 0), i)), "best logged"


def _greedy(chosen: Sequence[ckpts.Checkpoint],
            settings: options.OneShotSettings) -> AveragingResult:
  """The greedy soup: its kept checkpoints' uniform average."""
  mode = metric_points.direction(settings.weighting.metric,
                           settings.weighting.metric_mode)
  points = read_points(settings.weighting)
  logged: Optional[list[Optional[float]]] = None
  if points is not None:  # Own scores from the logged metric.
    uniform = dataclasses.replace(settings.weighting, weighting="uniform",
                                  greedy_tolerance=0.0)
    logged = list(weighting.weigh_checkpoints(chosen, points, uniform).metrics
                  or [])
  if settings.output.dry_run:
    return _greedy_plan(chosen, settings, logged, mode)
  assert settings.evaluation is not None
  with soup.Candidates(chosen, settings.output.output_path,
                         settings.evaluation, settings.averaging) as scorer:
    own = logged if logged is not None else [
        scorer.score([i]) for i in range(len(chosen))]  # From the command.
    soup_result = soup.run_soup(
        chosen, own, scorer, mode=mode,
        tolerance=settings.weighting.greedy_tolerance,
        own_scores_from_command=points is None)
  logging.info("Greedy soup:\n%s", soup.soup_table(chosen, soup_result))
  kept = [chosen[i] for i in soup_result.kept]
  record = {"weighting": {"scheme": "greedy",
                          "tolerance": settings.weighting.greedy_tolerance,
                          "mode": mode,
                          "soup": soup.soup_record(chosen, soup_result)}}
  return _average(kept, settings, record=record)


def _greedy_plan(chosen: Sequence[ckpts.Checkpoint],
                 settings: options.OneShotSettings,
                 own: Optional[Sequence[Optional[float]]],
                 mode: str) -> AveragingResult:
  """A dry run of the soup: the order candidates would be tried in."""
  plan: dict = {"scheme": "greedy", "mode": mode}
  if own is None:
    plan["order"] = (f"each of the {len(chosen)} checkpoints scored alone by "
                     "--eval_command, then tried best first")
  else:
    order = greedy.plan_order(own, mode=mode,
                            newer=[c.step or 0 for c in chosen])
    plan["order"] = [chosen[i].path for i in order]
  return _average(chosen, settings, values=own, record={"weighting": plan})
