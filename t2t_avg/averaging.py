"""The streaming engine: validate the inputs, average tensor by tensor, write atomically."""
import concurrent.futures
import dataclasses
import datetime
import math
import os
import re
import threading
import time
from typing import Optional, Sequence, Union

from absl import logging
import crc32c
import numpy as np
import tensorflow as tf

import t2t_avg
from t2t_avg import bundle
from t2t_avg import checkpoints
from t2t_avg import weighting
from t2t_avg import writer
from t2t_avg.checkpoints import Checkpoint
from t2t_avg.errors import AveragingError

_PROGRESS_SECONDS = 10.0
_CHUNK_BYTES = 8 << 20  # Read from each input per step.
_WORKERS = 2


@dataclasses.dataclass(frozen=True)
class CheckpointRow:
  """One input as averaged: where it is, its step, its weight."""
  path: str
  step: Optional[int]
  step_source: str
  weight: float
  metric: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class AveragingResult:
  """What was (or, for a dry run, would be) written."""
  output_path: str  # The output checkpoint prefix.
  written: bool
  rows: tuple
  effective_count: float
  record: dict


def average_checkpoints(
    paths: Sequence[Union[str, Checkpoint]],
    output_path: str,
    *,
    weights: Optional[Sequence[float]] = None,
    metrics: Optional[Sequence[Optional[float]]] = None,
    output_step: Union[str, int] = "zero",
    exclude_variables: str = "",
    allow_nonfinite: bool = False,
    step_from: str = "auto",
    write_meta: bool = False,
    dry_run: bool = False,
    update_state_file: bool = True,
    record_extra: Optional[dict] = None,
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
    exclude_variables: a regex; variables it matches (re.search) are left out.
    allow_nonfinite: average tensors that hold NaN or inf instead of refusing.
    step_from: 'auto', 'name' or a tensor key (see checkpoints.read_step).
    write_meta: also write a `.meta` graph of the bare variables (legacy).
    dry_run: validate and return the plan; write nothing.
    update_state_file: point the output directory's `checkpoint` file at the
      output (never done in a directory that holds input checkpoints).
    record_extra: more entries for the JSON record (metric tag, weighting).

  Returns:
    An AveragingResult.

  Raises:
    AveragingError: the inputs cannot be averaged (the message names the
      checkpoint and variable); nothing is left under the output name.
    ValueError: bad arguments.
  """
  if not paths:
    raise ValueError("no checkpoints to average")
  inputs, readers = _open(paths, step_from)
  specs = _validate_variables(inputs, readers)
  weights = _normalised(weights, len(inputs))
  newest = _newest(inputs, weights)
  step = _output_step(output_step, inputs, newest)
  output_prefix = f"{output_path}-{step}"
  _refuse_overwriting(output_prefix, inputs)
  exclude = _compile(exclude_variables)
  plan = _plan(specs, exclude)
  rows = tuple(
      CheckpointRow(c.path, c.step, c.step_source, w,
                    None if metrics is None else metrics[i])
      for i, (c, w) in enumerate(zip(inputs, weights)))
  count = weighting.effective_count(weights)
  record = _record(rows, count, output_prefix, step, exclude_variables, plan,
                   record_extra)
  result = AveragingResult(output_prefix, False, rows, count, record)
  _log_plan(result, newest, plan, exclude)
  if dry_run:
    return result

  try:
    with writer.CheckpointWriter(output_prefix) as out:
      _stream(plan, inputs, readers, weights, newest, step, allow_nonfinite,
              out)
      extra = []
      if write_meta:
        meta_tmp = out.temporary_path("meta")
        _write_meta(meta_tmp, plan)
        extra.append((meta_tmp, output_prefix + ".meta"))
      record_tmp = out.temporary_path("record.json")
      writer.write_json(record_tmp, record)
      extra.append((record_tmp, output_prefix + checkpoints.RECORD_SUFFIX))
      out.commit(extra_files=extra)
  except (OSError, tf.errors.OpError) as e:
    # Reading errors are AveragingErrors naming the input: this is the output.
    raise AveragingError(f"cannot write {output_prefix}: "
                         f"{getattr(e, 'strerror', None) or checkpoints.error_text(e)}"
                         ) from e
  if update_state_file:
    writer.update_state_file(os.path.dirname(output_prefix), output_prefix,
                             input_paths=[c.path for c in inputs])
  logging.info("Averaged checkpoint saved as %s; decode with "
               "--checkpoint_path=%s", output_prefix, output_prefix)
  return dataclasses.replace(result, written=True)


def _open(items, step_from):
  inputs, readers = [], []
  for item in items:
    path = item.path if isinstance(item, Checkpoint) else checkpoints.resolve(
        item)
    reader = checkpoints.open_reader(path)
    if not isinstance(item, Checkpoint):
      item = checkpoints.read_step(reader, path, step_from)
    inputs.append(item)
    readers.append(reader)
  seen = set()
  for c in inputs:
    if c.path in seen:
      raise AveragingError(f"checkpoint {c.path} is listed twice")
    seen.add(c.path)
  return inputs, readers


def _validate_variables(inputs, readers) -> dict:
  """The variables of the first checkpoint, checked against every other."""
  first = checkpoints.variable_specs(readers[0])
  for c, reader in zip(inputs[1:], readers[1:]):
    other = checkpoints.variable_specs(reader)
    for name in sorted(set(first) ^ set(other)):
      having, lacking = ((inputs[0].path, c.path) if name in first
                         else (c.path, inputs[0].path))
      raise AveragingError(f"variable {name} is in checkpoint {having} but "
                           f"not in {lacking}")
    for name, spec in first.items():
      if other[name].shape != spec.shape:
        raise AveragingError(
            f"variable {name} has shape {list(spec.shape)} in checkpoint "
            f"{inputs[0].path} but {list(other[name].shape)} in {c.path}")
      if other[name].dtype != spec.dtype:
        raise AveragingError(
            f"variable {name} has dtype {spec.dtype.name} in checkpoint "
            f"{inputs[0].path} but {other[name].dtype.name} in {c.path}")
  return first


def _normalised(weights, n) -> list:
  if weights is None:
    return [1.0 / n] * n
  weights = np.asarray(weights, np.float64)
  if weights.shape != (n,):
    raise ValueError(f"{weights.size} weights for {n} checkpoints")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0) or (
      weights.sum() <= 0):
    raise ValueError(f"weights must be finite, >= 0 and sum to more than 0: "
                     f"{weights.tolist()}")
  if abs(math.fsum(weights) - 1.0) <= 1e-12:
    # Already normalised (by weighting.compute_weights): dividing again by a
    # sum that is 1 only up to rounding would move the last bits.
    return weights.tolist()
  return (weights / weights.sum()).tolist()


def _output_step(output_step, inputs, newest) -> int:
  if output_step == "zero":
    return 0
  if output_step == "last":
    if inputs[newest].step is None:
      raise AveragingError(f"--output_step=last: the step of checkpoint "
                           f"{inputs[newest].path} is unknown (use "
                           "--step_from)")
    return inputs[newest].step
  if isinstance(output_step, int) and output_step >= 0:
    return output_step
  raise ValueError(f"--output_step must be 'zero', 'last' or an integer >= 0, "
                   f"not {output_step!r}")


def _refuse_overwriting(output_prefix, inputs) -> None:
  def norm(p):
    # realpath: an input reached through a symlinked directory is the same.
    return os.path.realpath(p) if writer.is_local(p) else p
  for c in inputs:
    if norm(c.path) == norm(output_prefix):
      raise AveragingError(f"output {output_prefix} is one of the input "
                           "checkpoints; choose another --output_path")
  writer.check_output_names(output_prefix)
  if checkpoints.exists(output_prefix) and not (
      checkpoints.is_output_of_this_tool(output_prefix)):
    raise AveragingError(f"output {output_prefix} already exists and was not "
                         "written by t2t_avg; remove it or choose another "
                         "--output_path")


def _newest(inputs, weights) -> int:
  """Index of the newest input averaged: highest step, ties to the last listed.

  Inputs of weight 0 (left out by top_k, a NaN metric, an explicit 0) do not
  count, so top_k's non-float tensors are those of a uniform run over the k.
  """
  active = [i for i, w in enumerate(weights) if w > 0]
  if any(inputs[i].step is None for i in active):
    return active[-1]
  return max(active, key=lambda i: (inputs[i].step, i))


def _compile(pattern):
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"--exclude_variables: bad regex {pattern!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class _Item:
  spec: checkpoints.VariableSpec
  action: str  # 'average', 'copy' (from the newest) or 'step' (output step)


def _plan(specs, exclude) -> list:
  items = []
  for name in sorted(specs):
    spec = specs[name]
    if exclude and exclude.search(name):
      continue
    if name == checkpoints.GLOBAL_STEP:
      action = "step"
    elif spec.dtype.is_floating:
      action = "average"
    else:
      action = "copy"
    items.append(_Item(spec, action))
  name_based = checkpoints.OBJECT_GRAPH_KEY not in specs
  wanted = not (exclude and exclude.search(checkpoints.GLOBAL_STEP))
  if checkpoints.GLOBAL_STEP not in specs and name_based and wanted:
    # Legacy always wrote an int64 global_step; T2T and Estimator read it.
    items.append(_Item(checkpoints.VariableSpec(
        checkpoints.GLOBAL_STEP, (), tf.int64), "step"))
  return items


def format_table(result: AveragingResult) -> str:
  """The checkpoints, steps, metric values and weights, as a text table."""
  width = max(len(r.path) for r in result.rows)
  lines = [f"{'checkpoint':<{width}}  {'step':>10}  {'metric':>12}  "
           f"{'weight':>8}"]
  for r in result.rows:
    metric = "-" if r.metric is None else f"{r.metric:.6g}"
    step = "?" if r.step is None else str(r.step)
    lines.append(f"{r.path:<{width}}  {step:>10}  {metric:>12}  "
                 f"{r.weight:>8.4f}")
  lines.append(f"effective number of checkpoints: {result.effective_count:.2f}"
               f" of {len(result.rows)}; output: {result.output_path}")
  return "\n".join(lines)


def _log_plan(result, newest, plan, exclude) -> None:
  logging.info("Averaging %d checkpoints (newest: %s):\n%s",
               sum(r.weight > 0 for r in result.rows),
               result.rows[newest].path, format_table(result))
  copied = [i.spec.name for i in plan if i.action == "copy"]
  if copied:
    logging.info("Copying %d non-float tensors from the newest checkpoint: %s",
                 len(copied), ", ".join(copied[:10]) +
                 (", ..." if len(copied) > 10 else ""))
  if exclude:
    logging.info("Leaving out variables matching %r", exclude.pattern)


def _stream(plan, inputs, readers, weights, newest, step, allow_nonfinite,
            out: writer.CheckpointWriter) -> None:
  """Computes every output tensor and hands it to the writer.

  Float tensors whose bytes can be located in every input's data files are
  averaged chunk by chunk straight from those files into the output's, by
  `_WORKERS` threads (numpy, file reads and crc32c release the GIL), so
  memory stays at a few chunks whatever the tensor and model size. The rest
  (non-float copies, the step, partitioned variables) go through TF's reader.
  """
  active = [i for i, w in enumerate(weights) if w > 0]
  sources = [_Source(inputs[i].path, readers[i],
                     bundle.read_entries(inputs[i].path)) for i in active]
  active_weights = (None if len({weights[i] for i in active}) == 1
                    else [weights[i] for i in active])
  direct = []
  for item in plan:
    spec = item.spec
    if item.action == "average" and all(s.locates(spec) for s in sources):
      direct.append(item)
      continue
    if item.action == "step":
      value = np.asarray(step, spec.dtype.as_numpy_dtype)
    elif item.action == "copy":
      value = checkpoints.read_tensor(readers[newest], inputs[newest].path,
                                      spec.name)
    else:
      value = _average(spec, sources, active_weights, allow_nonfinite)
    logging.debug("%s %s %s %s", item.action, spec.name, spec.dtype.name,
                  list(spec.shape))
    out.add(spec.name, value)
  # Largest first, so the two workers end close together.
  direct.sort(key=lambda item: -_nbytes(item.spec))
  progress = _Progress(sum(_nbytes(i.spec) for i in direct), len(sources))
  todo = iter(direct)
  lock, stop = threading.Lock(), threading.Event()

  def work():
    raw, files = None, {}
    try:
      while not stop.is_set():
        with lock:
          item = next(todo, None)
        if item is None:
          return
        if raw is None:
          raw = out.raw_piece()
        _average_direct(item.spec, sources, files, active_weights,
                        allow_nonfinite, raw, progress, stop)
    except _Stopped:
      return  # The other worker's error (or Ctrl-C) is the one to report.
    except BaseException:
      stop.set()
      raise
    finally:
      for f in files.values():
        f.close()
      if raw is not None:
        raw.close()

  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    futures = [pool.submit(work) for _ in range(_WORKERS)]
    try:
      while concurrent.futures.wait(futures, _PROGRESS_SECONDS).not_done:
        progress.log()
    except BaseException:  # Ctrl-C: stop the workers at their next chunk.
      stop.set()
      raise
    for future in futures:
      future.result()


class _Stopped(Exception):
  """A worker stops early because the other one failed or Ctrl-C was hit."""


@dataclasses.dataclass(frozen=True)
class _Source:
  """One input being averaged: its path, TF reader and raw tensor entries."""
  path: str
  reader: object
  entries: Optional[dict]

  def locates(self, spec) -> bool:
    entry = (self.entries or {}).get(spec.name)
    return entry is not None and entry.size == _nbytes(spec)


class _Progress:
  """Bytes averaged so far, logged every _PROGRESS_SECONDS."""

  def __init__(self, total: int, inputs: int):
    self._total, self._inputs = total, inputs
    self._done, self._start = 0, time.monotonic()
    self._lock = threading.Lock()

  def add(self, nbytes: int) -> None:
    with self._lock:
      self._done += nbytes

  def log(self) -> None:
    logging.info("Averaged %.0f of %.0f MB per checkpoint (%d checkpoints, "
                 "%.0f s)", self._done / 1e6, self._total / 1e6, self._inputs,
                 time.monotonic() - self._start)


def _average_direct(spec, sources, files, weights, allow_nonfinite,
                    raw: bundle.RawBundleWriter, progress: _Progress,
                    stop: threading.Event) -> None:
  """`_average`, chunk by chunk from the inputs' data files into `raw`.

  Each chunk is summed in float64 in checkpoint order and divided (or
  weighted) exactly as the whole tensor would be, so the bytes are the same;
  every input's crc32c is checked as its bytes stream past.
  """
  dtype = spec.dtype.as_numpy_dtype
  itemsize = np.dtype(dtype).itemsize
  count = _nbytes(spec) // itemsize
  step = max(1, _CHUNK_BYTES // itemsize)
  buffer = np.empty(min(step, count) * itemsize, np.uint8)
  total = np.empty(min(step, count), np.float64)
  scaled = None if weights is None else np.empty_like(total)
  result = np.empty(min(step, count), dtype)
  crcs = [0] * len(sources)
  entries = [s.entries[spec.name] for s in sources]
  raw.begin(spec.name, spec.dtype, spec.shape)
  for start in range(0, count, step):
    if stop.is_set():
      raise _Stopped()
    size = min(step, count - start)
    acc, chunk = total[:size], buffer[:size * itemsize]
    acc.fill(0)
    for i, entry in enumerate(entries):
      data_file = files.get(entry.data_file)
      if data_file is None:
        data_file = files[entry.data_file] = bundle.DataFile(entry.data_file)
      try:
        data_file.read_into(memoryview(chunk),
                            entry.offset + start * itemsize)
      except (AveragingError, OSError) as e:
        raise AveragingError(f"cannot read variable {spec.name} from "
                             f"checkpoint {sources[i].path}: {e}") from e
      crcs[i] = crc32c.crc32c(chunk, crcs[i])
      _accumulate(acc, chunk.view(dtype), None if weights is None else
                  weights[i], None if scaled is None else scaled[:size])
    _finish(acc, result[:size], spec, sources, weights, allow_nonfinite)
    raw.write(result[:size])
    progress.add(size * itemsize)
  for source, entry, crc in zip(sources, entries, crcs):
    if bundle.masked_crc(crc) != entry.crc:
      raise AveragingError(f"checkpoint {source.path} is corrupted: variable "
                           f"{spec.name} fails its checksum in "
                           f"{entry.data_file}")
  raw.end()


def _nbytes(spec) -> int:
  return int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.size


def _average(spec, sources, weights, allow_nonfinite):
  """float64 sum in checkpoint order, then / n (or weighted), cast once."""
  total = np.zeros(spec.shape, np.float64)
  for i, source in enumerate(sources):
    value = checkpoints.read_tensor(source.reader, source.path, spec.name)
    _accumulate(total, value, None if weights is None else weights[i])
  result = np.empty(spec.shape, spec.dtype.as_numpy_dtype)
  _finish(total, result, spec, sources, weights, allow_nonfinite)
  return result


def _accumulate(total, value, weight, scratch=None) -> None:
  """total += value (uniform) or weight * value, in float64, in place."""
  if weight is None:
    np.add(total, value, out=total)
  else:
    np.add(total, np.multiply(value, weight, out=scratch, dtype=np.float64),
           out=total)


def _finish(total, result, spec, sources, weights, allow_nonfinite) -> None:
  """Divides a uniform sum by n, refuses NaN/inf, casts once into `result`.

  The cast is numpy's (as legacy's feed of float64 into a typed placeholder):
  direct rounding to float16/float32, through float32 for bfloat16.
  """
  if weights is None:
    total /= len(sources)
  # A sum of finite values read from float32 or narrower cannot overflow
  # float64, so one sum finds any NaN or inf; the exact test only runs then.
  if not allow_nonfinite and not np.isfinite(total.sum()) and not (
      np.isfinite(total).all()):
    _raise_nonfinite(spec, sources)
  np.copyto(result, total, casting="unsafe")


def _raise_nonfinite(spec, sources):
  for source in sources:
    value = checkpoints.read_tensor(source.reader, source.path, spec.name)
    if not np.isfinite(value).all():
      raise AveragingError(
          f"variable {spec.name} in checkpoint {source.path} holds NaN or inf "
          "(pass --allow_nonfinite to average it anyway)")
  raise AveragingError(f"variable {spec.name}: the average is not finite")


def _write_meta(path, plan) -> None:
  """A `.meta` graph of the bare variables, as legacy T2T wrote."""
  graph = tf.Graph()
  with graph.as_default():
    var_list = {}
    for i, item in enumerate(plan):
      spec = item.spec
      op_name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", spec.name).lstrip("_./-")
      var_list[spec.name] = tf.compat.v1.get_variable(
          op_name or f"variable_{i}", shape=spec.shape, dtype=spec.dtype,
          initializer=tf.compat.v1.zeros_initializer(), use_resource=False)
    saver = tf.compat.v1.train.Saver(var_list)
    saver.export_meta_graph(path)


def _record(rows, count, output_prefix, step, exclude_pattern, plan,
            extra) -> dict:
  record = {
      "t2t_avg_version": t2t_avg.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "output": output_prefix,
      "output_step": step,
      "inputs": [dataclasses.asdict(r) for r in rows],
      "effective_count": count,
      "averaged_variables": sum(i.action == "average" for i in plan),
      "copied_variables": sum(i.action == "copy" for i in plan),
      "exclude_variables": exclude_pattern,
  }
  record.update(extra or {})
  return record
