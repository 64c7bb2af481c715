"""Tiny real Keras 3 training runs for the Keras tests, and expectations made apart.

The runs are `scripts/make_keras_run.py`'s (Embedding → Flatten → Dense →
BatchNormalization → Dense, Adam, Keras' own `ModelCheckpoint` for weights
and `.keras` files, `TensorBoard` and `CSVLogger`). Expectations are built
here from the input files with h5py and TF's event reader, never with
t2t_avg.
"""
import contextlib
import csv
import glob
import io
import os
import zipfile

import h5py
import numpy as np
import pytest

from conftest import float64_mean, load_script

make_keras_run = load_script("make_keras_run")
EPOCHS = make_keras_run.EPOCHS
data, policy_scope = make_keras_run.data, make_keras_run.policy_scope
build_model, train = make_keras_run.build_model, make_keras_run.train


# Each test module imports the fixture (`from keras_runs import
# keras_runs_fixture`): one training for all of them.
_TRAINED: dict = {}


@pytest.fixture(scope="session", name="keras_runs")
def keras_runs_fixture(tmp_path_factory):
  """{policy: Run} for float32 and mixed_float16, trained once per session."""
  if not _TRAINED:
    root = tmp_path_factory.mktemp("keras_runs")
    _TRAINED.update({policy: train(str(root / policy), policy)
                     for policy in ("float32", "mixed_float16")})
  return dict(_TRAINED)


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
    expected[name] = float64_mean([values[name] for values in inputs],
                                  np.asarray(newest).dtype, weights)
  return expected


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
