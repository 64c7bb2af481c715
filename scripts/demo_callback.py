"""The Keras callback demo: averages made inside `model.fit` against its best and last epoch.

Usage (from the repository root, in its virtualenv; a few minutes on 2 CPU
cores):

  python scripts/demo_callback.py       # prints two markdown tables

The task and data of `scripts/demo_weighting.py`, with a BatchNormalization
layer after each hidden layer (so `bn_data` has statistics to recompute),
fitted for 16 epochs of 150 steps; in run 1 a `LearningRateScheduler`
multiplies the learning rate by 30 for the last 3 epochs. One `fit` carries
every `AverageCheckpoints` of the table (each with `restore=False`, so
none changes what the next one sees) and a `ModelCheckpoint` for the single
epochs. Every output is loaded into a fresh model and evaluated on a
separate test split, which nothing was chosen or weighted by.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_weighting as demo  # noqa: E402  (the scripts/ directory)

LAST_N = 8
SWA_FROM = 5  # SWA: every epoch from this one on (1-based)


def build_model(cfg: demo.Config) -> Any:
  """The demo MLP with BatchNormalization, compiled."""
  import keras  # pylint: disable=import-outside-toplevel
  layers: list = [keras.Input((cfg.features,))]
  for _ in range(2):
    layers += [keras.layers.Dense(cfg.hidden),
               keras.layers.BatchNormalization(),
               keras.layers.Activation("relu")]
  model = keras.Sequential(layers + [keras.layers.Dense(cfg.classes)])
  model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
  return model


def averages(run_dir: str, bn_x: np.ndarray) -> dict:
  """{label: AverageCheckpoints} of the table, each writing its own file."""
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg.keras import AverageCheckpoints

  def out(name: str) -> str:
    return os.path.join(run_dir, "avg", name + ".weights.h5")

  common: dict = {"restore": False}
  return {
      f"uniform, last {LAST_N}": AverageCheckpoints(
          out("uniform"), last_n=LAST_N, **common),
      f"uniform, last {LAST_N}, bn_data": AverageCheckpoints(
          out("uniform_bn"), last_n=LAST_N, bn_data=bn_x, bn_batch_size=256,
          **common),
      f"softmax by val_loss, last {LAST_N}": AverageCheckpoints(
          out("softmax"), last_n=LAST_N, weighting="softmax",
          monitor="val_loss", **common),
      f"top_k (k=3) by val_loss, last {LAST_N}": AverageCheckpoints(
          out("top_k"), last_n=LAST_N, weighting="top_k", top_k=3,
          monitor="val_loss", **common),
      f"SWA, every epoch from {SWA_FROM}": AverageCheckpoints(
          out("swa"), start_epoch=SWA_FROM, **common),
      f"SWA, every epoch from {SWA_FROM}, bn_data": AverageCheckpoints(
          out("swa_bn"), start_epoch=SWA_FROM, bn_data=bn_x,
          bn_batch_size=256, **common),
  }


def train(cfg: demo.Config, run_dir: str, data: dict, callbacks: dict
          ) -> dict:
  """Fits once with ModelCheckpoint and every average; returns the history."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(cfg.seed)
  model = build_model(cfg)
  epochs = cfg.steps // cfg.save_every
  spike_epoch = None if cfg.spike_from is None else (
      cfg.spike_from // cfg.save_every)

  def learning_rate(epoch: int, _: float) -> float:
    spiking = spike_epoch is not None and epoch >= spike_epoch
    return cfg.learning_rate * (cfg.spike_factor if spiking else 1.0)

  train_batches = tf.data.Dataset.from_tensor_slices(
      (data["train"].x, data["train"].y)).shuffle(
          len(data["train"].y), seed=cfg.seed).repeat().batch(cfg.batch_size)
  history = model.fit(
      train_batches, epochs=epochs, steps_per_epoch=cfg.save_every,
      validation_data=(data["eval"].x, data["eval"].y), verbose=0,
      callbacks=[keras.callbacks.LearningRateScheduler(learning_rate),
                 keras.callbacks.ModelCheckpoint(
                     os.path.join(run_dir, "e{epoch:02d}.weights.h5"),
                     save_weights_only=True),
                 *callbacks.values()])
  return history.history


def evaluate(cfg: demo.Config, path: str, split: demo.Split
             ) -> tuple[float, float]:
  """(loss, accuracy) of a .weights.h5 file loaded into a fresh model."""
  model = build_model(cfg)
  model.load_weights(path, objects_to_skip=[model.optimizer])
  return demo._loss_and_accuracy(model, split)  # pylint: disable=protected-access


def compare(cfg: demo.Config, run_dir: str, data: dict) -> list:
  """Rows: the best and last single epochs, then each average."""
  callbacks = averages(run_dir, data["train"].x)
  history = train(cfg, run_dir, data, callbacks)
  epochs = len(history["val_loss"])
  window = range(epochs - LAST_N + 1, epochs + 1)
  best = min(window, key=lambda e: (history["val_loss"][e - 1], -e))

  def row(label: str, path: str, effective_count: float) -> demo.Row:
    loss, accuracy = evaluate(cfg, path, data["test"])
    return demo.Row(label, loss, accuracy, effective_count)

  def epoch_file(epoch: int) -> str:
    return os.path.join(run_dir, f"e{epoch:02d}.weights.h5")

  rows = [row(f"best single epoch of the last {LAST_N} ({best}, lowest "
              "val_loss)", epoch_file(best), 1.0),
          row(f"last epoch ({epochs})", epoch_file(epochs), 1.0)]
  for label, callback in callbacks.items():
    assert callback.result is not None
    rows.append(row(label, callback.output_path,
                    callback.result.effective_count))
  return rows


def run_demo(work_dir: str, *, base: demo.Config = demo.Config()) -> list:
  """Both runs; returns [(title, rows)]."""
  epochs = base.steps // base.save_every
  spike_from = base.steps - 3 * base.save_every
  runs = [
      (f"Run 1: learning rate x{base.spike_factor:g} from epoch "
       f"{spike_from // base.save_every + 1} (the last 3 epochs degrade); "
       f"{epochs} epochs", dataclasses.replace(base, spike_from=spike_from),
       "spike"),
      (f"Run 2: the same run, steady; {epochs} epochs", base, "steady"),
  ]
  tables = []
  for title, cfg, name in runs:
    data = demo.make_data(cfg)
    tables.append((title, compare(cfg, os.path.join(work_dir, name), data)))
  return tables


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", default="",
                      help="where the runs go (default: a temporary "
                      "directory, removed afterwards)")
  args = parser.parse_args()
  start = demo.print_tables(run_demo, args.work_dir)
  print("Reproduce with `python scripts/demo_callback.py`. Every average was "
        "made by `t2t_avg.keras.AverageCheckpoints` during the run's one "
        "`fit`; bn_data is the training split, in batches of 256; losses "
        "and accuracies are on a separate test split.")
  print(f"{time.monotonic() - start:.0f} s on {os.cpu_count()} CPU cores",
        file=sys.stderr)


if __name__ == "__main__":
  main()
