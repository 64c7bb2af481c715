"""Keras 2 `.h5` files and sharded Keras 3 weights found in a directory (--prefix, continuous)."""
import json
import logging as std_logging
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from conftest import (assert_same_values, average_all, call_cli, error_line,
                      float64_mean, logged, read_record)
from t2t_avg.errors import AveragingError
from t2t_avg.inputs import checkpoints
from t2t_avg.inputs import naming
from t2t_avg.jobs import continuous

EPOCHS, BATCHES = 5, 2
KB = 1 / 1024**2  # max_shard_size is in GB.
# Shard sizes per epoch: the fourth epoch's weights are sharded otherwise.
SHARD_SIZES = {1: 2.5 * KB, 2: 2.5 * KB, 3: 2.5 * KB, 4: 8 * KB, 5: 2.5 * KB}


def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(8 * BATCHES, 16)).astype(np.float32),
          rng.normal(size=(8 * BATCHES, 8)).astype(np.float32))


def _tf_keras_model():
  import tf_keras  # pylint: disable=import-outside-toplevel
  model = tf_keras.Sequential([
      tf_keras.layers.Input((16,)), tf_keras.layers.Dense(6, name="d1"),
      tf_keras.layers.Dense(8, name="out")])
  model.compile(tf_keras.optimizers.Adam(0.05), "mse")
  return model


def _keras_model():
  import keras  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([
      keras.Input((16,)), keras.layers.Dense(32, name="d1"),
      keras.layers.Dense(8, name="out")])
  model.compile(keras.optimizers.Adam(0.05), "mse")
  return model


def _train_tf_keras(directory):
  """tf_keras' `ModelCheckpoint("w-{epoch:02d}.h5", save_weights_only=True)`."""
  import tf_keras  # pylint: disable=import-outside-toplevel
  os.makedirs(directory)
  tf_keras.utils.set_random_seed(1)
  model = _tf_keras_model()
  model.fit(*_data(), batch_size=8, epochs=EPOCHS, verbose=0, shuffle=False,
            callbacks=[tf_keras.callbacks.ModelCheckpoint(
                os.path.join(directory, "w-{epoch:02d}.h5"),
                save_weights_only=True)])
  return [os.path.join(directory, f"w-{e:02d}.h5")
          for e in range(1, EPOCHS + 1)]


def _train_sharded(directory):
  """Keras 3 `save_weights("m-<epoch>.weights.json", max_shard_size=...)`
  after each epoch, from a callback."""
  import keras  # pylint: disable=import-outside-toplevel
  os.makedirs(directory)
  keras.utils.set_random_seed(1)
  model = _keras_model()
  paths = []

  def save(epoch, logs):
    del logs
    paths.append(os.path.join(directory, f"m-{epoch + 1:02d}.weights.json"))
    model.save_weights(paths[-1], max_shard_size=SHARD_SIZES[epoch + 1])

  model.fit(*_data(), batch_size=8, epochs=EPOCHS, verbose=0, shuffle=False,
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=save)])
  return paths


@pytest.fixture(scope="module", name="runs")
def runs_fixture(tmp_path_factory):
  """{'h5': [tf_keras .h5 files], 'sharded': [indexes]}, oldest first."""
  root = tmp_path_factory.mktemp("discovery")
  return {"h5": _train_tf_keras(str(root / "h5")),
          "sharded": _train_sharded(str(root / "sharded"))}


# --- expectations, from the inputs with json and h5py ------------------------

def _files_of(path):
  """An `.h5` file, or an index and the shards it lists."""
  if not path.endswith(".weights.json"):
    return [path]
  with open(path, encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  names = {n for v in weight_map.values()
           for n in ([v] if isinstance(v, str) else v)}
  return [os.path.join(os.path.dirname(path), n) for n in sorted(names)]


def _datasets(path):
  """{dataset path: value} of a weights file or of every shard of an index."""
  values = {}
  for name in _files_of(path):
    with h5py.File(name, "r") as f:
      f.visititems(lambda key, item: values.__setitem__(key, item[()])
                   if isinstance(item, h5py.Dataset) else None)
  return values


def _expected(paths):
  """The float64 mean of every float dataset, cast once; the rest from the
  newest."""
  inputs = [_datasets(p) for p in paths]
  return {name: float64_mean([v[name] for v in inputs], newest.dtype)
          if newest.dtype.kind == "f" else newest
          for name, newest in inputs[-1].items()}


def _copy(paths, directory):
  """The files of checkpoints (shards too) copied into `directory`."""
  os.makedirs(directory)
  copied = []
  for path in paths:
    for name in _files_of(path) + [path]:
      shutil.copy2(name, directory)
    copied.append(os.path.join(directory, os.path.basename(path)))
  return copied


def _reloaded_tf_keras(output):
  """What tf_keras loads from an `.h5` output, saved again by it."""
  model = _tf_keras_model()
  model.load_weights(output)
  resaved = output[:-len(".h5")] + "-resaved.h5"
  model.save_weights(resaved)
  return _datasets(resaved)


def _reloaded_keras(index):
  """What Keras loads from sharded weights, saved again unsharded."""
  model = _keras_model()
  model.optimizer.build(model.trainable_variables)
  model.load_weights(index)
  resaved = index[:-len(".weights.json")] + "-resaved.weights.h5"
  model.save_weights(resaved)
  return _datasets(resaved)


# --- one-shot: --prefix and --num_last_checkpoints ---------------------------

def test_prefix_takes_the_last_3_keras2_files_by_the_epoch_in_their_names(
    runs, tmp_path):
  inputs = runs["h5"]
  directory = os.path.dirname(inputs[0])
  output = str(tmp_path / "avg.h5")
  result = call_cli(f"--prefix={directory}/w-", "--num_last_checkpoints=3",
                    f"--output_path={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  record = read_record(output)
  assert [(r["path"], r["step"]) for r in record["inputs"]] == [
      (p, e) for p, e in zip(inputs[-3:], range(3, EPOCHS + 1))]
  expected = _expected(inputs[-3:])
  assert_same_values(_datasets(output), expected)
  assert_same_values(_reloaded_tf_keras(output), expected)


def test_prefix_takes_the_last_3_sharded_weights_never_a_shard(runs, tmp_path):
  inputs = runs["sharded"]
  directory = os.path.dirname(inputs[0])
  output = str(tmp_path / "avg.weights.json")
  result = call_cli(f"--prefix={directory}/m-", "--num_last_checkpoints=3",
                    f"--output_path={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  record = read_record(output)
  # The steps are the optimizer's iteration counters in the shards.
  assert [(r["path"], r["step"]) for r in record["inputs"]] == [
      (p, e * BATCHES) for p, e in zip(inputs[-3:], range(3, EPOCHS + 1))]
  expected = _expected(inputs[-3:])
  assert_same_values(_datasets(output), expected)
  assert_same_values(_reloaded_keras(output), expected)


def test_the_number_in_a_keras2_name_is_its_epoch(runs):
  assert [naming.name_number(p) for p in runs["h5"]] == list(
      range(1, EPOCHS + 1))
  assert naming.name_number("/d/m-07.weights.json") == 7
  assert naming.is_keras_name("/d/w-03.h5")


def test_keras2_files_named_weights_h5_are_found_and_read_as_keras2(
    runs, tmp_path):
  directory = str(tmp_path / "run")
  os.makedirs(directory)
  renamed = [os.path.join(directory, f"k-{e:02d}.weights.h5")
             for e in range(1, EPOCHS + 1)]
  for source, target in zip(runs["h5"], renamed):
    shutil.copy(source, target)
  chosen = checkpoints.choose_last(os.path.join(directory, "k-"), 3)
  try:
    assert [(c.path, c.step, c.opened.format.name) for c in chosen] == [
        (p, e, "Keras 2 .h5 weights file")
        for p, e in zip(renamed[-3:], range(3, EPOCHS + 1))]
  finally:
    for c in chosen:
      c.opened.close()


def test_shards_of_a_save_in_progress_are_not_checkpoints(runs, tmp_path):
  """Keras writes shards before their index: until it is there, the shards
  of the newest save are in the directory alone."""
  directory = str(tmp_path / "run")
  copied = _copy(runs["sharded"], directory)
  os.remove(copied[-1])  # The newest save's index, not yet written.
  listing = naming.look(directory)
  assert listing.keras_files() == [os.path.basename(p) for p in copied[:-1]]
  chosen = checkpoints.last_n(os.path.join(directory, "m-"), 3)
  assert chosen == copied[-4:-1]
  # A directory named as a checkpoint means its newest index.
  assert checkpoints.resolve(directory) == copied[-2]


def test_unsharded_files_named_as_shards_are_checkpoints(runs, tmp_path):
  """`ModelCheckpoint("w_{epoch:05d}.weights.h5")` without any index."""
  directory = str(tmp_path / "run")
  os.makedirs(directory)
  shard = _files_of(runs["sharded"][0])[0]
  for epoch in (1, 2):
    shutil.copy(shard, os.path.join(directory, f"w_{epoch:05d}.weights.h5"))
  assert naming.look(directory).keras_files() == [
      "w_00001.weights.h5", "w_00002.weights.h5"]


def test_a_truncated_file_found_through_prefix_is_an_error(runs, tmp_path):
  """One-shot: the last N cannot be told without it (exit 1, as the README
  says); continuous mode leaves it for the next look (still being written)."""
  directory = str(tmp_path / "run")
  copied = _copy(runs["h5"], directory)
  size = os.path.getsize(copied[-1])
  os.truncate(copied[-1], size // 2)
  output = str(tmp_path / "avg.h5")
  line = error_line(call_cli(f"--prefix={directory}/w-",
                             "--num_last_checkpoints=3",
                             f"--output_path={output}"))
  assert line == (
      f"t2t_avg: error: {copied[-1]} is truncated: its HDF5 superblock says "
      f"it ends at byte {size}, but it has {size // 2} bytes; it is one of "
      f"the Keras files named w-* in {directory}, whose order needs every "
      "one: wait until it is written, or move it away")
  assert not os.path.exists(output)
  outcomes = list(average_all(directory, str(tmp_path / "windows"), n=3))
  assert [[c.path for c in o.inputs] for o in outcomes] == [
      copied[0:3], copied[1:4]]


# --- continuous mode ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["h5", "sharded"])
def test_continuous_mode_writes_each_window_beside_its_record(runs, tmp_path,
                                                              kind):
  inputs = runs[kind]
  model_dir = os.path.dirname(inputs[0])
  output_dir = str(tmp_path / "windows")
  outcomes = list(average_all(model_dir, output_dir, n=3))
  assert [o.status for o in outcomes] == [continuous.WRITTEN] * (EPOCHS - 2)
  for outcome, newest in zip(outcomes, range(3, EPOCHS + 1)):
    window = inputs[newest - 3:newest]
    assert [c.path for c in outcome.inputs] == window
    assert outcome.output_path == os.path.join(
        output_dir, os.path.basename(window[-1]))
    assert os.path.isfile(outcome.output_path + ".t2t_avg.json")
    expected = _expected(window)
    assert_same_values(_datasets(outcome.output_path), expected)
  if kind == "h5":
    assert_same_values(_reloaded_tf_keras(outcomes[-1].output_path), expected)
  else:
    assert_same_values(_reloaded_keras(outcomes[-1].output_path), expected)
  # A restart leaves them as they are; the outputs' shards are no inputs.
  again = list(average_all(model_dir, output_dir, n=3))
  assert [o.status for o in again] == [continuous.EXISTED] * (EPOCHS - 2)


def test_continuous_mode_waits_for_the_index_of_a_save_in_progress(
    runs, tmp_path):
  directory = str(tmp_path / "run")
  copied = _copy(runs["sharded"], directory)
  index = copied[-1] + ".saved"
  os.rename(copied[-1], index)
  written = []

  def on_sleep(count):
    if count == 2:  # The index arrives after the shards.
      os.rename(index, copied[-1])

  class Time:
    now = os.path.getmtime(copied[0])

    def clock(self):
      return self.now

    def sleep(self, seconds):
      self.now += seconds
      written.append(seconds)
      on_sleep(len(written))

  clock = Time()
  outcomes = list(average_all(directory, str(tmp_path / "avg"), n=3,
                              wait_minutes=1, poll_seconds=5,
                              clock=clock.clock, sleep=clock.sleep))
  assert [[os.path.basename(c.path) for c in o.inputs] for o in outcomes] == [
      [os.path.basename(p) for p in copied[i - 3:i]]
      for i in range(3, EPOCHS + 1)]
  assert_same_values(_datasets(outcomes[-1].output_path),
                     _expected(copied[-3:]))


@pytest.mark.parametrize("kind, suffix", [("h5", ".h5"),
                                          ("sharded", ".weights.json")])
def test_the_continuous_log_says_what_it_waits_for(runs, tmp_path, caplog,
                                                   kind, suffix):
  model_dir = os.path.dirname(runs[kind][0])
  now = [time.time()]

  def sleep(seconds):
    now[0] += seconds

  with caplog.at_level(std_logging.INFO):
    outcomes = list(average_all(model_dir, str(tmp_path / "avg"), n=3,
                                wait_minutes=1, poll_seconds=30,
                                clock=lambda: now[0], sleep=sleep))
  assert len(outcomes) == EPOCHS - 2
  waits = [m for m in logged(caplog, std_logging.INFO)
           if m.startswith("Waiting till")]
  assert waits and all(m.endswith(f" for a new Keras file in {model_dir} "
                                  f"(*{suffix})") for m in waits), waits
  assert ".index" not in caplog.text


# --- what a mistyped name says -----------------------------------------------

def test_a_missing_keras_file_gets_no_index_hint(runs):
  directory = os.path.dirname(runs["h5"][0])
  for name in ("w-09.h5", "m-09.weights.json"):
    with pytest.raises(AveragingError) as error:
      checkpoints.resolve(os.path.join(directory, name))
    assert ".index" not in str(error.value)
    assert f"{directory}/{name} does not exist" in str(error.value)


def test_a_missing_keras_file_on_the_command_line_is_one_line(runs, tmp_path):
  directory = os.path.dirname(runs["sharded"][0])
  line = error_line(call_cli(f"--checkpoints={directory}/m-5.weights.json",
                             f"--output_path={tmp_path}/avg.weights.json"))
  # What is there, shards left out.
  assert line == (
      f"t2t_avg: error: checkpoint {directory}/m-5.weights.json does not "
      f"exist; {directory} holds " + ", ".join(
          f"m-{e:02d}.weights.json" for e in range(1, EPOCHS + 1)))
