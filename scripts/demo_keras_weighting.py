"""The weighting demo for Keras 3 users: `.weights.h5` files weighted by Keras' own epoch_loss logs.

Usage (from the repository root, in its virtualenv; about a minute on 2 CPU cores):

  python scripts/demo_keras_weighting.py       # prints two markdown tables

The same task, model and spike as `scripts/demo_weighting.py`, trained the
way a Keras 3 user trains: `model.fit` for 16 epochs of 150 steps, with
`ModelCheckpoint("w-{epoch:02d}.weights.h5", save_weights_only=True)`, the
`TensorBoard` callback (validation loss as `epoch_loss` under
`logs/validation`, at the 0-based epoch) and, in run 1, a
`LearningRateScheduler` that multiplies the learning rate by 30 for the last
3 epochs. The last 8 files are averaged uniformly and weighted by that
`epoch_loss` (t2t_avg pairs the file of epoch e with the loss logged at
e - 1), loaded with `model.load_weights` and evaluated on a separate test
split, which nothing was chosen or weighted by.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_weighting as demo  # noqa: E402  (the scripts/ directory)

if TYPE_CHECKING:
  from t2t_avg.record import AveragingResult

METRIC = "epoch_loss"
LOGS = "logs"


def _compiled(cfg: demo.Config) -> Any:
  import keras  # pylint: disable=import-outside-toplevel
  model = demo.build_model(cfg)
  model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
  return model


def train(cfg: demo.Config, run_dir: str, data: dict) -> list[tuple[str, int]]:
  """Fits with ModelCheckpoint and TensorBoard; returns (file, epoch) of each
  save, oldest first."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(cfg.seed)
  model = _compiled(cfg)
  epochs = cfg.steps // cfg.save_every
  spike_epoch = None if cfg.spike_from is None else (
      cfg.spike_from // cfg.save_every)

  def learning_rate(epoch: int, _: float) -> float:
    spiking = spike_epoch is not None and epoch >= spike_epoch
    return cfg.learning_rate * (cfg.spike_factor if spiking else 1.0)

  # Batches drawn without end from the reshuffled training split, so every
  # epoch is exactly `save_every` steps (numpy arrays would run out mid-run).
  train_batches = tf.data.Dataset.from_tensor_slices(
      (data["train"].x, data["train"].y)).shuffle(
          len(data["train"].y), seed=cfg.seed).repeat().batch(cfg.batch_size)
  model.fit(train_batches, epochs=epochs, steps_per_epoch=cfg.save_every,
            validation_data=(data["eval"].x, data["eval"].y), verbose=0,
            callbacks=[
                keras.callbacks.ModelCheckpoint(
                    os.path.join(run_dir, "w-{epoch:02d}.weights.h5"),
                    save_weights_only=True),
                keras.callbacks.TensorBoard(os.path.join(run_dir, LOGS)),
                keras.callbacks.LearningRateScheduler(learning_rate)])
  return [(os.path.join(run_dir, f"w-{e:02d}.weights.h5"), e)
          for e in range(1, epochs + 1)]


def evaluate(cfg: demo.Config, path: str,
             split: demo.Split) -> tuple[float, float]:
  """(loss, accuracy) of a .weights.h5 file loaded into a fresh model."""
  model = _compiled(cfg)
  model.optimizer.build(model.trainable_variables)
  model.load_weights(path)
  return demo._loss_and_accuracy(model, split)  # pylint: disable=protected-access


def cli_args(run_dir: str, n: int, output_path: str, scheme: str,
             top_k: int = 0) -> list:
  """The `python -m t2t_avg` flags for one average of the last n files."""
  args = [f"--prefix={os.path.join(run_dir, 'w-')}",
          f"--num_last_checkpoints={n}", f"--output_path={output_path}"]
  if scheme != "uniform":
    args += [f"--weighting={scheme}",
             f"--metrics_from_events={os.path.join(run_dir, LOGS, 'validation')}",
             f"--metric={METRIC}"]
  if top_k:
    args.append(f"--top_k={top_k}")
  return args


def average(run_dir: str, n: int, output_path: str, scheme: str, *,
            top_k: int = 0) -> AveragingResult:
  """Averages the last n files with t2t_avg; returns its AveragingResult."""
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import options
  from t2t_avg.jobs import oneshot
  validation = os.path.join(run_dir, LOGS, "validation")
  return oneshot.run(options.OneShotSettings(
      options.InputOptions(prefix=os.path.join(run_dir, "w-"),
                           num_last_checkpoints=n),
      options.OutputOptions(output_path=output_path),
      weighting=options.WeightingOptions(
          weighting=scheme, metric=METRIC, top_k=top_k,
          metrics_from_events=(validation,) if scheme != "uniform" else ())))


def compare(cfg: demo.Config, run_dir: str, saved: Sequence[tuple],
            data: dict, *, n: int) -> list:
  """Rows: best and last single files, then each average of the last n."""
  last = saved[-n:]
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg.metrics import keras_logs
  logged = {p.step: p.value for p in keras_logs.read_metric(
      [os.path.join(run_dir, LOGS, "validation")], METRIC)}
  best = min(range(n), key=lambda i: (logged[last[i][1] - 1], -last[i][1]))
  def row(label: str, path: str, effective_count: float) -> demo.Row:
    loss, accuracy = evaluate(cfg, path, data["test"])
    return demo.Row(label, loss, accuracy, effective_count)

  rows = [
      row(f"best single file (epoch {last[best][1]}, lowest validation "
          "epoch_loss)", last[best][0], 1.0),
      row(f"last file (epoch {last[-1][1]})", last[-1][0], 1.0),
  ]
  for scheme, extra in (("uniform", {}),) + demo.SCHEMES:
    output = os.path.join(run_dir, "avg", scheme, "averaged.weights.h5")
    result = average(run_dir, n, output, scheme, **extra)
    label = {"uniform": "uniform average",
             "top_k": f"top_k (k={extra.get('top_k')})"}.get(scheme, scheme)
    if scheme == "softmax":
      label = (f"softmax (T = std of the epoch losses = "
               f"{result.record['weighting']['temperature']:.3f})")
    rows.append(row(label, output, result.effective_count))
  return rows


def run_demo(work_dir: str, *, n: int = 8,
             base: demo.Config = demo.Config()) -> list:
  """Both runs; returns [(title, rows)]."""
  epochs = base.steps // base.save_every
  spike_from = base.steps - 3 * base.save_every
  runs = [
      (f"Run 1: learning rate x{base.spike_factor:g} from epoch "
       f"{spike_from // base.save_every + 1} (the last 3 files degrade); last "
       f"{n} of {epochs} .weights.h5 files",
       dataclasses.replace(base, spike_from=spike_from), "spike"),
      (f"Run 2: the same run, steady; last {n} of {epochs} .weights.h5 files",
       base, "steady"),
  ]
  tables = []
  for title, cfg, name in runs:
    data = demo.make_data(cfg)
    run_dir = os.path.join(work_dir, name)
    saved = train(cfg, run_dir, data)
    tables.append((title, compare(cfg, run_dir, saved, data, n=n)))
  return tables


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=8,
                      help="how many of the last files to average")
  parser.add_argument("--work_dir", default="",
                      help="where the runs go (default: a temporary "
                      "directory, removed afterwards)")
  args = parser.parse_args()
  start = demo.print_tables(lambda work_dir: run_demo(work_dir, n=args.n),
                            args.work_dir)
  example = shlex.join(["python", "-m", "t2t_avg"] + cli_args(
      "spike", args.n, "avg/averaged.weights.h5", "softmax"))
  print("Reproduce with `python scripts/demo_keras_weighting.py`. Each "
        f"average is of the last {args.n} files, weighted by the validation "
        f"epoch_loss Keras logged for their epochs, e.g. `{example}`; losses "
        "and accuracies are on a separate test split.")
  print(f"{time.monotonic() - start:.0f} s on {os.cpu_count()} CPU cores",
        file=sys.stderr)


if __name__ == "__main__":
  main()
