"""Sharded Keras 3 weights (`.weights.json` + shards): averaged, sharded as the newest, loaded."""
import glob
import json
import os
import resource
import signal
import subprocess
import sys

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import REPO, assert_same_values, error_line, float64_mean, run_cli
from t2t_avg import average_checkpoints
from t2t_avg.errors import ArgumentError

EPOCHS, BATCHES = 3, 2
KB = 1 / 1024**2  # max_shard_size is in GB.
# Shard sizes per epoch: the second epoch's file is sharded otherwise.
SHARD_SIZES = {1: 2.5 * KB, 2: 8 * KB, 3: 2.5 * KB}


# --- real files, written by Keras 3 ------------------------------------------

def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(8 * BATCHES, 16)).astype(np.float32),
          rng.normal(size=(8 * BATCHES, 8)).astype(np.float32))


def _model(dtype=None):
  import keras  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([
      keras.Input((16,)), keras.layers.Dense(32, name="d1", dtype=dtype),
      keras.layers.Dense(8, name="out", dtype=dtype)])
  model.compile(keras.optimizers.Adam(0.05), "mse")
  return model


def _train(directory, dtype=None):
  """`save_weights("s-<epoch>.weights.json", max_shard_size=...)` after
  each epoch; returns the index paths, oldest first."""
  import keras  # pylint: disable=import-outside-toplevel
  os.makedirs(directory)
  keras.utils.set_random_seed(1)
  model = _model(dtype)
  paths = []

  def save(epoch, logs):
    del logs
    paths.append(os.path.join(directory, f"s-{epoch + 1}.weights.json"))
    model.save_weights(paths[-1], max_shard_size=SHARD_SIZES[epoch + 1])

  x, y = _data()
  model.fit(x, y, batch_size=8, epochs=EPOCHS, verbose=0, shuffle=False,
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=save)])
  return paths


@pytest.fixture(scope="module", name="runs")
def runs_fixture(tmp_path_factory):
  """{'float32': [indexes], 'bfloat16': [indexes]}, oldest first."""
  root = tmp_path_factory.mktemp("sharded")
  return {"float32": _train(str(root / "float32")),
          "bfloat16": _train(str(root / "bfloat16"), "bfloat16")}


# --- expectations, from the inputs with json and h5py ------------------------

def _shards(index):
  """The shard files of an index, as Keras names and lists them."""
  with open(index, encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  names = {n for v in weight_map.values()
           for n in ([v] if isinstance(v, str) else v)}
  base = os.path.basename(index)[:-len(".weights.json")]
  names.add(f"{base}_00000.weights.h5")
  return [os.path.join(os.path.dirname(index), n) for n in sorted(names)]


def _shard_datasets(shard):
  """{dataset path: value} of one shard (bfloat16 where it is marked so)."""
  values = {}
  with h5py.File(shard, "r") as f:
    def visit(name, item):
      if isinstance(item, h5py.Dataset):
        value = item[()]
        if item.attrs.get("dtype") == "bfloat16":
          value = np.asarray(value).view(ml_dtypes.bfloat16)
        values[name] = np.asarray(value)
    f.visititems(visit)
  return values


def _datasets(path):
  """{dataset path: value} of sharded weights (all shards) or a
  `.weights.h5` file."""
  if not path.endswith(".weights.json"):
    return _shard_datasets(path)
  values = {}
  for shard in _shards(path):
    values.update(_shard_datasets(shard))
  return values


def _expected(paths, weights=None):
  """The float64 sum in input order (weighted, or / n), cast once; other
  dtypes from the last (newest) input."""
  inputs = [_datasets(p) for p in paths]
  expected = {}
  for name, newest in inputs[-1].items():
    if newest.dtype.kind in "iub":
      expected[name] = newest
      continue
    expected[name] = float64_mean([values[name] for values in inputs],
                                  newest.dtype, weights)
  return expected


def _reloaded(index, dtype=None):
  """What Keras loads from an index: its weights saved again unsharded, and
  the optimizer's iteration count."""
  model = _model(dtype)
  model.optimizer.build(model.trainable_variables)
  model.load_weights(index)
  resaved = index[:-len(".weights.json")] + "-resaved.weights.h5"
  model.save_weights(resaved)
  return _shard_datasets(resaved), int(model.optimizer.iterations)


# --- averages Keras loads ----------------------------------------------------

def test_average_is_sharded_as_the_newest_and_keras_loads_it(runs,
                                                             tmp_path):
  inputs = runs["float32"]
  newest_shards = _shards(inputs[-1])
  assert len(newest_shards) > 2 and len(_shards(inputs[1])) < len(
      newest_shards)  # The inputs are sharded differently.
  output = str(tmp_path / "avg.weights.json")
  result = run_cli(f"--checkpoints={','.join(inputs)}",
                   f"--output_path={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  expected = _expected(inputs)
  assert_same_values(_datasets(output), expected)
  # The newest's shards, one for one, under the output's name.
  shards = _shards(output)
  assert [os.path.basename(s) for s in shards] == [
      f"avg_{k:05}.weights.h5" for k in range(len(newest_shards))]
  for ours, theirs in zip(shards, newest_shards):
    assert sorted(_shard_datasets(ours)) == sorted(_shard_datasets(theirs))
  with open(inputs[-1], encoding="utf-8") as f:
    newest_index = f.read()
  with open(output, encoding="utf-8") as f:
    assert f.read() == newest_index.replace('"s-3_', '"avg_')
  found, iterations = _reloaded(output)
  assert_same_values(found, expected)
  assert iterations == EPOCHS * BATCHES
  assert "(from optimizer/vars/0)" in result.stderr
  assert sorted(os.listdir(tmp_path)) == sorted(
      [os.path.basename(s) for s in shards] + [
          "avg.weights.json", "avg.weights.json.t2t_avg.json",
          "avg-resaved.weights.h5"])


def test_bfloat16_stays_bfloat16(runs, tmp_path):
  inputs = runs["bfloat16"]
  output = str(tmp_path / "avg.weights.json")
  average_checkpoints(inputs, output)
  expected = _expected(inputs)
  assert expected["layers/dense/vars/0"].dtype == ml_dtypes.bfloat16
  assert_same_values(_datasets(output), expected)
  found, _ = _reloaded(output, "bfloat16")
  assert_same_values(found, expected)


def test_weighted_average_through_the_library(runs, tmp_path):
  inputs = runs["float32"][:2]
  output = str(tmp_path / "weighted.weights.json")
  result = average_checkpoints(inputs, output, weights=[3, 1])
  assert [r.weight for r in result.rows] == [0.75, 0.25]
  expected = _expected(inputs, [0.75, 0.25])
  assert_same_values(_datasets(output), expected)
  assert len(_shards(output)) == len(_shards(inputs[-1]))
  assert_same_values(_reloaded(output)[0], expected)


def test_dry_run_writes_nothing(runs, tmp_path):
  inputs = runs["float32"]
  result = run_cli(f"--checkpoints={','.join(inputs)}",
                   f"--output_path={tmp_path}/avg.weights.json", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(tmp_path) == []
  for path, epoch in zip(inputs, range(1, EPOCHS + 1)):
    line = next(line for line in result.stdout.splitlines() if path in line)
    assert str(epoch * BATCHES) in line.split()


def test_replacing_an_output_leaves_none_of_its_shards(runs, tmp_path):
  inputs = runs["float32"]
  output = str(tmp_path / "avg.weights.json")
  average_checkpoints(inputs, output)
  many = len(_shards(output))
  average_checkpoints(inputs[:2], output)  # The newest has fewer shards.
  assert len(_shards(output)) < many
  assert sorted(glob.glob(str(tmp_path / "avg_*"))) == _shards(output)
  assert_same_values(_datasets(output), _expected(inputs[:2]))


def test_names_and_missing_shards_are_one_line(runs, tmp_path):
  inputs = runs["float32"]
  with pytest.raises(ArgumentError) as error:
    average_checkpoints(inputs, str(tmp_path / "avg.weights.h5"))
  assert error.value.message(as_flags=True) == (
      f"--output_path '{tmp_path}/avg.weights.h5' must end in .weights.json "
      "for Keras sharded .weights.json file inputs: Keras reads them only "
      f"under such names (e.g. {tmp_path}/avg.weights.json)")
  copied = str(tmp_path / "c.weights.json")
  with open(inputs[0], encoding="utf-8") as f:
    index = f.read().replace('"s-1_', '"c_')
  with open(copied, "w", encoding="utf-8") as f:
    f.write(index)
  shards = _shards(copied)
  for shard in shards[:-1]:
    os.link(shard.replace(f"{tmp_path}/c_", os.path.dirname(inputs[0]) +
                          "/s-1_"), shard)
  result = run_cli(f"--checkpoints={copied},{inputs[1]}",
                   f"--output_path={tmp_path}/avg.weights.json")
  assert error_line(result) == (
      f"t2t_avg: error: shard {shards[-1]} of the sharded Keras weights "
      f"{copied} does not exist")


def test_a_full_disk_is_one_line_naming_the_output(runs, tmp_path):
  inputs = runs["float32"]
  limit = max(os.path.getsize(s) for s in _shards(inputs[-1])) // 2

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  output = str(tmp_path / "out" / "avg.weights.json")
  result = subprocess.run(
      [sys.executable, "-m", "t2t_avg", f"--checkpoints={','.join(inputs)}",
       f"--output_path={output}"], capture_output=True, text=True,
      timeout=300, cwd=REPO, check=False, preexec_fn=limit_file_size,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  line = error_line(result)
  assert line == f"t2t_avg: error: cannot write {output}: File too large"
  assert all(x == line or x[:1] in "IWE" and x[1:5].isdigit()
             for x in result.stderr.splitlines()), result.stderr
  assert os.listdir(tmp_path / "out") == []
