"""Tiny real Keras 3 training runs for the Keras tests, and expectations made apart.

Each run fits Embedding → Flatten → Dense → BatchNormalization → Dense with
Adam for a few epochs, with Keras' own `ModelCheckpoint` (weights only and
full `.keras`), `TensorBoard` and `CSVLogger` callbacks. Expectations are
built here from the input files with h5py and TF's event reader, never with
t2t_avg.
"""
import contextlib
import csv
import dataclasses
import glob
import io
import os
import zipfile

import h5py
import numpy as np
import pytest

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


def data(seed=0, size=64):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, VOCAB, size=(size, SEQ)).astype("int32")
  y = rng.integers(0, 3, size=(size,)).astype("int32")
  return x, y


@contextlib.contextmanager
def policy_scope(policy):
  """Keras' global dtype policy, restored afterwards."""
  import keras  # pylint: disable=import-outside-toplevel
  old = keras.mixed_precision.global_policy().name
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(old)


def build_model(learning_rate=0.01):
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


def train(directory, policy="float32", epochs=EPOCHS):
  """Fits a fresh model with every Keras callback the tests read."""
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


@pytest.fixture(scope="session")
def keras_runs(tmp_path_factory):
  """{policy: Run} for float32 and mixed_float16, trained once per session."""
  root = tmp_path_factory.mktemp("keras_runs")
  return {policy: train(str(root / policy), policy)
          for policy in ("float32", "mixed_float16")}


# --- reading files independently ---------------------------------------------

@contextlib.contextmanager
def open_weights(path):
  """h5py over a .weights.h5 file, or over the weights inside a .keras file."""
  if path.endswith(".keras"):
    with zipfile.ZipFile(path) as archive:
      data = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(data), "r") as f:
      yield f
  else:
    with h5py.File(path, "r") as f:
      yield f


def datasets(path):
  """{dataset path: numpy value} of a Keras weights file."""
  values = {}
  with open_weights(path) as f:
    def visit(name, item):
      if isinstance(item, h5py.Dataset):
        values[name] = item[()]
    f.visititems(visit)
  return values


def expected_average(paths, weights=None):
  """The float64 sum in input order (weighted, or / n), cast once; other
  dtypes from the last (newest) file."""
  inputs = [datasets(p) for p in paths]
  expected = {}
  for name, newest in inputs[-1].items():
    if np.asarray(newest).dtype.kind != "f":
      expected[name] = newest
      continue
    total = np.zeros(np.shape(newest), np.float64)
    for i, values in enumerate(inputs):
      value = np.asarray(values[name], np.float64)
      total += value if weights is None else value * weights[i]
    if weights is None:
      total /= len(inputs)
    expected[name] = total.astype(np.asarray(newest).dtype)
  return expected


def assert_same_values(found, expected):
  assert sorted(found) == sorted(expected)
  for name, value in expected.items():
    got = np.asarray(found[name])
    assert got.dtype == np.asarray(value).dtype, name
    assert got.tobytes() == np.asarray(value).tobytes(), name


def tensorboard_scalars(log_dir, tag):
  """{step: value} of a tag in one directory's event files (TF's reader)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  values = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "*tfevents*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def csv_column(path, column):
  """{epoch: value} of a CSVLogger column."""
  with open(path, newline="", encoding="utf-8") as f:
    return {int(row["epoch"]): float(row[column]) for row in csv.DictReader(f)}


def softmax_weights(values):
  """Softmax over losses (lower is better), T = their population std."""
  v = np.asarray(values, np.float64)
  weights = np.exp(-(v - v.min()) / np.std(v))
  return (weights / weights.sum()).tolist()
