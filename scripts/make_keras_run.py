"""A tiny real Keras 3 training run: ModelCheckpoint files, TensorBoard and CSV logs.

Usage (from the repository root, in its virtualenv; a few seconds):

  python scripts/make_keras_run.py /tmp/keras_run
  python scripts/make_keras_run.py /tmp/keras_run16 --policy=mixed_float16

A model of Embedding → Flatten → Dense → BatchNormalization → Dense, Adam,
fitted for 4 epochs of 4 steps (fixed seeds) with Keras' own callbacks:

  <dir>/w/w-01.weights.h5 ... w-04.weights.h5   ModelCheckpoint(save_weights_only=True)
  <dir>/m/m-01.keras ... m-04.keras             ModelCheckpoint()
  <dir>/tb/train/, <dir>/tb/validation/         TensorBoard (epoch_loss, ...)
  <dir>/training.log                            CSVLogger (epoch, val_loss, ...)

The README's Keras 3 commands run on it, and the tests train the same run
(`tests/keras_runs.py` imports this module).
"""
import argparse
import contextlib
import dataclasses
import glob
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

EPOCHS = 4
SEQ = 5
VOCAB = 50


@dataclasses.dataclass(frozen=True)
class Run:
  """What a training run left behind."""
  policy: str
  directory: str
  weights: tuple  # w-01.weights.h5 ... oldest first
  archives: tuple  # m-01.keras ...
  tensorboard: str  # the TensorBoard callback's log_dir
  csv_log: str  # the CSVLogger file


def data(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Random token sequences and labels (the task is noise: only the files
  matter)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, VOCAB, size=(size, SEQ)).astype("int32")
  y = rng.integers(0, 3, size=(size,)).astype("int32")
  return x, y


@contextlib.contextmanager
def policy_scope(policy: str) -> Iterator[None]:
  """Keras' global dtype policy, restored afterwards."""
  import keras  # pylint: disable=import-outside-toplevel
  old = keras.mixed_precision.global_policy().name
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(old)


def build_model(learning_rate: float = 0.01) -> Any:
  """The model, compiled, its optimizer built (so load_weights restores it)."""
  import keras  # pylint: disable=import-outside-toplevel
  tokens = keras.Input(shape=(SEQ,), dtype="int32")
  x = keras.layers.Embedding(VOCAB, 8)(tokens)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16)(x)
  x = keras.layers.BatchNormalization()(x)
  out = keras.layers.Dense(3, activation="softmax", dtype="float32")(x)
  model = keras.Model(tokens, out)
  model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                loss="sparse_categorical_crossentropy", metrics=["accuracy"])
  model.optimizer.build(model.trainable_variables)
  return model


def train(directory: str, policy: str = "float32",
          epochs: int = EPOCHS) -> Run:
  """Fits a fresh model with every Keras callback t2t_avg reads."""
  import keras  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  keras.utils.set_random_seed(0)
  with policy_scope(policy):
    model = build_model()
    x, y = data()
    xv, yv = data(seed=1, size=32)
    tensorboard = os.path.join(directory, "tb")
    csv_log = os.path.join(directory, "training.log")
    model.fit(x, y, batch_size=16, epochs=epochs, validation_data=(xv, yv),
              verbose=0, callbacks=[
                  keras.callbacks.ModelCheckpoint(
                      os.path.join(directory, "w", "w-{epoch:02d}.weights.h5"),
                      save_weights_only=True),
                  keras.callbacks.ModelCheckpoint(
                      os.path.join(directory, "m", "m-{epoch:02d}.keras")),
                  keras.callbacks.TensorBoard(log_dir=tensorboard),
                  keras.callbacks.CSVLogger(csv_log)])
  return Run(policy, directory,
             tuple(sorted(glob.glob(os.path.join(directory, "w", "*.h5")))),
             tuple(sorted(glob.glob(os.path.join(directory, "m", "*.keras")))),
             tensorboard, csv_log)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory", help="where the run goes")
  parser.add_argument("--policy", default="float32",
                      help="Keras dtype policy, e.g. mixed_float16")
  parser.add_argument("--epochs", type=int, default=EPOCHS)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  run = train(args.directory, args.policy, args.epochs)
  for path in run.weights + run.archives + (run.tensorboard, run.csv_log):
    print(path)


if __name__ == "__main__":
  main()
