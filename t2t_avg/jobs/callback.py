"""The Keras 3 callback: snapshots → select → weigh → engine → restore, in `fit`.

At each chosen epoch's end the callback saves the model's weights
(`model.weights`, not the optimizer's state) into a private directory
beside the output (see `files.shared_dir`), keeping at most `last_n`, and
records the monitored value from `fit`'s own logs as a `MetricPoint`. With
`start_epoch` and no `last_n` it keeps a float64 running sum of the weights
in memory instead (`engine.running_sum`): no file per epoch, and the mean
equals the engine's uniform average of those epochs bit for bit. With
`directory=` it averages the files a `ModelCheckpoint` wrote there.

When training ends the engine writes the output and its JSON record, the
model is given the average (unless `restore=False`) and, with `bn_data`,
its BatchNormalization statistics are recomputed (then the output holds
them too). The optimizer's state is never changed. Only files and
`model.weights` are touched, so any Keras 3 backend works.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import weakref
from typing import Any, Optional
from collections.abc import Callable, Iterator, Sequence

from absl import logging
import keras
import numpy as np

from t2t_avg import options
from t2t_avg.engine import averaging
from t2t_avg.engine.running_sum import RunningSum
from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.files import publish
from t2t_avg.files import shared_dir
from t2t_avg.inputs import naming
from t2t_avg.inputs.checkpoints import Checkpoint
from t2t_avg.metrics import points as metric_points
from t2t_avg.metrics import weighting
from t2t_avg.metrics.points import EPOCH, MetricPoint
from t2t_avg.record import AveragingResult, CheckpointRow

WEIGHTS, ARCHIVE = options.KERAS_OUTPUT_SUFFIXES
# The metric comes from fit's logs, not from files: WeightingOptions only
# needs to know that there is a source.
_FIT_LOGS = "model.fit logs"
# The CLI's flag names the callback calls otherwise (Keras' own names).
_CALLERS_NAMES = {"metric": "monitor", "metric_mode": "mode"}
_EPOCH = "epoch"  # A snapshot's step source: the 1-based epoch.


def in_callers_words(error: ArgumentError) -> ArgumentError:
  """The error naming the callback's parameters (`monitor`, `mode`)."""
  template = error.template
  for flag, name in _CALLERS_NAMES.items():
    template = template.replace("{%s}" % flag, "{%s}" % name)
  return ArgumentError(template, **error.values)


class AverageCheckpoints(keras.callbacks.Callback):
  """Averages the weights of the last epochs (or every epoch from one on)
  when `fit` ends, writes the average and loads it into the model.

  Example:
    avg = AverageCheckpoints("ckpt/avg.weights.h5", last_n=5)
    model.fit(x, y, validation_data=(vx, vy), epochs=20, callbacks=[avg])
    # The model holds the average of epochs 16..20; so does the file.

  Put it after `EarlyStopping(restore_best_weights=True)` in the callback
  list: callbacks end in list order, and that one would replace the average
  by its best epoch. A KeyboardInterrupt leaves `fit` without ending its
  callbacks (on every backend): call `avg.on_train_end()` in your
  `except KeyboardInterrupt:` to average the epochs completed so far.
  """

  def __init__(self, output_path: str | os.PathLike, *,
               last_n: Optional[int] = None, weighting: str = "uniform",
               monitor: str = "val_loss", mode: str = "auto", top_k: int = 0,
               temperature: float = 0.0, start_epoch: Optional[int] = None,
               save_freq: int = 1, directory: Optional[str] = None,
               restore: bool = True, bn_data: Any = None,
               bn_batch_size: int = 32):
    """Checks every argument; nothing is written before `fit` starts.

    Args:
      output_path: the average, `.weights.h5` or `.keras` (a `.keras`
        output holds the model's config and the optimizer's state as
        training left it); its JSON record goes beside it.
      last_n: average the last N snapshots; None (with `start_epoch`): every
        epoch from `start_epoch` on, summed as training goes (SWA).
      weighting: 'uniform', 'softmax', 'rank', 'proportional' or 'top_k',
        by `monitor` (see the command line's `--weighting`).
      monitor: the key of `fit`'s logs to weigh by, e.g. 'val_loss'.
      mode: 'min', 'max', or 'auto' (from the name, as `--metric_mode`).
      top_k: with 'top_k', how many of the best snapshots to average.
      temperature: with 'softmax', in the metric's units; 0: the standard
        deviation of the values.
      start_epoch: the first epoch to average (1-based, as fit counts).
      save_freq: snapshot every this many epochs, from `start_epoch`.
      directory: average the files a `ModelCheckpoint` writes there
        (aligned with the logs by the `{epoch}` in their names) instead of
        snapshots of the callback's own.
      restore: load the average into the model when training ends.
      bn_data: inputs for one pass that recomputes the BatchNormalization
        moving statistics of the average (torch's `update_bn`): an array
        (taken in batches of `bn_batch_size`) or a finite iterable of
        batches, `x` or `(x, y, ...)`, such as a `tf.data.Dataset`.
      bn_batch_size: see `bn_data`.

    Raises:
      ArgumentError: naming the parameter at fault.
    """
    super().__init__()
    try:
      self._options = options.CallbackOptions(
          os.fspath(output_path), last_n=last_n, start_epoch=start_epoch,
          save_freq=save_freq, directory=directory, restore=restore,
          weighting=options.WeightingOptions(
              weighting=weighting, metrics_from_events=(_FIT_LOGS,),
              metric=monitor, metric_mode=mode, top_k=top_k,
              temperature=temperature, missing_metric="skip"))
      self._direction = None
      if self._options.weighting.uses_metric:
        self._direction = metric_points.direction(monitor, mode)
    except ArgumentError as e:
      raise in_callers_words(e) from None
    if bn_data is not None and not _is_count(bn_batch_size):
      raise ArgumentError("{bn_batch_size} must be an integer >= 1, not "
                          "{value!r}", value=bn_batch_size)
    self._bn_data, self._bn_batch_size = bn_data, bn_batch_size
    self._run: Optional[_Run] = None

  @property
  def output_path(self) -> str:
    return self._options.output_path

  @property
  def settings(self) -> options.CallbackOptions:
    """The validated arguments."""
    return self._options

  @property
  def result(self) -> Optional[AveragingResult]:
    """What the last `fit` averaged (None before it ends)."""
    return self._run.result if self._run else None

  def on_train_begin(self, logs: Optional[dict] = None) -> None:
    if self._run is not None:
      self._run.close()
    self._run = _Run(self._options, self.model,
                     (self.params or {}).get("epochs"))

  def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
    assert self._run is not None, "on_train_begin was not called"
    self._run.epoch_ended(epoch + 1, logs or {})

  def on_train_end(self, logs: Optional[dict] = None) -> None:
    """Averages, writes the output and restores; callable again after a
    KeyboardInterrupt stopped `fit` (it runs once per `fit`)."""
    run = self._run
    if run is None or run.result is not None or run.closed:
      return
    bn = None
    if self._bn_data is not None:
      bn = functools.partial(recompute_batch_norm, data=self._bn_data,
                             batch_size=self._bn_batch_size)
    try:
      run.finish(self._direction, bn)
    finally:
      run.close()


def _is_count(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class _Snapshot:
  epoch: int  # 1-based
  path: str


class _Run:
  """One `fit`: the private directory, the snapshots or running sum, the
  logged metric, and the averaging at the end."""

  def __init__(self, settings: options.CallbackOptions, model: Any,
               planned: Optional[int]):
    self.settings, self.model, self.planned = settings, model, planned
    self.result: Optional[AveragingResult] = None
    self.closed = False
    self.points: list[MetricPoint] = []
    self.snapshots: list[_Snapshot] = []
    self.sum: Optional[RunningSum] = None
    self.summed: list[int] = []  # The epochs in the running sum.
    self.last_epoch = 0
    directory = os.path.dirname(settings.output_path) or "."
    publish.make_dirs(directory)
    shared_dir.remove_stale_temporaries(directory)
    self.private = shared_dir.make_temporary_dir(
        directory, os.path.basename(settings.output_path))
    # A fit that never ends (KeyboardInterrupt, no on_train_end) leaves
    # nothing behind either, once this run is collected or Python exits.
    self._cleanup = weakref.finalize(self, shared_dir.remove_temporary_dir,
                                     self.private)

  def close(self) -> None:
    self.closed = True
    self._cleanup()

  def epoch_ended(self, epoch: int, logs: dict) -> None:
    self.last_epoch = epoch
    tag = self.settings.weighting.metric
    value = logs.get(tag)
    if value is not None:
      self.points.append(MetricPoint(epoch - 1, time.time(), float(value),
                                     EPOCH))
    if not self.settings.takes(epoch) or self.settings.directory is not None:
      return
    if value is None and self.settings.weighting.uses_metric:
      logging.warning("AverageCheckpoints: epoch %d logged no %s (logged: "
                      "%s), so it cannot be weighed: no snapshot", epoch,
                      tag, ", ".join(sorted(logs)) or "nothing")
      return
    if self.settings.running_sum:
      self._add_to_sum(epoch)
    else:
      self._snapshot(epoch)

  def _add_to_sum(self, epoch: int) -> None:
    weights = self.model.weights
    if self.sum is None:
      self.sum = RunningSum([w.path for w in weights])
    # One variable at a time: no second copy of the model in host memory.
    self.sum.add(keras.ops.convert_to_numpy(w.value) for w in weights)
    self.summed.append(epoch)
    logging.debug("Added epoch %d to the running sum", epoch)

  def _snapshot(self, epoch: int) -> None:
    assert self.settings.last_n is not None
    while len(self.snapshots) >= self.settings.last_n:
      os.remove(self.snapshots.pop(0).path)
    path = os.path.join(self.private, f"epoch-{epoch:05d}{WEIGHTS}")
    save_model(self.model, path)
    self.snapshots.append(_Snapshot(epoch, path))

  def finish(self, direction: Optional[str], bn: Optional[_BatchNorm]) -> None:
    """Averages what this fit left, writes the output, restores."""
    logging.info("AverageCheckpoints: %s", self.ending())
    if self.settings.running_sum:
      self.result = self._from_running_sum(bn)
      return
    weighing = self._weigh(direction)
    record = dict(weighing.record, training=self._record(weighing))
    chosen, weights = weighing.checkpoints, weighing.weights
    logging.info("AverageCheckpoints: averaging epochs %s (%s weighting)",
                 _epochs_text([_epoch_of(c) for c in chosen]),
                 self.settings.weighting.weighting)
    output = self.settings.output_path
    kind = ARCHIVE if chosen[0].path.endswith(ARCHIVE) else WEIGHTS
    if kind == _suffix(output) and bn is None:
      self.result = averaging.average_checkpoints(
          chosen, output, weights=weights, metrics=weighing.metrics,
          record_extra=record)
      if self.settings.restore:
        load_model_weights(self.model, output)
      return
    # A .keras output of .weights.h5 snapshots, or statistics to recompute:
    # the average goes through the model.
    average = os.path.join(self.private, "average" + kind)
    made = averaging.average_checkpoints(
        chosen, average, weights=weights, metrics=weighing.metrics,
        quiet=True)
    self.result = self._through_model(
        lambda: load_model_weights(self.model, average), record, bn,
        made.rows)

  def _from_running_sum(self, bn: Optional[_BatchNorm]) -> AveragingResult:
    if self.sum is None:
      raise AveragingError(
          f"nothing to average into {self.settings.output_path}: no epoch "
          f"from start_epoch={self.settings.start_epoch} on ended (the last "
          f"was {self.last_epoch})")
    logging.info("AverageCheckpoints: averaging epochs %s (a float64 running "
                 "sum in memory, %.1f MB)", _epochs_text(self.summed),
                 self.sum.nbytes / 1e6)
    total = self.sum

    def assign() -> None:  # One variable's mean in memory at a time.
      for variable, mean in zip(self.model.weights, total.means()):
        variable.assign(mean)

    training = {"source": "running sum", "epochs": list(self.summed),
                "ending": self.ending()}
    values = {p.step + 1: p.value for p in self.points}
    rows = tuple(CheckpointRow(f"epoch {e} (running sum)", e, _EPOCH,
                               1.0 / len(self.summed), values.get(e))
                 for e in self.summed)
    return self._through_model(assign, {"weighting": {"scheme": "uniform"},
                                        "training": training}, bn, rows)

  def _through_model(self, set_average: Callable[[], None], record: dict,
                     bn: Optional[_BatchNorm],
                     rows: Sequence[CheckpointRow]) -> AveragingResult:
    """Puts the average into the model, recomputes BatchNormalization
    statistics, and writes the output from the model (an exact copy).

    The result and the record name `rows`, what was averaged, rather than
    the model's file they were copied from.
    """
    kept = None
    if not self.settings.restore:
      kept = os.path.join(self.private, "before" + WEIGHTS)
      save_model(self.model, kept)
    set_average()
    if bn is not None:
      record["training"]["bn_data"] = bn(self.model)
    output = self.settings.output_path
    made = os.path.join(self.private, "average-model" + _suffix(output))
    save_model(self.model, made)
    count = weighting.effective_count([r.weight for r in rows])
    record.update(effective_count=count, inputs=[
        dict(dataclasses.asdict(r), path=os.path.abspath(r.path)
             if os.path.exists(r.path) else r.path) for r in rows])
    result = averaging.average_checkpoints(
        [Checkpoint(made, self.last_epoch, _EPOCH)], output,
        record_extra=record)
    if kept is not None:
      load_model_weights(self.model, kept)
    return dataclasses.replace(result, rows=tuple(rows),
                               effective_count=count)

  def _weigh(self, direction: Optional[str]) -> weighting.Weighing:
    """The snapshots (or the directory's files) chosen and weighed."""
    settings = self.settings
    if settings.directory is None:
      found = [Checkpoint(s.path, s.epoch, _EPOCH) for s in self.snapshots]
    else:
      found = self._listed(settings.directory)
    if not found:
      raise AveragingError(
          f"nothing to average into {settings.output_path}: "
          f"{self._nothing_why()}")
    points = self.points or None
    if settings.directory is not None and not settings.weighting.uses_metric:
      points = None  # Only shown, and the files may have no epoch names.
    try:
      return weighting.weigh_checkpoints(found, points, settings.weighting,
                                         mode=direction)
    except ArgumentError as e:
      raise in_callers_words(e) from None

  def _listed(self, directory: str) -> list[Checkpoint]:
    """ModelCheckpoint's files of the chosen epochs, oldest first."""
    settings = self.settings
    files = naming.KerasNames().find_all(directory) if os.path.isdir(
        directory) else []
    start = settings.start_epoch or 1
    chosen = []
    for f in files:
      epoch = f.epoch
      if settings.start_epoch is not None and (epoch is None or epoch < start):
        continue
      chosen.append(Checkpoint(f.path, f.step, f.step_source))
    if settings.last_n is not None:
      chosen = chosen[-settings.last_n:]
    return chosen

  def _nothing_why(self) -> str:
    settings = self.settings
    if settings.directory is not None:
      return (f"{settings.directory} holds no Keras file of an epoch from "
              f"{settings.start_epoch or 1} on")
    if not self.last_epoch:
      return "no epoch ended"
    return (f"no snapshot was taken (the last epoch was {self.last_epoch}, "
            f"start_epoch={settings.start_epoch}, save_freq="
            f"{settings.save_freq})")

  def _record(self, weighing: weighting.Weighing) -> dict:
    """The `training` entry of the output's record."""
    source = self.settings.directory or "snapshots"
    return {"source": source, "ending": self.ending(),
            "epochs": [_epoch_of(c) for c in weighing.checkpoints]}

  def ending(self) -> str:
    """How training ended, in words."""
    planned = self.planned or 0
    epoch = self.last_epoch
    if getattr(self.model, "stop_training", False):
      return (f"training stopped after epoch {epoch} of {planned} "
              "(model.stop_training, e.g. by EarlyStopping)")
    if epoch < planned:
      return (f"training ended after epoch {epoch} of {planned} "
              "(interrupted)")
    return f"training ended after epoch {epoch}"


_BatchNorm = Callable[[Any], dict]


def _suffix(path: str) -> str:
  return ARCHIVE if path.endswith(ARCHIVE) else WEIGHTS


def _epoch_of(checkpoint: Checkpoint) -> Optional[int]:
  if checkpoint.step_source == _EPOCH:
    return checkpoint.step
  return checkpoint.epoch


def _epochs_text(epochs: Sequence[Optional[int]]) -> str:
  return ", ".join("?" if e is None else str(e) for e in epochs)


def _optimizer(model: Any) -> Optional[Any]:
  optimizer = getattr(model, "optimizer", None)
  return optimizer if isinstance(optimizer, keras.optimizers.Optimizer) else (
      None)


def save_model(model: Any, path: str) -> None:
  """The model's weights without the optimizer's (`.weights.h5`), or the
  whole model (`.keras`: config, weights, optimizer state)."""
  if path.endswith(ARCHIVE):
    model.save(path)
    return
  optimizer = _optimizer(model)
  keras.saving.save_weights(model, path, objects_to_skip=(
      [optimizer] if optimizer is not None else None))


def load_model_weights(model: Any, path: str) -> None:
  """Loads a file's weights into the model; the optimizer keeps its state."""
  optimizer = _optimizer(model)
  if optimizer is None:
    model.load_weights(path)
  elif path.endswith(WEIGHTS):
    model.load_weights(path, objects_to_skip=[optimizer])
  else:  # A .keras file cannot skip objects: its optimizer state is undone.
    state = [keras.ops.convert_to_numpy(v.value) for v in optimizer.variables]
    model.load_weights(path)
    for variable, value in zip(optimizer.variables, state):
      variable.assign(value)


def recompute_batch_norm(model: Any, data: Any, batch_size: int = 32) -> dict:
  """Recomputes the moving mean and variance of the model's trainable
  BatchNormalization layers with one pass over `data`, as torch's
  `update_bn`: the statistics are reset, and each batch t is given momentum
  (t - 1) / t, so the pass leaves the plain mean of the batches' statistics;
  the layers' momenta are then put back.

  Args:
    model: a built Keras model.
    data: an array (taken in batches of `batch_size`) or a finite iterable
      of batches, each `x` or `(x, y, ...)`.
    batch_size: see `data`.

  Returns:
    For the record: how many layers, batches and examples.
  """
  layers = [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.BatchNormalization) and
            layer.trainable]
  if not layers:
    logging.warning("AverageCheckpoints: bn_data given, but the model has no "
                    "trainable BatchNormalization layer: nothing recomputed")
    return {"layers": 0, "batches": 0, "examples": 0}
  momenta = [layer.momentum for layer in layers]
  for layer in layers:
    layer.moving_mean.assign(np.zeros(layer.moving_mean.shape))
    layer.moving_variance.assign(np.ones(layer.moving_variance.shape))
  batches = examples = 0
  try:
    for x in _batches(data, batch_size):
      batches += 1
      for layer in layers:
        layer.momentum = (batches - 1) / batches
      model(x, training=True)
      examples += _count(x)
  finally:
    for layer, momentum in zip(layers, momenta):
      layer.momentum = momentum
  if not batches:
    raise AveragingError("bn_data holds no batch: the BatchNormalization "
                         "statistics cannot be recomputed")
  logging.info("AverageCheckpoints: recomputed the moving mean and variance "
               "of %d BatchNormalization layers from bn_data (%d batches, "
               "%d examples)", len(layers), batches, examples)
  return {"layers": len(layers), "batches": batches, "examples": examples}


def _batches(data: Any, batch_size: int) -> Iterator[Any]:
  if hasattr(data, "shape"):  # One array or tensor: cut into batches.
    for start in range(0, int(data.shape[0]), batch_size):
      yield data[start:start + batch_size]
    return
  for batch in data:
    yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _count(x: Any) -> int:
  if isinstance(x, dict):
    x = next(iter(x.values()))
  return int(np.shape(x)[0]) if np.ndim(x) else 1
