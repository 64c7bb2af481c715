"""The library's averaging call: inputs → plan → streamed output, published atomically."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Optional, Union
from collections.abc import Iterator, Sequence

from absl import logging
import numpy as np

import t2t_avg
from t2t_avg.inputs import checkpoints
from t2t_avg.formats import meta_graph
from t2t_avg import options
from t2t_avg.engine import plan as planning
from t2t_avg import record as records
from t2t_avg.engine import streaming
from t2t_avg.metrics import weighting
from t2t_avg.files import publish
from t2t_avg.files import tf_loader
from t2t_avg.formats import state_file
from t2t_avg.inputs.checkpoints import Checkpoint
from t2t_avg.errors import ArgumentError, AveragingError, error_text
from t2t_avg.formats import base
from t2t_avg.files.paths import is_local
from t2t_avg.record import AveragingResult, CheckpointRow

__all__ = ["average_checkpoints", "AveragingResult", "CheckpointRow"]


def average_checkpoints(
    paths: Sequence[Union[str, Checkpoint]],
    output_path: str,
    *,
    weights: Optional[Sequence[float]] = None,
    metrics: Optional[Sequence[Optional[float]]] = None,
    output_step: options.OutputStep = "zero",
    exclude_variables: str = "",
    allow_nonfinite: bool = False,
    step_from: str = "auto",
    write_meta: bool = False,
    dry_run: bool = False,
    update_state_file: bool = True,
    record_extra: Optional[dict] = None,
    quiet: bool = False,
) -> AveragingResult:
  """Averages checkpoints into `<output_path>-<output step>`.

  Args:
    paths: checkpoint prefixes (or directories, meaning their latest
      checkpoint), or `Checkpoint`s whose steps are already known; the sum
      runs in this order, as legacy T2T's did.
    output_path: the output prefix before `-<step>`.
    weights: one per checkpoint, >= 0 with a positive sum, normalised here;
      None means uniform. Checkpoints of weight 0 are not read; when the
      others have equal weights the result is bit for bit the uniform average
      of those.
    metrics: the metric value per checkpoint, for the log and the record.
    output_step: 'zero' (legacy), 'last' (the step of the newest input with
      a weight above 0) or an int.
    exclude_variables: a regex; variables it matches (re.search) are left
      out, before the inputs are compared.
    allow_nonfinite: average tensors that hold NaN or inf instead of refusing.
    step_from: 'auto', 'name' or a tensor key (see `inputs.naming.read_step`).
    write_meta: also write a `.meta` graph of the bare variables (legacy).
    dry_run: validate and return the plan; write nothing.
    update_state_file: point the output directory's `checkpoint` file at the
      output (never done in a directory that holds input checkpoints).
    record_extra: more entries for the JSON record (metric tag, weighting).
    quiet: log nothing (a candidate average the caller scores and deletes).

  Returns:
    An AveragingResult.

  Raises:
    AveragingError: the inputs cannot be averaged (the message names the
      checkpoint and variable); nothing is left under the output name.
    ArgumentError: bad arguments.
  """
  if not paths:
    raise ArgumentError("no checkpoints to average")
  output_step = options.check_output_step(output_step)
  exclude = options.compile_exclude(exclude_variables)
  options.check_output_path(output_path)
  with _opened(paths, step_from) as inputs:
    fmt = _output_format(inputs, output_path, write_meta=write_meta)
    if fmt.checked_by_tensorflow and not dry_run:
      tf_loader.require(f"writing the TensorFlow checkpoint {output_path}")
    weights = _normalised(weights, len(inputs))
    active = [i for i, w in enumerate(weights) if w > 0]
    newest = checkpoints.newest_of(inputs, active)
    step = _output_step(output_step, inputs[newest])
    output_prefix = fmt.output_name(output_path, step)
    _refuse_overwriting(output_prefix, inputs, fmt)
    try:
      plan = planning.make_plan(inputs, newest, exclude=exclude, step=step)
    except AveragingError:  # Inputs that differ may be corrupted ones.
      streaming.check_integrity([c.opened for c in inputs])
      raise
    result = _planned_result(inputs, weights, metrics, plan, output_prefix,
                             exclude_variables, record_extra)
    if not quiet:
      planning.log_plan(plan, exclude)
    if dry_run:  # The caller shows the inputs' table.
      return result
    if not quiet:
      _log_inputs(result.rows, inputs[newest].path, output_prefix)
    uniform = len({weights[i] for i in active}) == 1
    _write(plan, [inputs[i] for i in active],
           None if uniform else [weights[i] for i in active],
           active.index(newest), output_prefix, result.record,
           allow_nonfinite=allow_nonfinite, write_meta=write_meta)
    if update_state_file and fmt.has_state_file:
      _update_state_file(output_prefix, [c.path for c in inputs])
    if not quiet:
      logging.info("Averaged checkpoint saved as %s; %s", output_prefix,
                   fmt.how_to_load(output_prefix))
    return dataclasses.replace(result, written=True)


@contextlib.contextmanager
def _opened(paths: Sequence[Union[str, Checkpoint]],
            step_from: str) -> Iterator[list[Checkpoint]]:
  """The inputs, opened; those opened here are closed again on the way out
  (a failed call leaves no file open: HDF5 refuses to reopen a file that is
  open with other locking flags)."""
  inputs = checkpoints.open_all(paths, step_from)
  try:
    yield inputs
  finally:
    for given, c in zip(paths, inputs):
      if not isinstance(given, Checkpoint) or given.source is None:
        c.opened.close()


def _planned_result(inputs: Sequence[Checkpoint], weights: Sequence[float],
                    metrics: Optional[Sequence[Optional[float]]],
                    plan: planning.Plan, output_prefix: str,
                    exclude_variables: str,
                    record_extra: Optional[dict]) -> AveragingResult:
  """The result (not yet written): a row per input and the JSON record."""
  rows = tuple(
      CheckpointRow(c.path, c.step, c.step_source, w,
                    None if metrics is None else metrics[i])
      for i, (c, w) in enumerate(zip(inputs, weights)))
  count = weighting.effective_count(weights)
  record = records.make_record(
      rows, effective_count=count, output_prefix=output_prefix,
      step=plan.step, exclude_variables=exclude_variables,
      averaged=plan.count(planning.Action.AVERAGE),
      copied=plan.count(planning.Action.COPY), version=t2t_avg.__version__,
      extra=record_extra)
  return AveragingResult(output_prefix, False, rows, count, record)


def _normalised(weights: Optional[Sequence[float]], n: int) -> list[float]:
  if weights is None:
    return [1.0 / n] * n
  values = options.check_weights(weights, n)
  if abs(math.fsum(values) - 1.0) <= 1e-12:
    # Already normalised (by weighting.compute_weights): dividing again by a
    # sum that is 1 only up to rounding would move the last bits.
    return list(values)
  array = np.asarray(values, np.float64)
  return (array / array.sum()).tolist()


def _output_step(output_step: options.OutputStep, newest: Checkpoint) -> int:
  if output_step == "zero":
    return 0
  if output_step == "last":
    if newest.step is None:
      raise AveragingError("{output_step}=last: the step of checkpoint "
                           "{path} is unknown (use {step_from})",
                           path=newest.path)
    return newest.step
  return int(output_step)


def _output_format(inputs: Sequence[Checkpoint], output_path: str, *,
                   write_meta: bool) -> base.Format:
  """The inputs' one format, which the output name and flags must suit."""
  fmt = _one_format(inputs)
  fmt.check_output_path(output_path)
  if write_meta and not fmt.has_state_file:
    raise ArgumentError("{write_meta} is for TF checkpoints, not {kind}",
                        kind=fmt.name)
  return fmt


def _one_format(inputs: Sequence[Checkpoint]) -> base.Format:
  fmt = inputs[0].opened.format
  for c in inputs[1:]:
    if c.opened.format != fmt:
      raise AveragingError(f"{inputs[0].path} is a {fmt.name} but {c.path} "
                           f"is a {c.opened.format.name}; average one format "
                           "at a time")
  return fmt


def _refuse_overwriting(output: str, inputs: Sequence[Checkpoint],
                        fmt: base.Format) -> None:
  def norm(p: str) -> str:
    # realpath: an input reached through a symlinked directory is the same.
    return os.path.realpath(p) if is_local(p) else p
  for c in inputs:
    if norm(c.path) == norm(output):
      raise AveragingError("output {output} is one of the input "
                           "checkpoints; choose another {output_path}",
                           output=output)
  publish.check_replaceable(_output_names(output, fmt))
  if fmt.exists(output) and not checkpoints.is_output_of_this_tool(output):
    raise AveragingError("output {output} already exists and was not "
                         "written by t2t_avg; remove it or choose another "
                         "{output_path}", output=output)


def _output_names(output: str, fmt: base.Format) -> list[str]:
  """Every file an output at this name has or may have."""
  return fmt.files(output) + [output + ".meta",
                              output + checkpoints.RECORD_SUFFIX]


def _log_inputs(rows: Sequence[CheckpointRow], newest: str,
                output_prefix: str) -> None:
  logging.info("Averaging %d checkpoints (newest: %s)",
               sum(r.weight > 0 for r in rows), newest)
  directory = os.path.dirname(output_prefix) or "."
  if any((os.path.dirname(r.path) or ".") == directory for r in rows):
    logging.warning(
        "The output %s goes among its input checkpoints in %s: whatever "
        "reads that directory (a trainer, a later average of its last "
        "checkpoints) may take it for a training checkpoint", output_prefix,
        directory)
  for r in rows:
    metric = "" if r.metric is None else f", metric {r.metric:.6g}"
    logging.info("  %s: step %s (from %s)%s, weight %.4f", r.path,
                 "?" if r.step is None else r.step, r.step_source, metric,
                 r.weight)


def _write(plan: planning.Plan, inputs: Sequence[Checkpoint],
           weights: Optional[list[float]], newest: int, output: str,
           record: dict, *, allow_nonfinite: bool, write_meta: bool) -> None:
  """Streams the output into a private directory, checks it, publishes it."""
  fmt = inputs[newest].opened.format
  try:
    with publish.Output(output) as out:
      # The output's own name, in a private directory (see make_sink).
      sink = fmt.make_sink(out.temporary_path(os.path.basename(output)),
                           plan.tensors, inputs[newest].opened)
      try:
        streaming.write_all(plan, inputs, weights, newest, sink,
                            allow_nonfinite=allow_nonfinite)
      except BaseException:
        sink.abort()
        raise
      sink.close()
      sink.verify()
      files = sink.publication(output)
      visible = files.pop()
      if write_meta:
        meta_graph.write(out.temporary_path("meta"), plan.tensors)
        files.append((out.temporary_path("meta"), output + ".meta"))
      publish.write_json(out.temporary_path("record.json"), record)
      files.append((out.temporary_path("record.json"),
                    output + checkpoints.RECORD_SUFFIX))
      # Replacing an earlier output: what makes it visible goes first, so a
      # crash never leaves new data under an old index.
      out.publish(files + [visible], fmt.files(output))
  except OSError as e:  # TF's errors too, as filesystem.GFileError
    # Reading errors are AveragingErrors naming the input: this is the output.
    reason = getattr(e, "strerror", None) or error_text(e)
    raise AveragingError(f"cannot write {output}: {reason}") from e


def _update_state_file(output_prefix: str, input_paths: Sequence[str]) -> None:
  """Lists the output last in its directory's state file, earlier ones kept.

  Never in a directory that holds input checkpoints (a training directory):
  TF1 `Saver` and `t2t-decoder` read that state file.
  """
  directory = os.path.dirname(output_prefix) or "."
  if checkpoints.holds_inputs(directory, input_paths, ignore=[output_prefix]):
    logging.warning("Not touching %s: that directory holds input checkpoints",
                    os.path.join(directory, checkpoints.STATE_FILE))
    return
  earlier = [p for p in state_file.listed_outputs(directory)
             if p != output_prefix and os.path.basename(p) != os.path.basename(
                 output_prefix) and checkpoints.exists(
                     os.path.join(directory, os.path.basename(p)))]
  state_file.write(directory, output_prefix, earlier + [output_prefix])
