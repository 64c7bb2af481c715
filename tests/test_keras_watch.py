"""Continuous mode over a ModelCheckpoint folder: windows, names, restarts, live."""
import glob
import logging as std_logging
import os
import subprocess
import sys
import textwrap

from conftest import REPO, assert_same_values, average_all, wait_for_first_save
from keras_runs import (csv_column, datasets, expected_average,
                        softmax_weights)
from keras_runs import keras_runs_fixture  # noqa: F401  (the fixture)
from t2t_avg.jobs import continuous


def _average_all(model_dir, output_dir, wait_minutes=0, **weighting):
  return list(average_all(model_dir, output_dir, n=3,
                          wait_minutes=wait_minutes, poll_seconds=0.1,
                          **weighting))


def _check_uniform(outcomes):
  for outcome in outcomes:
    inputs = [s.path for s in outcome.inputs]
    assert outcome.status == continuous.WRITTEN, outcome.reason
    assert os.path.basename(outcome.output_path) == os.path.basename(
        inputs[-1])
    assert_same_values(datasets(outcome.output_path),
                       expected_average(inputs))


def test_keras_archives_average_per_window_and_restart_without_recompute(
    keras_runs, tmp_path):
  run = keras_runs["mixed_float16"]
  model_dir = os.path.dirname(run.archives[0])
  output_dir = str(tmp_path / "avg")
  outcomes = _average_all(model_dir, output_dir)
  assert [os.path.basename(o.output_path) for o in outcomes] == [
      "m-03.keras", "m-04.keras"]
  assert [o.step for o in outcomes] == [12, 16]  # the iteration counters
  _check_uniform(outcomes)
  assert not os.path.exists(os.path.join(output_dir, "checkpoint"))
  before = {p: os.stat(p).st_mtime_ns for p in glob.glob(output_dir + "/*")}
  again = _average_all(model_dir, output_dir)
  assert [o.status for o in again] == [continuous.EXISTED] * 2
  assert before == {p: os.stat(p).st_mtime_ns
                    for p in glob.glob(output_dir + "/*")}


def test_weighted_windows_by_csvlogger_rows(keras_runs, tmp_path):
  run = keras_runs["float32"]
  outcomes = _average_all(os.path.dirname(run.weights[0]),
                          str(tmp_path / "avg"), weighting="softmax",
                          metrics_from_events=(run.csv_log,),
                          metric="val_loss")
  logged = csv_column(run.csv_log, "val_loss")
  assert [o.status for o in outcomes] == [continuous.WRITTEN] * 2
  for outcome in outcomes:
    inputs = [s.path for s in outcome.inputs]
    epochs = [int(os.path.basename(p)[2:4]) for p in inputs]
    weights = softmax_weights([logged[e - 1] for e in epochs])
    assert [r.weight for r in outcome.result.rows] == weights
    assert_same_values(datasets(outcome.output_path),
                       expected_average(inputs, weights))


_TRAINER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
    import keras
    from keras_runs import build_model, data
    directory, epochs = sys.argv[1], int(sys.argv[2])
    keras.utils.set_random_seed(0)
    model = build_model()

    class Pause(keras.callbacks.Callback):
      def on_epoch_end(self, epoch, logs=None):
        if epoch % 3 != 1:  # every third save follows the one before at once
          time.sleep(0.3)

    model.fit(*data(), batch_size=16, epochs=epochs, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "w-{epoch:02d}.weights.h5"),
            save_weights_only=True),
        Pause()])
""")


def test_beside_a_live_modelcheckpoint_run(tmp_path, caplog):
  train, output_dir = str(tmp_path / "train"), str(tmp_path / "avg")
  os.makedirs(train)
  epochs = 8
  trainer = subprocess.Popen(
      [sys.executable, "-c", _TRAINER, train, str(epochs), REPO],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), stderr=subprocess.PIPE,
      text=True)
  try:
    wait_for_first_save(trainer, os.path.join(train, "*.weights.h5"))
    with caplog.at_level(std_logging.INFO):
      outcomes = _average_all(train, output_dir, wait_minutes=0.05)
  finally:
    _, stderr = trainer.communicate(timeout=120)
  assert trainer.returncode == 0, stderr[-2000:]
  # One window per file from the third on, none skipped, each the exact
  # uniform average of its three files, named after the newest.
  assert [o.step for o in outcomes] == [4 * e for e in range(3, epochs + 1)]
  _check_uniform(outcomes)
  assert sorted(os.listdir(output_dir)) == sorted(
      [f"w-{e:02d}.weights.h5" for e in range(3, epochs + 1)] +
      [f"w-{e:02d}.weights.h5.t2t_avg.json" for e in range(3, epochs + 1)])
  assert "by their optimizer iteration counters" in caplog.text
