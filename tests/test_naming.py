"""Naming schemes: TF -N names (zero-padded), Keras names with several numbers,
one listing per look and one open per file, continuous mode without TF."""
import collections
import os

import h5py
import numpy as np
import pytest

from conftest import (assert_same_values, one_shot, run_cli_without_tensorflow,
                      step_valued, write_tf1_series)
from keras_runs import csv_column, datasets
from keras_runs import expected_average, softmax_weights
from t2t_avg import options
from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.inputs import naming

# Windows in this file are small: every training below is a few seconds.
_X = np.random.RandomState(0).rand(32, 4).astype(np.float32)
_Y = _X.sum(axis=1, keepdims=True)


def _tf_mean(prefixes):
  """{name: value} TF's reader gives: float tensors the float64 mean of the
  inputs cast once, others from the newest."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  readers = [tf.train.load_checkpoint(p) for p in prefixes]
  expected = {}
  for name in readers[-1].get_variable_to_shape_map():
    newest = readers[-1].get_tensor(name)
    if np.asarray(newest).dtype.kind != "f":
      expected[name] = newest
      continue
    total = sum(np.asarray(r.get_tensor(name), np.float64) for r in readers)
    expected[name] = (total / len(readers)).astype(newest.dtype)
  return expected


# --- TF names: tf_keras' ModelCheckpoint("ckpt-{epoch:02d}") ----------------

@pytest.fixture(scope="module", name="tf_keras_run")
def tf_keras_run_fixture(tmp_path_factory):
  """ckpt-01 ... ckpt-06 by tf_keras' ModelCheckpoint (save_weights_only):
  TF checkpoints, a state file naming only the newest."""
  tf_keras = pytest.importorskip("tf_keras")
  directory = str(tmp_path_factory.mktemp("tf_keras") / "run")
  tf_keras.utils.set_random_seed(0)
  model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,)),
                               tf_keras.layers.Dense(1)])
  model.compile("adam", "mse")
  model.fit(_X, _Y, epochs=6, batch_size=8, verbose=0, callbacks=[
      tf_keras.callbacks.ModelCheckpoint(os.path.join(directory,
                                                      "ckpt-{epoch:02d}"),
                                         save_weights_only=True)])
  return directory


def test_zero_padded_tf_names_are_all_found(tf_keras_run, tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  state = tf.train.get_checkpoint_state(tf_keras_run)
  assert list(state.all_model_checkpoint_paths) == [
      os.path.join(tf_keras_run, "ckpt-06")]  # TF lists only the newest.
  result = one_shot(prefix=tf_keras_run + "/", num_last_checkpoints=5,
                     output_path=str(tmp_path / "avg.ckpt"))
  inputs = [os.path.join(tf_keras_run, f"ckpt-{e:02d}") for e in range(2, 7)]
  assert [row.path for row in result.rows] == inputs
  reader = tf.train.load_checkpoint(result.output_path)
  expected = _tf_mean(inputs)
  assert sorted(reader.get_variable_to_shape_map()) == sorted(expected)
  for name, value in expected.items():
    got = reader.get_tensor(name)
    assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), name


@pytest.mark.parametrize("names, steps", [
    (["ckpt-09", "ckpt-10", "ckpt-08"], [8, 9, 10]),
    (["ckpt-99", "ckpt-100", "ckpt-098"], [98, 99, 100]),
    (["ckpt-7", "ckpt-06", "model-5", "ckpt-x"], [6, 7])])
def test_tf_names_of_mixed_widths_sort_by_number(names, steps):
  listing = naming.Listing("d", frozenset(
      [n + ".index" for n in names] + ["checkpoint"]))
  found = naming.TFNames("ckpt").find_all("d", listing)
  assert [c.step for c in found] == steps
  assert all(c.path == os.path.join("d", f"{os.path.basename(c.path)}")
             for c in found)


# --- Keras names with several numbers: s-{epoch:02d}-{batch:03d} ------------

@pytest.fixture(scope="module", name="epoch_batch_run")
def epoch_batch_run_fixture(tmp_path_factory):
  """Keras 3 ModelCheckpoint("s-{epoch:02d}-{batch:03d}.weights.h5",
  save_freq=2) over 6 epochs of 4 batches, with a CSVLogger."""
  import keras  # pylint: disable=import-outside-toplevel
  directory = str(tmp_path_factory.mktemp("epoch_batch"))
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.Dense(1)])
  model.compile(keras.optimizers.Adam(0.01), "mse")
  csv_log = os.path.join(directory, "log.csv")
  model.fit(_X, _Y, epochs=6, batch_size=8, verbose=0,
            validation_data=(_X[:8], _Y[:8]), callbacks=[
                keras.callbacks.ModelCheckpoint(
                    os.path.join(directory,
                                 "s-{epoch:02d}-{batch:03d}.weights.h5"),
                    save_weights_only=True, save_freq=2),
                keras.callbacks.CSVLogger(csv_log)])
  return directory, csv_log


_PATTERN = "s-{epoch:02d}-{batch:03d}.weights.h5"


def test_an_epoch_is_never_guessed_between_two_numbers(epoch_batch_run,
                                                       tmp_path):
  directory, csv_log = epoch_batch_run
  with pytest.raises(ArgumentError) as error:
    one_shot(prefix=directory + "/", num_last_checkpoints=2,
              weighting="softmax", metrics_from_events=[csv_log],
              metric="val_loss", output_path=str(tmp_path / "a.weights.h5"))
  assert error.value.message(as_flags=True) == (
      f"checkpoint {directory}/s-06-002.weights.h5 has several numbers in "
      "its name (6, 2), so its epoch is not known for sure and a metric "
      "logged per epoch cannot be matched to it; give the ModelCheckpoint "
      "filepath that named it as --name_pattern (e.g. "
      "'s-{epoch}-{batch}.weights.h5')")
  assert not os.path.exists(tmp_path / "a.weights.h5")
  # Named by the pattern, the last two are both of epoch 6: refused too.
  with pytest.raises(AveragingError, match=r"both have epoch 6 in their "):
    one_shot(prefix=directory + "/", num_last_checkpoints=2,
              weighting="softmax", metrics_from_events=[csv_log],
              metric="val_loss", name_pattern=_PATTERN,
              output_path=str(tmp_path / "b.weights.h5"))


def test_the_name_pattern_pairs_files_with_their_epochs_rows(epoch_batch_run,
                                                              tmp_path):
  directory, csv_log = epoch_batch_run
  names = ["s-03-004.weights.h5", "s-04-002.weights.h5",
           "s-06-004.weights.h5"]
  output = str(tmp_path / "avg.weights.h5")
  result = one_shot(prefix=directory + "/", checkpoints=names,
                     weighting="softmax", metrics_from_events=[csv_log],
                     metric="val_loss", name_pattern=_PATTERN,
                     output_path=output)
  rows = csv_column(csv_log, "val_loss")
  values = [rows[epoch - 1] for epoch in (3, 4, 6)]  # CSV epochs: 0-based
  weights = softmax_weights(values)
  assert [row.metric for row in result.rows] == values
  np.testing.assert_allclose([row.weight for row in result.rows], weights,
                             rtol=1e-12)
  inputs = [os.path.join(directory, n) for n in names]
  assert_same_values(datasets(output),
                     expected_average(inputs, [r.weight for r in result.rows]))


@pytest.mark.parametrize("pattern, name, epoch", [
    (_PATTERN, "s-06-002.weights.h5", 6),
    ("w.{epoch:02d}-{val_loss:.2f}.keras", "w.12-0.52.keras", 12),
    ("b{batch}-e{epoch}.weights.h5", "b7-e3.weights.h5", 3),
    (_PATTERN, "other-06.weights.h5", None),
    ("", "s-06-002.weights.h5", None), ("", "resnet50-07.weights.h5", 7)])
def test_the_epoch_of_a_name(pattern, name, epoch):
  assert naming.KerasNames(pattern=pattern).epoch_of(f"/d/{name}") == epoch


@pytest.mark.parametrize("pattern, why", [
    ("s-{batch}.weights.h5", "has no {epoch} field"),
    ("s-{epoch.weights.h5", "is not a format string")])
def test_a_name_pattern_without_an_epoch_is_refused(pattern, why):
  with pytest.raises(ArgumentError) as error:
    options.AveragingOptions(name_pattern=pattern)
  assert error.value.message(as_flags=True).startswith(
      f"--name_pattern {pattern!r} {why}")


# --- one listing per look, one open per file --------------------------------

def test_last_2_of_10_keras_files_list_once_and_open_each_once(
    tmp_path, monkeypatch):
  import keras  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "ten"
  directory.mkdir()
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  model.compile("adam", "mse")
  for epoch in range(1, 11):
    model.fit(_X, _Y.repeat(2, 1), epochs=1, batch_size=8, verbose=0)
    model.save_weights(str(directory / f"w-{epoch:02d}.weights.h5"))
  counts = collections.Counter()
  real_scandir, real_listdir = os.scandir, os.listdir
  real_init = h5py.File.__init__

  def scandir(path="."):
    counts["scans"] += str(tmp_path) in os.path.abspath(path)
    return real_scandir(path)

  def listdir(path="."):
    counts["scans"] += str(tmp_path) in os.path.abspath(path)
    return real_listdir(path)

  def init(self, name, *args, **kwargs):
    counts["opens"] += isinstance(name, (str, os.PathLike)) or hasattr(
        name, "read")
    real_init(self, name, *args, **kwargs)

  monkeypatch.setattr(os, "scandir", scandir)
  monkeypatch.setattr(os, "listdir", listdir)
  monkeypatch.setattr(h5py.File, "__init__", init)
  result = one_shot(prefix=f"{directory}/", num_last_checkpoints=2,
                     dry_run=True, output_path=str(tmp_path / "a.weights.h5"))
  monkeypatch.undo()
  assert [os.path.basename(r.path) for r in result.rows] == [
      "w-09.weights.h5", "w-10.weights.h5"]
  assert [r.step for r in result.rows] == [9 * 4, 10 * 4]  # the counters
  assert counts["scans"] <= 2 and counts["opens"] <= 10, counts


# --- continuous mode without TensorFlow -------------------------------------

_NO_TF_CHECK = ("from t2t_avg.formats import tf_bundle\n"
                "tf_bundle.verify_readable = lambda prefix, tensors: None")


def test_a_local_continuous_run_of_tf_checkpoints_imports_no_tensorflow(
    tmp_path):
  train = str(tmp_path / "train")
  prefixes = write_tf1_series(train, [10, 20, 30], step_valued({"w": (3,)}))
  result = run_cli_without_tensorflow(
      f"--model_dir={train}", f"--output_dir={tmp_path}/avg", "--n=2",
      setup=_NO_TF_CHECK)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow never imported" in result.stdout
  for step, window in ((20, prefixes[:2]), (30, prefixes[1:])):
    output = naming.OutputNames().build_name(str(tmp_path / "avg"), step)
    expected = _tf_mean(window)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    reader = tf.train.load_checkpoint(output)
    for name, value in expected.items():
      if name != "global_step":
        assert reader.get_tensor(name).tobytes() == value.tobytes(), name
    assert reader.get_tensor("global_step") == step


def test_a_local_continuous_run_of_keras_files_imports_no_tensorflow(
    epoch_batch_run, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  directory, _ = epoch_batch_run
  train = tmp_path / "train"
  train.mkdir()
  names = ["s-05-004.weights.h5", "s-06-002.weights.h5",
           "s-06-004.weights.h5"]
  for name in names:
    shutil.copy(os.path.join(directory, name), train)
  result = run_cli_without_tensorflow(
      f"--model_dir={train}", f"--output_dir={tmp_path}/avg", "--n=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow never imported" in result.stdout
  for i in (1, 2):
    inputs = [str(train / n) for n in names[i - 1:i + 1]]
    assert_same_values(datasets(str(tmp_path / "avg" / names[i])),
                       expected_average(inputs))


def test_continuous_windows_open_each_checkpoint_once(tmp_path, monkeypatch):
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import formats
  from t2t_avg.jobs import continuous  # pylint: disable=import-outside-toplevel
  train = str(tmp_path / "train")
  prefixes = write_tf1_series(train, [10, 20, 30, 40, 50],
                              step_valued({"w": (3,)}))
  opened = collections.Counter()
  real_open = formats.open_source

  def open_source(path):
    opened[path] += 1
    return real_open(path)

  monkeypatch.setattr(formats, "open_source", open_source)
  written = continuous.run(options.ContinuousOptions(
      model_dir=train, output_dir=str(tmp_path / "avg"), n=3))
  assert written == [naming.OutputNames().build_name(str(tmp_path / "avg"),
                                                     step)
                     for step in (30, 40, 50)]
  assert opened == {prefix: 1 for prefix in prefixes}  # was 1, 2, 3, 2, 1


def test_a_deflated_keras_file_is_extracted_once(tmp_path, monkeypatch):
  import zipfile  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from t2t_avg.formats import keras_zip  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "m"
  directory.mkdir()
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
  model.compile("adam", "mse")
  for epoch in range(1, 4):
    model.fit(_X, _Y, epochs=1, batch_size=8, verbose=0)
    saved = str(tmp_path / f"m-{epoch:02d}.keras")
    model.save(saved)
    with zipfile.ZipFile(saved) as stored, zipfile.ZipFile(
        directory / f"m-{epoch:02d}.keras", "w",
        zipfile.ZIP_DEFLATED) as deflated:
      for info in stored.infolist():
        deflated.writestr(info.filename, stored.read(info))
  extracted = collections.Counter()
  real_extract = keras_zip._extract  # pylint: disable=protected-access

  def extract(path, info):
    extracted[os.path.basename(path)] += 1
    return real_extract(path, info)

  monkeypatch.setattr(keras_zip, "_extract", extract)
  result = one_shot(prefix=f"{directory}/", num_last_checkpoints=2,
                     dry_run=True, output_path=str(tmp_path / "a.keras"))
  assert [os.path.basename(r.path) for r in result.rows] == [
      "m-02.keras", "m-03.keras"]
  assert extracted == {f"m-{e:02d}.keras": 1 for e in (1, 2, 3)}
