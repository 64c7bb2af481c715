"""Keras 2 (tf_keras) `.h5` weights and full models: averaged in their layout, loaded back."""
import os

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import assert_same_values, error_line, float64_mean, run_cli
from t2t_avg import average_checkpoints
from t2t_avg.errors import ArgumentError, AveragingError

EPOCHS, BATCHES = 3, 2  # Each epoch: BATCHES optimizer steps.


# --- real files, written by tf_keras -----------------------------------------

def _data(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(8 * BATCHES, 4)).astype(np.float32),
          rng.normal(size=(8 * BATCHES, 2)).astype(np.float32))


def _model(tf_keras, float16_layer=False):
  layers = [tf_keras.layers.Input((4,)), tf_keras.layers.Dense(6, name="d1"),
            tf_keras.layers.BatchNormalization(name="bn")]
  if float16_layer:
    layers.append(tf_keras.layers.Dense(5, dtype="float16", name="half"))
  layers.append(tf_keras.layers.Dense(2, dtype="float32", name="out"))
  model = tf_keras.Sequential(layers)
  model.compile(tf_keras.optimizers.Adam(0.05), "mse")
  return model


def _train(directory, policy):
  """tf_keras' ModelCheckpoint writing weights (`w-01.h5`...) and full
  models (`m-01.h5`...) after each epoch."""
  import tf_keras  # pylint: disable=import-outside-toplevel
  os.makedirs(directory)
  tf_keras.utils.set_random_seed(1)
  tf_keras.mixed_precision.set_global_policy(policy)
  try:
    model = _model(tf_keras, float16_layer=policy == "mixed_float16")
    checkpoint = tf_keras.callbacks.ModelCheckpoint
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=EPOCHS, verbose=0, shuffle=False,
              callbacks=[
                  checkpoint(os.path.join(directory, "w-{epoch:02d}.h5"),
                             save_weights_only=True),
                  checkpoint(os.path.join(directory, "m-{epoch:02d}.h5"))])
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
  return [os.path.join(directory, f"{kind}-{e:02d}.h5")
          for kind in ("w", "m") for e in range(1, EPOCHS + 1)]


@pytest.fixture(scope="module", name="runs")
def runs_fixture(tmp_path_factory):
  """{policy: {'w': [weights files], 'm': [full models]}}, oldest first."""
  root = tmp_path_factory.mktemp("keras2")
  runs = {}
  for policy in ("float32", "mixed_float16"):
    files = _train(str(root / policy), policy)
    runs[policy] = {"w": files[:EPOCHS], "m": files[EPOCHS:]}
  return runs


# --- expectations, from the inputs with h5py ---------------------------------

def _datasets(path):
  """{dataset path: value} (tf_keras' unmarked 2-byte data as bfloat16)."""
  values = {}
  with h5py.File(path, "r") as f:
    def visit(name, item):
      if isinstance(item, h5py.Dataset):
        value = item[()]
        if value.dtype.kind == "V" and value.dtype.itemsize == 2:
          value = np.asarray(value).view(ml_dtypes.bfloat16)
        values[name] = value
    f.visititems(visit)
  return values


def _attributes(path):
  """{object path: {attribute: value as text}} of every group and the root."""
  found = {}
  with h5py.File(path, "r") as f:
    def visit(name, item):
      found[name] = {k: str(v) for k, v in item.attrs.items()}
    visit("/", f)
    f.visititems(visit)
  return found


def _names(group, attribute):
  """A tf_keras name list (`layer_names`, `weight_names`), as text."""
  return [n.decode("utf-8") if isinstance(n, bytes) else str(n)
          for n in group.attrs[attribute]]


def _in_load_order(path, expected=None):
  """[(dtype, bytes)] of a file's weights in the order tf_keras loads them
  (by `layer_names` and `weight_names`, then the optimizer's), from the file
  or from `expected` ({dataset path: value})."""
  values = []
  with h5py.File(path, "r") as f:
    top = f["model_weights"] if "model_weights" in f else f
    prefix = "model_weights/" if "model_weights" in f else ""
    groups = [(top[layer], prefix + layer)
              for layer in _names(top, "layer_names")]
    if "optimizer_weights" in f:
      groups.append((f["optimizer_weights"], "optimizer_weights"))
    for group, where in groups:
      for name in _names(group, "weight_names"):
        value = (group[name][()] if expected is None
                 else expected[f"{where}/{name}"])
        values.append((value.dtype.str, value.tobytes()))
  return values


def _expected(paths, weights=None):
  """The float64 sum in input order (weighted, or / n), cast once; other
  dtypes from the last (newest) file."""
  inputs = [_datasets(p) for p in paths]
  expected = {}
  for name, newest in inputs[-1].items():
    if not np.issubdtype(newest.dtype, np.floating) and (
        newest.dtype != ml_dtypes.bfloat16):
      expected[name] = newest
      continue
    expected[name] = float64_mean([values[name] for values in inputs],
                                  newest.dtype, weights)
  return expected


# --- averages tf_keras loads -------------------------------------------------

def test_weights_files_average_to_the_mean_tf_keras_loads(runs, tmp_path):
  import tf_keras  # pylint: disable=import-outside-toplevel
  inputs = runs["float32"]["w"]
  output = str(tmp_path / "avg.h5")
  result = run_cli(f"--checkpoints={','.join(inputs)}",
                   f"--output_path={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  expected = _expected(inputs)
  assert_same_values(_datasets(output), expected)
  # The newest input's groups and attributes (layer_names, weight_names,
  # backend, keras_version) are the output's.
  assert _attributes(output) == _attributes(inputs[-1])
  model = _model(tf_keras)
  model.load_weights(output)
  resaved = str(tmp_path / "resaved.h5")
  model.save_weights(resaved)
  assert_same_values(_datasets(resaved), expected)
  x, _ = _data()
  prediction = model.predict(x, verbose=0)
  assert prediction.shape == (len(x), 2) and np.isfinite(prediction).all()
  # Weights files have no optimizer: their steps are the epochs in the names.
  assert "(from name)" in result.stderr


def test_full_models_average_to_a_model_load_model_restores(runs, tmp_path):
  import tf_keras  # pylint: disable=import-outside-toplevel
  inputs = runs["float32"]["m"][1:]
  output = str(tmp_path / "avg.h5")
  result = average_checkpoints(inputs, output)
  assert result.written and result.output_path == output
  # Each file's step is its optimizer's iteration counter.
  assert [(r.step, r.step_source) for r in result.rows] == [
      (e * BATCHES, "optimizer_weights/iteration:0") for e in (2, 3)]
  expected = _expected(inputs)
  assert_same_values(_datasets(output), expected)
  assert _attributes(output) == _attributes(inputs[-1])  # model_config too
  model = tf_keras.models.load_model(output)
  assert int(model.optimizer.iterations) == EPOCHS * BATCHES
  resaved = str(tmp_path / "resaved.h5")
  model.save(resaved)  # (names its optimizer's weights its own way)
  assert _in_load_order(resaved) == _in_load_order(output, expected)
  x, _ = _data()
  assert np.isfinite(model.predict(x, verbose=0)).all()


def test_mixed_float16_keeps_float16_weights(runs, tmp_path):
  import tf_keras  # pylint: disable=import-outside-toplevel
  inputs = runs["mixed_float16"]["m"]
  output = str(tmp_path / "avg.h5")
  average_checkpoints(inputs, output)
  expected = _expected(inputs)
  found = _datasets(output)
  assert_same_values(found, expected)
  assert found["model_weights/half/half/kernel:0"].dtype == np.float16
  assert found["model_weights/d1/d1/kernel:0"].dtype == np.float32
  tf_keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = tf_keras.models.load_model(output)
    resaved = str(tmp_path / "resaved.h5")
    model.save_weights(resaved)
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
  # tf_keras restores no LossScaleOptimizer state from .h5 (not even from
  # its own files): the model's weights are what it loads.
  assert_same_values(_datasets(resaved), {
      name[len("model_weights/"):]: value for name, value in expected.items()
      if name.startswith("model_weights/")})


def test_bfloat16_weights_stay_bfloat16(tmp_path):
  """tf_keras stores bfloat16 as unmarked 2-byte data (and cannot load it
  back itself): averaged as bfloat16, written back the same way."""
  import tf_keras  # pylint: disable=import-outside-toplevel
  model = tf_keras.Sequential([
      tf_keras.layers.Input((3,)),
      tf_keras.layers.Dense(4, dtype="bfloat16", name="b")])
  inputs = []
  for i in range(3):
    model.set_weights([w + i / 3 for w in model.get_weights()])
    inputs.append(str(tmp_path / f"bf-{i}.h5"))
    model.save_weights(inputs[-1])
  output = str(tmp_path / "avg.h5")
  average_checkpoints(inputs, output)
  expected = _expected(inputs)
  assert expected["b/b/kernel:0"].dtype == ml_dtypes.bfloat16
  assert_same_values(_datasets(output), expected)
  with h5py.File(output) as f, h5py.File(inputs[-1]) as newest:
    assert f["b/b/kernel:0"].dtype == newest["b/b/kernel:0"].dtype  # |V2


def test_weighted_average_through_the_library(runs, tmp_path):
  import tf_keras  # pylint: disable=import-outside-toplevel
  inputs = runs["float32"]["w"][:2]
  output = str(tmp_path / "weighted.h5")
  average_checkpoints(inputs, output, weights=[1, 3])
  assert_same_values(_datasets(output), _expected(inputs, [0.25, 0.75]))
  model = _model(tf_keras)
  model.load_weights(output)
  assert np.isfinite(model.predict(_data()[0], verbose=0)).all()


def test_dry_run_writes_nothing(runs, tmp_path):
  inputs = runs["float32"]["m"]
  output = str(tmp_path / "avg.h5")
  result = run_cli(f"--checkpoints={','.join(inputs)}",
                   f"--output_path={output}", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(tmp_path) == []
  for path, epoch in zip(inputs, range(1, EPOCHS + 1)):
    line = next(line for line in result.stdout.splitlines() if path in line)
    assert str(epoch * BATCHES) in line.split()


def test_optimizer_weights_left_out_give_a_model_without_them(runs,
                                                               tmp_path):
  import tf_keras  # pylint: disable=import-outside-toplevel
  inputs = runs["float32"]["m"]
  output = str(tmp_path / "decode.h5")
  average_checkpoints(inputs, output, exclude_variables="^optimizer_weights/")
  expected = {name: value for name, value in _expected(inputs).items()
              if name.startswith("model_weights/")}
  assert_same_values(_datasets(output), expected)
  with h5py.File(output) as f:
    assert "optimizer_weights" not in f
  model = tf_keras.models.load_model(output)  # A fresh optimizer.
  assert int(model.optimizer.iterations) == 0
  assert np.isfinite(model.predict(_data()[0], verbose=0)).all()


def test_output_name_and_kinds_are_checked(runs, tmp_path):
  weights, models = runs["float32"]["w"], runs["float32"]["m"]
  with pytest.raises(ArgumentError) as error:
    average_checkpoints(weights, str(tmp_path / "avg.weights.json"))
  assert error.value.message(as_flags=True) == (
      f"--output_path '{tmp_path}/avg.weights.json' must end in .h5 for Keras "
      "2 .h5 weights file inputs: tf_keras writes and finds HDF5 weights "
      f"under such names (e.g. {tmp_path}/avg.h5)")
  result = run_cli(f"--checkpoints={weights[0]},{models[1]}",
                   f"--output_path={tmp_path}/avg.h5")
  assert error_line(result) == (
      f"t2t_avg: error: {weights[0]} is a Keras 2 .h5 weights file but "
      f"{models[1]} is a Keras 2 .h5 model file; average one format at a "
      "time")
  with h5py.File(str(tmp_path / "config.h5"), "w") as f:
    f.attrs["keras_version"] = "2.21.0"
  with pytest.raises(AveragingError, match=(
      r"config.h5 is a Keras 2 HDF5 file \(keras_version\) without weights "
      r"\(no layer_names attribute, no model_weights group\)$")):
    average_checkpoints([str(tmp_path / "config.h5"), weights[0]],
                        str(tmp_path / "avg.h5"))
  assert not os.path.exists(tmp_path / "avg.h5")


def test_keras3_models_saved_to_h5_count_steps_by_the_inner_optimizer(
    tmp_path):
  """Keras 3 writes `.h5` models in the Keras 2 layout; under
  mixed_float16 its LossScaleOptimizer's own counter stays 0."""
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(2)
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.Dense(2, dtype="float32")])
    # (SGD: its counter's name sorts after the wrapper's.)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    inputs = []
    for epoch in (1, 2):
      model.fit(*_data(), batch_size=8, epochs=1, verbose=0, shuffle=False)
      inputs.append(str(tmp_path / f"k3-{epoch}.h5"))
      model.save(inputs[-1])
    output = str(tmp_path / "avg.h5")
    result = average_checkpoints(inputs, output)
    loaded = keras.models.load_model(output, compile=False)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert [(r.step, r.step_source) for r in result.rows] == [
      (e * BATCHES, "optimizer_weights/sgd/iteration") for e in (1, 2)]
  expected = _expected(inputs)
  assert_same_values(_datasets(output), expected)
  assert [w.numpy().tobytes() for w in loaded.weights] == [
      value for _, value in _in_load_order(output, expected)[:4]]
