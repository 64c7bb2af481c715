"""One-shot averaging: the numbers, against the real legacy T2T script."""
import json
import os
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from conftest import (REPO, call_cli, mixed_series, read_checkpoint,
                      run_cli, run_legacy, step_valued, tree_fingerprint,
                      write_tf1_series)


def _float_items(values):
  return {k: v for k, v in values.items()
          if getattr(v, "dtype", None) is not None and v.dtype.kind == "f"
          or getattr(v, "dtype", None) == ml_dtypes.bfloat16}


def _assert_bit_identical(ours, legacy):
  floats = _float_items(legacy)
  assert floats, "no float tensors compared"
  for name, value in floats.items():
    assert ours[name].dtype == value.dtype, name
    assert ours[name].tobytes() == value.tobytes(), name


def _average_with_both(tmp_path, *flags):
  """Runs legacy avg_checkpoints and t2t_avg on the same flags; their outputs."""
  run_legacy("avg_checkpoints", *flags,
             f"--output_path={tmp_path}/legacy/avg.ckpt")
  result = call_cli(*flags, f"--output_path={tmp_path}/ours/avg.ckpt")
  assert result.returncode == 0, result.stderr[-2000:]
  return (read_checkpoint(f"{tmp_path}/ours/avg.ckpt-0"),
          read_checkpoint(f"{tmp_path}/legacy/avg.ckpt-0"), result)


def test_uniform_matches_legacy_bit_for_bit_for_every_float_dtype(tmp_path):
  prefixes = mixed_series(str(tmp_path / "train"), [100, 200, 300, 400])
  ours, legacy, _ = _average_with_both(tmp_path,
                                       f"--checkpoints={','.join(prefixes)}")
  assert set(ours) == set(legacy)
  _assert_bit_identical(ours, legacy)
  assert ours["global_step"] == 0 and ours["global_step"].dtype == np.int64
  # Legacy averaged and truncated integers; t2t_avg copies the newest.
  assert ours["train_stats/problem_0_steps"] == 400 * 5 + 1
  assert legacy["train_stats/problem_0_steps"] != 400 * 5 + 1


def test_num_last_checkpoints_matches_legacy_and_leaves_state_file(tmp_path):
  prefixes = mixed_series(str(tmp_path / "train"), [10, 20, 30, 40, 50])
  before = tree_fingerprint(tmp_path / "train")
  ours, legacy, result = _average_with_both(
      tmp_path, f"--prefix={tmp_path}/train/", "--num_last_checkpoints=3")
  _assert_bit_identical(ours, legacy)
  assert tree_fingerprint(tmp_path / "train") == before
  record = json.loads(open(f"{tmp_path}/ours/avg.ckpt-0.t2t_avg.json").read())
  assert [r["path"] for r in record["inputs"]] == prefixes[-3:]
  assert [r["step"] for r in record["inputs"]] == [30, 40, 50]
  state = open(f"{tmp_path}/ours/checkpoint").read()
  assert 'model_checkpoint_path: "avg.ckpt-0"' in state
  assert f"--checkpoint_path={tmp_path}/ours/avg.ckpt-0" in result.stderr


def test_sharded_inputs_match_legacy(tmp_path):
  prefixes = mixed_series(str(tmp_path / "train"), [1, 2, 3], shards=2)
  assert len([f for f in os.listdir(tmp_path / "train")
              if f.startswith("model.ckpt-3.data-")]) > 1
  _assert_bit_identical(*_average_with_both(
      tmp_path, f"--checkpoints={','.join(prefixes)}")[:2])


def test_directory_means_its_latest_and_prefix_is_prepended(tmp_path):
  from t2t_avg import average_checkpoints
  write_tf1_series(str(tmp_path / "a"), [1, 2],
                   step_valued({"w": (2, 3)}))
  write_tf1_series(str(tmp_path / "b"), [5, 7],
                   step_valued({"w": (2, 3)}))
  result = average_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")],
                               str(tmp_path / "out/avg"), output_step="last")
  assert [r.path for r in result.rows] == [f"{tmp_path}/a/model.ckpt-2",
                                           f"{tmp_path}/b/model.ckpt-7"]
  assert result.output_path == f"{tmp_path}/out/avg-7"
  out = read_checkpoint(result.output_path)
  np.testing.assert_array_equal(out["w"], np.full((2, 3), 4.5, np.float32))
  assert out["global_step"] == 7

  from t2t_avg import options

  from t2t_avg.jobs import oneshot
  chosen = oneshot.choose(options.InputOptions(
      checkpoints=("model.ckpt-1", " model.ckpt-2 ", ""),
      prefix=f"{tmp_path}/a/"))
  assert chosen == [f"{tmp_path}/a/model.ckpt-1", f"{tmp_path}/a/model.ckpt-2"]


def test_output_step_integer_and_global_step(tmp_path):
  from t2t_avg import average_checkpoints
  prefixes = write_tf1_series(str(tmp_path / "t"), [3, 9],
                              step_valued({"v": (4,)}, np.float64))
  result = average_checkpoints(prefixes, str(tmp_path / "o/avg"),
                               output_step=1234)
  out = read_checkpoint(result.output_path)
  assert result.output_path.endswith("avg-1234") and out["global_step"] == 1234
  np.testing.assert_array_equal(out["v"], np.full((4,), 6.0))


def _keras_run(directory, saves):
  """A Keras model and Adam saved with tf.train.Checkpoint after each epoch."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.Dense(2)])
  optimizer = keras.optimizers.Adam(0.05)
  model.compile(optimizer, "mse")
  ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
  x = np.random.default_rng(0).random((64, 4), np.float32)
  y = np.random.default_rng(1).random((64, 2), np.float32)
  paths, weights = [], []
  for _ in range(saves):
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    paths.append(ckpt.save(os.path.join(directory, "ckpt")))
    weights.append([w.numpy() for w in model.weights])
  return paths, weights


def _fresh_keras():
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.Dense(2)])
  optimizer = keras.optimizers.Adam(0.05)
  optimizer.build(model.trainable_variables)
  return model, tf.train.Checkpoint(model=model, optimizer=optimizer)


def test_keras_object_based_checkpoint_restores_with_the_mean(tmp_path):
  from t2t_avg import average_checkpoints
  paths, weights = _keras_run(str(tmp_path / "k"), 3)
  result = average_checkpoints(paths, str(tmp_path / "avg/ckpt"),
                               output_step="last")
  # Steps come from the optimizer's iteration counter, not the save count.
  assert [r.step_source for r in result.rows] == [
      "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] * 3
  assert [r.step for r in result.rows] == [8, 16, 24]
  model, ckpt = _fresh_keras()
  ckpt.restore(result.output_path).assert_existing_objects_matched()
  for i, variable in enumerate(model.weights):
    stacked = np.stack([w[i].astype(np.float64) for w in weights])
    expected = (stacked.sum(axis=0) / 3).astype(np.float32)
    np.testing.assert_array_equal(variable.numpy(), expected)
  assert "global_step" not in read_checkpoint(result.output_path)


def test_tf2_state_file_listing_only_newest_uses_unlisted_older_saves(
    tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "tf2"
  variable = tf.Variable(np.zeros(3, np.float32))
  ckpt = tf.train.Checkpoint(v=variable)
  for value in range(1, 6):
    variable.assign(np.full(3, value, np.float32))
    ckpt.save(str(directory / "ckpt"))
  state = open(directory / "checkpoint").read()
  assert "ckpt-1" not in state and 'model_checkpoint_path: "ckpt-5"' in state
  # An earlier output of this tool in the same directory is never an input.
  for name in os.listdir(directory):
    if name.startswith("ckpt-2."):
      os.remove(directory / name)
  from t2t_avg import average_checkpoints
  average_checkpoints([f"{directory}/ckpt-1"], str(directory / "ckpt"),
                      output_step=2)
  assert open(directory / "checkpoint").read() == state
  result = call_cli(f"--prefix={directory}/ckpt", "--num_last_checkpoints=4",
                    f"--output_path={tmp_path}/out/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(open(f"{tmp_path}/out/avg-0.t2t_avg.json").read())
  used = [os.path.basename(r["path"]) for r in record["inputs"]]
  assert used == ["ckpt-1", "ckpt-3", "ckpt-4", "ckpt-5"]
  out = read_checkpoint(f"{tmp_path}/out/avg-0")
  np.testing.assert_array_equal(out["v/.ATTRIBUTES/VARIABLE_VALUE"],
                                np.full(3, 13 / 4, np.float32))


def test_moved_training_directory_uses_same_basenames(tmp_path):
  mixed_series(str(tmp_path / "old/train"), [1, 2, 3])
  state = open(tmp_path / "old/train/checkpoint").read()
  assert str(tmp_path / "old/train") in state  # Absolute paths, as TF1 wrote.
  shutil.move(str(tmp_path / "old/train"), str(tmp_path / "new"))
  result = call_cli(f"--prefix={tmp_path}/new/model.ckpt",
                    "--num_last_checkpoints=2",
                    f"--output_path={tmp_path}/out/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "was moved" in result.stderr
  record = json.loads(open(f"{tmp_path}/out/avg-0.t2t_avg.json").read())
  assert [r["path"] for r in record["inputs"]] == [
      f"{tmp_path}/new/model.ckpt-2", f"{tmp_path}/new/model.ckpt-3"]


def test_output_in_training_directory_leaves_its_state_file(tmp_path):
  prefixes = write_tf1_series(str(tmp_path / "t"), [1, 2],
                              step_valued({"w": (2,)}))
  state = open(tmp_path / "t/checkpoint").read()
  result = call_cli(f"--checkpoints={','.join(prefixes)}",
                    f"--output_path={tmp_path}/t/averaged.ckpt",
                    "--write_meta", "--exclude_variables=^global_step$")
  assert result.returncode == 0, result.stderr[-2000:]
  assert open(tmp_path / "t/checkpoint").read() == state
  assert "Not touching" in result.stderr
  out = read_checkpoint(f"{tmp_path}/t/averaged.ckpt-0")
  assert set(out) == {"w"}
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  graph = tf.Graph()
  with graph.as_default():
    saver = tf.compat.v1.train.import_meta_graph(
        f"{tmp_path}/t/averaged.ckpt-0.meta")
    with tf.compat.v1.Session() as sess:
      saver.restore(sess, f"{tmp_path}/t/averaged.ckpt-0")
      np.testing.assert_array_equal(
          sess.run(graph.get_tensor_by_name("w:0")), [1.5, 1.5])


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path):
  prefixes = write_tf1_series(str(tmp_path / "t"), [10, 20],
                              step_valued({"w": (2,)}))
  result = call_cli(f"--checkpoints={','.join(prefixes)}",
                    f"--output_path={tmp_path}/out/avg", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")
  lines = result.stdout.strip().splitlines()
  assert lines[0].split() == ["checkpoint", "step", "metric", "weight"]
  assert lines[1].split() == [prefixes[0], "10", "-", "0.5000"]
  assert lines[2].split() == [prefixes[1], "20", "-", "0.5000"]
  assert "effective number of checkpoints: 2.00 of 2" in lines[3]


def test_warns_when_num_last_is_ignored_and_when_fewer_are_found(tmp_path):
  prefixes = write_tf1_series(str(tmp_path / "t"), [1, 2],
                              step_valued({"w": (2,)}))
  result = call_cli(f"--checkpoints={prefixes[0]}", "--num_last_checkpoints=5",
                    f"--output_path={tmp_path}/a/avg")
  assert result.returncode == 0 and "is ignored" in result.stderr
  result = call_cli(f"--prefix={tmp_path}/t/model.ckpt",
                    "--num_last_checkpoints=5",
                    f"--output_path={tmp_path}/b/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "only 2 checkpoints were found" in result.stderr


def test_importing_t2t_avg_needs_no_tensorflow():
  # -S: no site-packages at all (no TensorFlow, no numpy); what needs
  # TensorFlow says how to install it (tests/test_without_tensorflow.py).
  code = (f"import sys; sys.path.insert(0, {REPO!r}); import t2t_avg; "
          "print(sorted(m for m in sys.modules if m.startswith(('tensorflow', "
          "'numpy'))))")
  result = subprocess.run([sys.executable, "-S", "-c", code],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32,
                                   np.float64])
def test_weighted_average_is_float64_sum_cast_once(tmp_path, dtype):
  from t2t_avg import average_checkpoints
  rng = np.random.default_rng(3)
  values = {s: {"x": rng.standard_normal((1000,)).astype(dtype)}
            for s in (1, 2, 3)}
  prefixes = write_tf1_series(str(tmp_path / "t"), [1, 2, 3],
                              lambda s: values[s])
  weights = [0.2, 0.3, 0.5]
  result = average_checkpoints(prefixes, str(tmp_path / "o/avg"),
                               weights=weights)
  expected = np.zeros(1000)
  for w, s in zip(weights, (1, 2, 3)):
    expected += w * values[s]["x"].astype(np.float64)
  out = read_checkpoint(result.output_path)["x"]
  assert out.dtype == np.dtype(dtype)
  assert out.tobytes() == expected.astype(dtype).tobytes()


def test_zero_weights_are_left_out_and_equal_ones_are_uniform(tmp_path):
  from t2t_avg import average_checkpoints
  prefixes = mixed_series(str(tmp_path / "t"), [1, 2, 3, 4])
  picked = average_checkpoints(prefixes, str(tmp_path / "a/avg"),
                               weights=[0, 1, 0, 1])
  uniform = average_checkpoints([prefixes[1], prefixes[3]],
                                str(tmp_path / "b/avg"))
  _assert_bit_identical(read_checkpoint(picked.output_path),
                        read_checkpoint(uniform.output_path))
  assert [r.weight for r in picked.rows] == [0, 0.5, 0, 0.5]
  assert picked.effective_count == pytest.approx(2.0)


@pytest.mark.parametrize("weights", [None, [0.5, 0.25, 0.25]])
def test_chunk_size_changes_no_bit(tmp_path, monkeypatch, weights):
  from t2t_avg import average_checkpoints
  from t2t_avg.engine import streaming
  prefixes = mixed_series(str(tmp_path / "t"), [1, 2, 3])
  whole = average_checkpoints(prefixes, str(tmp_path / "whole/avg"),
                              weights=weights)
  assert len(os.listdir(tmp_path / "whole")) > 0
  # 1000 bytes: many chunks per tensor, boundaries inside rows, and a last
  # chunk shorter than the others.
  monkeypatch.setattr(streaming, "CHUNK_BYTES", 1000)
  chunked = average_checkpoints(prefixes, str(tmp_path / "chunked/avg"),
                                weights=weights)
  ours, reference = (read_checkpoint(chunked.output_path),
                     read_checkpoint(whole.output_path))
  assert set(ours) == set(reference)
  for name, value in reference.items():
    assert ours[name].tobytes() == value.tobytes(), name
  key = "transformer/body/encoder/layer_0/self_attention/q/kernel"
  values = [read_checkpoint(p)[key].astype(np.float64) for p in prefixes]
  if weights is None:
    expected = sum(values) / 3
  else:
    expected = sum(w * v for w, v in zip(weights, values))
  assert ours[key].tobytes() == expected.astype(np.float32).tobytes()


def test_partitioned_variables_match_legacy(tmp_path):
  """TF1 partitioned variables are saved as slices: TF's reader joins them."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf1 = tf.compat.v1
  rng = np.random.default_rng(5)
  graph = tf.Graph()
  with graph.as_default():
    var = tf1.get_variable("embedding", shape=(10, 4), dtype=tf.float32,
                           partitioner=tf1.fixed_size_partitioner(3))
    value = tf1.placeholder(tf.float32, (10, 4))
    assign = [p.assign(value[s:s + p.shape[0]]) for p, s in
              zip(var, np.cumsum([0] + [p.shape[0] for p in var])[:-1])]
    tf1.train.get_or_create_global_step()
    saver = tf1.train.Saver(max_to_keep=5)
    prefixes = []
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      for step in (1, 2, 3):
        sess.run(assign, {value: rng.standard_normal((10, 4))})
        prefixes.append(saver.save(sess, str(tmp_path / "t/model.ckpt"),
                                   global_step=step))
  ours, legacy, _ = _average_with_both(tmp_path,
                                       f"--checkpoints={','.join(prefixes)}")
  assert ours["embedding"].shape == (10, 4)
  _assert_bit_identical(ours, legacy)


def test_help_lists_the_flags_of_both_modes():
  result = run_cli("--help")
  for flag in ("--checkpoints", "--num_last_checkpoints", "--output_path",
               "--weighting", "--metrics_from_events", "--model_dir", "--n:"):
    assert flag in result.stdout, flag


def test_a_failing_worker_is_reported_not_the_one_it_stopped(tmp_path,
                                                             monkeypatch):
  """Two workers: one streams a large tensor in tiny chunks while the other
  hits a checksum error; the error names the corrupted variable."""
  from t2t_avg import AveragingError, average_checkpoints, formats
  from t2t_avg.engine import streaming
  prefixes = write_tf1_series(
      str(tmp_path / "t"), [1, 2],
      lambda s: {"big": np.full((200000,), s, np.float32),
                 "small": np.full((10,), s, np.float32)})
  part = formats.open_source(prefixes[1]).tensors()["small"].parts[0]
  with open(part.file, "r+b") as f:
    f.seek(part.offset)
    f.write(np.float32(7).tobytes())
  monkeypatch.setattr(streaming, "CHUNK_BYTES", 64)
  with pytest.raises(AveragingError, match="variable small fails its "
                     "checksum"):
    average_checkpoints(prefixes, str(tmp_path / "o/avg"))
  assert not os.path.exists(tmp_path / "o/avg-0.index")
  assert os.listdir(tmp_path / "o") == []


def test_a_second_run_writing_the_same_output_is_refused(tmp_path):
  from t2t_avg import AveragingError, average_checkpoints
  prefixes = write_tf1_series(str(tmp_path / "t"), [1, 2],
                              step_valued({"w": (2,)}))
  out = tmp_path / "out"
  out.mkdir()
  writing = subprocess.Popen([sys.executable, "-c", "import time; "
                              "time.sleep(60)"])
  try:
    (out / ".t2t_avg-writing.avg-0").write_text(str(writing.pid))
    with pytest.raises(AveragingError, match=f"another t2t_avg run \\(pid "
                       f"{writing.pid}\\) is writing {out}/avg-0"):
      average_checkpoints(prefixes, str(out / "avg"))
    assert sorted(os.listdir(out)) == [".t2t_avg-writing.avg-0"]
  finally:
    writing.kill()
    writing.wait()
  # The writer is gone: its mark is taken over, and removed when done.
  result = average_checkpoints(prefixes, str(out / "avg"))
  np.testing.assert_array_equal(read_checkpoint(result.output_path)["w"],
                                [1.5, 1.5])
  assert not [n for n in os.listdir(out) if n.startswith(".t2t_avg")]


@pytest.fixture(scope="module")
def many_small(tmp_path_factory):
  """Three checkpoints of 300 small float32 tensors (SaveV2, as TF1 saves)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp("many_small")
  rng = np.random.default_rng(3)
  names = [f"layer_{i:03d}/kernel" for i in range(300)]
  prefixes, values = [], []
  for step in (1, 2, 3):
    tensors = {n: rng.standard_normal((i % 7 + 1, 5)).astype(np.float32)
               for i, n in enumerate(names)}
    prefix = str(directory / f"model.ckpt-{step}")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tensors[n] for n in names])
    prefixes.append(prefix)
    values.append(tensors)
  return prefixes, values


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_runs_of_small_tensors_average_each_exactly(many_small, tmp_path,
                                                    weights, monkeypatch):
  from t2t_avg import average_checkpoints  # pylint: disable=import-outside-toplevel
  from t2t_avg.engine import streaming
  prefixes, values = many_small
  runs = []
  real = streaming._run_batch  # pylint: disable=protected-access
  monkeypatch.setattr(streaming, "_run_batch",
                      lambda run, *a: runs.append(len(run.units)) or real(run, *a))
  result = average_checkpoints(prefixes, str(tmp_path / "avg"),
                               weights=weights)
  assert sum(runs) == 300 and len(runs) == 1  # One read per input for all.
  out = read_checkpoint(result.output_path)
  w = weights or [1 / 3] * 3
  for name in values[0]:
    if weights is None:
      expected = sum(v[name].astype(np.float64) for v in values) / 3
    else:
      expected = sum(wi * v[name].astype(np.float64)
                     for wi, v in zip(w, values))
    assert out[name].tobytes() == expected.astype(np.float32).tobytes(), name


@pytest.mark.parametrize("damage", ["bit_flip", "nan"])
def test_a_bad_tensor_inside_a_run_is_named(many_small, tmp_path, damage):
  from t2t_avg import AveragingError, average_checkpoints, formats  # pylint: disable=import-outside-toplevel
  prefixes, _ = many_small
  copy = tmp_path / "copy"
  shutil.copytree(os.path.dirname(prefixes[0]), copy)
  damaged = [str(copy / os.path.basename(p)) for p in prefixes]
  part = formats.open_source(damaged[1]).tensors()["layer_150/kernel"].parts[0]
  with open(part.file, "r+b") as f:
    f.seek(part.offset + 4)
    f.write(np.float32(np.nan).tobytes() if damage == "nan" else b"\x01\x02")
  if damage == "nan":  # Rewrite the checksum: a NaN the trainer wrote.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    reader = tf.train.load_checkpoint(prefixes[1])
    names = sorted(reader.get_variable_to_shape_map())
    tensors = [reader.get_tensor(n) for n in names]
    tensors[names.index("layer_150/kernel")].reshape(-1)[1] = np.nan
    tf.raw_ops.SaveV2(prefix=damaged[1], tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=tensors)
    match = (f"variable layer_150/kernel in checkpoint {damaged[1]} holds NaN "
             "or inf")
  else:
    match = (f"checkpoint {damaged[1]} is corrupted: variable "
             "layer_150/kernel fails its checksum")
  with pytest.raises(AveragingError, match=re.escape(match)):
    average_checkpoints(damaged, str(tmp_path / "out/avg"))
  assert os.listdir(tmp_path / "out") == []
