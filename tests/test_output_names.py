"""An output's name must be its inputs' format: a folder of TF checkpoints
(tf.train.CheckpointManager, with a state file) beside Keras 3 weights."""
import os

import numpy as np
import pytest

from conftest import error_line, read_checkpoint, run_cli

COUNT = 4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """ckpt-1..4 (CheckpointManager, v = i) and w-01..04.weights.h5 (a Dense
  layer whose kernel is i) in one directory."""
  # pylint: disable=import-outside-toplevel
  import keras
  import tensorflow as tf
  directory = tmp_path_factory.mktemp("mixed")
  v = tf.Variable(np.zeros(3, np.float32))
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v),
                                       str(directory), max_to_keep=COUNT)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
  weights = []
  for i in range(1, COUNT + 1):
    v.assign(np.full(3, i, np.float32))
    manager.save()
    model.layers[0].kernel.assign(np.full((2, 2), i, np.float32))
    model.layers[0].bias.assign(np.full((2,), -i, np.float32))
    weights.append(str(directory / f"w-{i:02d}.weights.h5"))
    model.save_weights(weights[-1])
  return {"dir": str(directory), "model": model, "weights": weights,
          "tf": [str(directory / f"ckpt-{i}") for i in range(1, COUNT + 1)]}


def test_a_keras_name_for_the_tf_checkpoints_a_state_file_lists_is_refused(
    mixed, tmp_path):
  out = tmp_path / "out"
  result = run_cli(f"--prefix={mixed['dir']}/w-", "--num_last_checkpoints=3",
                   f"--output_path={out}/mx.weights.h5")
  line = error_line(result)
  assert line == (
      f"t2t_avg: error: --output_path '{out}/mx.weights.h5' ends in "
      ".weights.h5, a Keras name, but the inputs are TF checkpoints "
      f"({mixed['dir']}/checkpoint lists ckpt-2, ckpt-3, ckpt-4: for "
      f"--prefix={mixed['dir']}/w-, legacy T2T takes the checkpoints of the "
      "state file in its directory; to average the Keras files there, name "
      "them with --checkpoints): the output would be TF files "
      f"{out}/mx.weights.h5-<step>.index and .data-*, which Keras does not "
      f"load; choose a TF prefix (e.g. {out}/mx)")
  assert not out.exists()
  assert "Averaging" not in result.stderr  # Refused before any work.


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_a_library_caller_gets_the_refusal_for_tf_inputs(mixed, tmp_path,
                                                         suffix):
  from t2t_avg import ArgumentError, average_checkpoints  # pylint: disable=import-outside-toplevel
  output = str(tmp_path / "out" / f"avg{suffix}")
  with pytest.raises(ArgumentError) as error:
    average_checkpoints(mixed["tf"][-2:], output)
  assert str(error.value) == (
      f"output_path '{output}' ends in {suffix}, a Keras name, but the inputs "
      f"are TF checkpoints: the output would be TF files {output}-<step>.index"
      " and .data-*, which Keras does not load; choose a TF prefix (e.g. "
      f"{tmp_path}/out/avg)")
  assert not (tmp_path / "out").exists()


def test_a_tf_name_for_keras_files_says_how_they_were_found(mixed, tmp_path):
  keras_only = tmp_path / "keras"
  keras_only.mkdir()
  for path in mixed["weights"]:
    os.link(path, keras_only / os.path.basename(path))
  out = tmp_path / "out"
  line = error_line(run_cli(f"--prefix={keras_only}/w-",
                            "--num_last_checkpoints=2",
                            f"--output_path={out}/avg.ckpt"))
  assert line == (
      f"t2t_avg: error: --output_path '{out}/avg.ckpt' must end in "
      ".weights.h5 for Keras .weights.h5 file inputs (w-03.weights.h5, "
      f"w-04.weights.h5, found by --prefix={keras_only}/w-, with no state "
      "file in its directory): Keras reads them only under such names (e.g. "
      f"{out}/avg.weights.h5)")
  assert not out.exists()


def test_each_kind_of_the_folder_averages_under_its_own_name(mixed, tmp_path):
  """What the refusals point to works: TF to a prefix, Keras by name."""
  import keras  # pylint: disable=import-outside-toplevel
  tf_out, keras_out = tmp_path / "tf" / "avg", tmp_path / "k" / "avg.weights.h5"
  result = run_cli(f"--prefix={mixed['dir']}/w-", "--num_last_checkpoints=3",
                   f"--output_path={tf_out}")
  assert result.returncode == 0, result.stderr[-2000:]
  expected = np.mean([np.float64(i) for i in (2, 3, 4)]).astype(np.float32)
  values = read_checkpoint(f"{tf_out}-0")
  np.testing.assert_array_equal(values["v/.ATTRIBUTES/VARIABLE_VALUE"],
                                np.full(3, expected, np.float32))

  names = ",".join(os.path.basename(p) for p in mixed["weights"][-3:])
  result = run_cli(f"--prefix={mixed['dir']}/", f"--checkpoints={names}",
                   f"--output_path={keras_out}")
  assert result.returncode == 0, result.stderr[-2000:]
  model = keras.models.clone_model(mixed["model"])
  model.load_weights(str(keras_out))
  kernel, bias = (np.asarray(w) for w in model.layers[0].weights)
  np.testing.assert_array_equal(kernel, np.full((2, 2), expected, np.float32))
  np.testing.assert_array_equal(bias, np.full((2,), -expected, np.float32))
