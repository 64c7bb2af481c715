"""The Keras 3 callback, fitted for real beside Keras' own ModelCheckpoint as the oracle.

Every fit saves each epoch with `ModelCheckpoint(save_weights_only=True)`;
expectations are computed from those files with h5py (`keras_runs`), and the
model's weights are read back through Keras' own `save_weights`.
"""
import glob
import os
import subprocess
import sys

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import assert_same_values, read_record
from keras_runs import datasets, expected_average
from keras_runs import softmax_weights

keras = pytest.importorskip("keras")

from t2t_avg.engine.running_sum import RunningSum  # noqa: E402
from t2t_avg.errors import ArgumentError, AveragingError  # noqa: E402
from t2t_avg.keras import AverageCheckpoints  # noqa: E402

TMP_MARK = ".t2t_avg-tmp."


def _data(seed=0, n=96):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32) +
       rng.normal(scale=0.3, size=(n, 1)).astype(np.float32))
  return x, y


def _model():
  model = keras.Sequential([
      keras.Input((4,)), keras.layers.Dense(8),
      keras.layers.BatchNormalization(), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
  return model


class _DiskWatch(keras.callbacks.Callback):
  """Lists the callback's private directories at every epoch's end."""

  def __init__(self, out_dir):
    super().__init__()
    self.out_dir = out_dir
    self.seen = []  # (private directories, weights files in them)

  def on_epoch_end(self, epoch, logs=None):
    private = glob.glob(os.path.join(self.out_dir, TMP_MARK + "*"))
    files = [f for d in private for f in os.listdir(d)
             if f.endswith((".weights.h5", ".keras"))]
    self.seen.append((len(private), len(files)))


def _fit(tmp_path, avg, *, epochs=6, before=(), after=(), model=None):
  """Fits with ModelCheckpoint (the oracle), then `avg`, then `after`."""
  keras.utils.set_random_seed(3)
  model = model or _model()
  x, y = _data()
  vx, vy = _data(seed=1, n=32)
  oracle = keras.callbacks.ModelCheckpoint(
      str(tmp_path / "mc" / "e{epoch}.weights.h5"), save_weights_only=True)
  watch = _DiskWatch(os.path.dirname(avg.output_path))
  history = model.fit(x, y, validation_data=(vx, vy), epochs=epochs,
                      batch_size=16, verbose=0,
                      callbacks=[oracle, *before, avg, watch, *after])
  return model, history, watch


def _epoch_file(tmp_path, epoch):
  return str(tmp_path / "mc" / f"e{epoch}.weights.h5")


def _model_only(values):
  """The model's datasets of a ModelCheckpoint file (not the optimizer's)."""
  return {k: v for k, v in values.items() if not k.startswith("optimizer/")}


def _expected(tmp_path, epochs, weights=None):
  return _model_only(expected_average(
      [_epoch_file(tmp_path, e) for e in epochs], weights))


def _model_values(model, tmp_path):
  """The model's weights, read back through Keras' own saving."""
  path = str(tmp_path / "model-now.weights.h5")
  keras.saving.save_weights(model, path, objects_to_skip=[model.optimizer])
  return datasets(path)


def _left_beside(output):
  return sorted(os.listdir(os.path.dirname(output)))


def test_uniform_last_n_is_the_float64_mean_of_the_last_epochs(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  avg = AverageCheckpoints(output, last_n=3)
  model, _, watch = _fit(tmp_path, avg)

  expected = _expected(tmp_path, [4, 5, 6])
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  assert _left_beside(output) == ["avg.weights.h5",
                                  "avg.weights.h5.t2t_avg.json"]
  assert max(files for _, files in watch.seen) == 3
  assert all(dirs == 1 for dirs, _ in watch.seen)
  record = read_record(output)
  assert record["training"]["epochs"] == [4, 5, 6]
  assert record["weighting"]["scheme"] == "uniform"
  assert np.isfinite(model.evaluate(*_data(seed=2, n=32), verbose=0))


def test_optimizer_state_is_left_as_training_left_it(tmp_path):
  captured = {}

  class Capture(keras.callbacks.Callback):
    def on_train_end(self, logs=None):  # Runs before the average's.
      captured["state"] = [np.array(v) for v in self.model.optimizer.variables]

  output = str(tmp_path / "out" / "avg.weights.h5")
  model, _, _ = _fit(tmp_path, AverageCheckpoints(output, last_n=2),
                     before=[Capture()])

  after = [np.array(v) for v in model.optimizer.variables]
  assert len(after) == len(captured["state"]) > 2
  for old, new in zip(captured["state"], after):
    assert old.tobytes() == new.tobytes()
  with h5py.File(output) as f:
    assert "optimizer" not in f  # Snapshots hold the model's weights only.


def test_save_freq_snapshots_every_kth_epoch_from_start_epoch(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  avg = AverageCheckpoints(output, last_n=2, start_epoch=2, save_freq=2)
  model, _, watch = _fit(tmp_path, avg, epochs=7)

  expected = _expected(tmp_path, [4, 6])
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  assert [files for _, files in watch.seen] == [0, 1, 1, 2, 2, 2, 2]


def test_top_k_takes_the_best_epochs_by_fits_own_history(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  avg = AverageCheckpoints(output, last_n=4, weighting="top_k", top_k=2,
                           monitor="val_loss")
  model, history, _ = _fit(tmp_path, avg)

  losses = history.history["val_loss"]
  window = [3, 4, 5, 6]
  best = sorted(window, key=lambda e: (losses[e - 1], -e))[:2]
  expected = _expected(tmp_path, sorted(best))
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  assert read_record(output)["weighting"]["selected"] == sorted(
      window.index(e) for e in best)


def test_softmax_weights_by_the_temperature_rule(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  avg = AverageCheckpoints(output, last_n=4, weighting="softmax")
  model, history, _ = _fit(tmp_path, avg)

  window = [3, 4, 5, 6]
  losses = [history.history["val_loss"][e - 1] for e in window]
  weights = softmax_weights(losses)  # T = population std of the 4 losses
  assert len(set(np.round(weights, 6))) > 1
  expected = _expected(tmp_path, window, weights)
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  record = read_record(output)
  assert [row["metric"] for row in record["inputs"]] == losses
  assert record["weighting"]["temperature"] == float(np.std(losses))


def test_start_epoch_alone_averages_every_epoch_from_k_without_files(tmp_path):
  output = str(tmp_path / "out" / "swa.weights.h5")
  avg = AverageCheckpoints(output, start_epoch=3)
  model, _, watch = _fit(tmp_path, avg, epochs=7)

  expected = _expected(tmp_path, [3, 4, 5, 6, 7])
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  assert all(files == 0 for _, files in watch.seen)  # A sum in memory.
  assert _left_beside(output) == ["swa.weights.h5",
                                  "swa.weights.h5.t2t_avg.json"]
  record = read_record(output)
  assert record["training"]["epochs"] == [3, 4, 5, 6, 7]
  assert record["effective_count"] == pytest.approx(5)
  assert [row["step"] for row in record["inputs"]] == [3, 4, 5, 6, 7]


def test_early_stopping_averages_the_epochs_that_ran(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1,
                                       min_delta=1e9)  # Stops after epoch 2.
  model, history, _ = _fit(tmp_path, AverageCheckpoints(output, last_n=3),
                           before=[stop], epochs=10)

  assert len(history.history["loss"]) == 2
  expected = _expected(tmp_path, [1, 2])
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  assert "stopped after epoch 2 of 10" in read_record(output)["training"][
      "ending"]


def test_keyboard_interrupt_then_on_train_end_averages_what_ended(tmp_path):
  class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      if epoch + 1 == 3:
        raise KeyboardInterrupt

  output = str(tmp_path / "out" / "avg.weights.h5")
  avg = AverageCheckpoints(output, last_n=2)
  model = _model()
  with pytest.raises(KeyboardInterrupt):
    _fit(tmp_path, avg, after=[Interrupt()], model=model)
  assert not os.path.exists(output)
  avg.on_train_end()

  expected = _expected(tmp_path, [2, 3])
  assert_same_values(datasets(output), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  assert "after epoch 3 of 6 (interrupted)" in read_record(output)["training"][
      "ending"]
  assert _left_beside(output) == ["avg.weights.h5",
                                  "avg.weights.h5.t2t_avg.json"]


def test_keras_output_is_a_whole_model_holding_the_average(tmp_path):
  output = str(tmp_path / "out" / "avg.keras")
  model, _, _ = _fit(tmp_path, AverageCheckpoints(output, last_n=2))

  expected = _expected(tmp_path, [5, 6])
  loaded = keras.models.load_model(output)
  assert_same_values(_model_values(loaded, tmp_path), expected)
  assert_same_values(_model_values(model, tmp_path), expected)
  x, y = _data(seed=2, n=32)
  assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
  assert _left_beside(output) == ["avg.keras", "avg.keras.t2t_avg.json"]


def test_restore_false_leaves_the_model_as_training_left_it(tmp_path):
  output = str(tmp_path / "out" / "avg.keras")
  model, _, _ = _fit(tmp_path, AverageCheckpoints(output, start_epoch=5,
                                                  restore=False))

  assert_same_values(_model_values(model, tmp_path),
                     _model_only(datasets(_epoch_file(tmp_path, 6))))
  assert_same_values(_model_values(keras.models.load_model(output), tmp_path),
                     _expected(tmp_path, [5, 6]))


def test_directory_of_model_checkpoint_files_aligned_by_epoch(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  avg = AverageCheckpoints(output, last_n=3, weighting="rank",
                           directory=str(tmp_path / "mc"))
  model, history, _ = _fit(tmp_path, avg)

  losses = np.array(history.history["val_loss"][3:])
  ranks = np.argsort(np.argsort(-losses)) + 1.0  # best (lowest) gets 3
  expected = expected_average([_epoch_file(tmp_path, e) for e in (4, 5, 6)],
                              (ranks / ranks.sum()).tolist())
  assert_same_values(datasets(output), expected)  # optimizer slots too
  assert_same_values(_model_values(model, tmp_path), _model_only(expected))
  assert int(model.optimizer.iterations) == 6 * 6  # 96 / 16 steps an epoch


def _batch_statistics(x, kernel, bias, batch_size):
  """Torch's update_bn by hand: the mean over batches of each batch's mean
  and (biased) variance of the BatchNormalization input."""
  hidden = [x[i:i + batch_size].astype(np.float64) @ kernel + bias
            for i in range(0, len(x), batch_size)]
  return (np.mean([h.mean(axis=0) for h in hidden], axis=0),
          np.mean([h.var(axis=0) for h in hidden], axis=0))


def test_bn_data_recomputes_the_statistics_of_the_average(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  x, _ = _data()
  avg = AverageCheckpoints(output, last_n=2, bn_data=x, bn_batch_size=24)
  model, _, _ = _fit(tmp_path, avg)

  expected = _expected(tmp_path, [5, 6])
  found = datasets(output)
  mean, variance = _batch_statistics(x, expected["layers/dense/vars/0"],
                                     expected["layers/dense/vars/1"], 24)
  bn = "layers/batch_normalization/vars/"
  np.testing.assert_allclose(found[bn + "2"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(found[bn + "3"], variance, rtol=1e-5)
  assert not np.allclose(found[bn + "2"], expected[bn + "2"], rtol=1e-3)
  for name in expected:  # The weights are the plain average.
    if name not in (bn + "2", bn + "3"):
      assert found[name].tobytes() == expected[name].tobytes(), name
  assert_same_values(_model_values(model, tmp_path), found)
  assert model.layers[1].momentum == 0.99  # Put back.
  record = read_record(output)
  assert record["training"]["bn_data"] == {
      "layers": 1, "batches": 4, "examples": 96}
  assert record["effective_count"] == pytest.approx(2)
  assert [row["step"] for row in record["inputs"]] == [5, 6]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give last_n (average the last N epochs) or start_epoch"),
    ({"last_n": 0}, "last_n must be an integer >= 1 or None, not 0"),
    ({"last_n": True}, "last_n must be an integer >= 1 or None, not True"),
    ({"start_epoch": 0}, "start_epoch must be an integer >= 1"),
    ({"last_n": 3, "save_freq": 0}, "save_freq must be a number of epochs"),
    ({"start_epoch": 2, "weighting": "softmax"},
     "weighting=softmax needs last_n"),
    ({"last_n": 3, "weighting": "top_k", "top_k": 4},
     "top_k must be between 1 and last_n=3, not 4"),
    ({"last_n": 3, "weighting": "top_k"}, "weighting=top_k needs top_k=k"),
    ({"last_n": 3, "weighting": "greedy"}, "weighting must be one of"),
    ({"last_n": 3, "temperature": 1.0}, "temperature goes with weighting="),
    ({"last_n": 3, "mode": "lowest"}, "mode must be one of"),
    ({"last_n": 3, "weighting": "rank", "monitor": "lr"},
     "pass mode=min|max"),
    ({"last_n": 3, "directory": "mc", "save_freq": 2},
     "save_freq is for the callback's own snapshots"),
    ({"last_n": 3, "bn_data": [1], "bn_batch_size": 0},
     "bn_batch_size must be an integer >= 1"),
])
def test_bad_arguments_are_refused_naming_the_parameter(tmp_path, kwargs,
                                                         message):
  with pytest.raises(ArgumentError) as error:
    AverageCheckpoints(str(tmp_path / "avg.weights.h5"), **kwargs)
  assert message in str(error.value)
  assert "--" not in str(error.value)


@pytest.mark.parametrize("output", ["avg.h5", "avg.weights.json",
                                    "gs://bucket/avg.weights.h5", "a[1].keras"])
def test_an_output_keras_cannot_use_is_refused(output):
  with pytest.raises(ArgumentError, match="output_path"):
    AverageCheckpoints(output, last_n=2)


def test_nothing_to_average_is_an_error_and_leaves_nothing(tmp_path):
  output = str(tmp_path / "out" / "avg.weights.h5")
  with pytest.raises(AveragingError, match="no epoch from start_epoch=9"):
    _fit(tmp_path, AverageCheckpoints(output, start_epoch=9), epochs=2)
  assert _left_beside(output) == []


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16,
                                   ml_dtypes.bfloat16, np.complex64])
def test_running_sum_mean_is_the_float64_mean_cast_once(dtype):
  rng = np.random.default_rng(0)
  members = [[rng.normal(size=(5, 3)).astype(dtype),
              np.array(i, np.int64)] for i in range(7)]
  total = RunningSum(["w", "counter"])
  for member in members:
    total.add(member)

  mean, counter = total.means()
  wide = np.complex128 if dtype == np.complex64 else np.float64
  expected = sum(m[0].astype(wide) for m in members) / 7
  assert mean.dtype == np.dtype(dtype)
  assert mean.tobytes() == expected.astype(dtype).tobytes()
  assert counter == 6  # The newest member's, not averaged.
  with pytest.raises(AveragingError, match=r"variable w is \S+ \[3, 5\] now"):
    total.add([np.zeros((3, 5), dtype), np.array(0, np.int64)])
  with pytest.raises(AveragingError, match="1 arrays to add to a running sum "
                     "of 2"):
    total.add(iter([members[0][0]]))


def test_manager_checkpoints_average_and_restore(tmp_path):
  tf = pytest.importorskip("tensorflow")
  from t2t_avg import average_manager_checkpoints  # pylint: disable=import-outside-toplevel
  variable = tf.Variable(np.zeros(3, np.float32))
  checkpoint = tf.train.Checkpoint(v=variable)
  manager = tf.train.CheckpointManager(checkpoint, str(tmp_path / "train"),
                                       max_to_keep=4)
  values = []
  for step in range(1, 6):
    value = np.random.default_rng(step).normal(size=3).astype(np.float32)
    variable.assign(value)
    values.append(value)
    manager.save()

  result = average_manager_checkpoints(manager, str(tmp_path / "avg" / "v"),
                                       last_n=3, restore_into=checkpoint)

  expected = (sum(v.astype(np.float64) for v in values[-3:]) / 3).astype(
      np.float32)
  assert result.output_path == str(tmp_path / "avg" / "v-5")
  assert variable.numpy().tobytes() == expected.tobytes()
  reader = tf.train.load_checkpoint(result.output_path)
  assert reader.get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE").tobytes() == (
      expected.tobytes())


def test_importing_t2t_avg_does_not_import_keras():
  code = ("import sys, t2t_avg; import t2t_avg.options; "
          "print('keras' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "False"
