"""Keras 3 files (.weights.h5, .keras): averages Keras loads, formats, listing."""
import glob
import json
import os
import shutil
import zipfile

import h5py
import ml_dtypes
import numpy as np
import pytest

from conftest import (assert_same_values, call_cli, error_line,
                      run_cli_without_tensorflow)
from keras_runs import (build_model, data, datasets, expected_average,
                        open_weights, policy_scope)
from keras_runs import keras_runs_fixture  # noqa: F401  (the fixture)
from t2t_avg import AveragingError, average_checkpoints
from t2t_avg.inputs import checkpoints
from t2t_avg.inputs import naming
from t2t_avg.engine import streaming
from t2t_avg.jobs.compare import compare_checkpoints
from t2t_avg.errors import ArgumentError

POLICIES = ("float32", "mixed_float16")


def _reloaded(path, policy, tmp_path):
  """The model Keras rebuilds from an averaged file: its weights and
  optimizer state as Keras saves them again, and its evaluate() result."""
  import keras  # pylint: disable=import-outside-toplevel
  with policy_scope(policy):
    if path.endswith(".keras"):
      model = keras.models.load_model(path)
    else:
      model = build_model()
      model.load_weights(path)
    resaved = str(tmp_path / f"resaved-{policy}.weights.h5")
    model.save_weights(resaved)
    x, y = data()
    loss, accuracy = model.evaluate(x, y, verbose=0)
    iterations = int(model.optimizer.iterations)
  return datasets(resaved), loss, accuracy, iterations


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["weights", "archives"])
def test_uniform_average_loads_with_the_float64_mean(keras_runs, tmp_path,
                                                     policy, kind):
  run = keras_runs[policy]
  inputs = list(getattr(run, kind)[1:])
  suffix = ".keras" if kind == "archives" else ".weights.h5"
  output = str(tmp_path / f"avg{suffix}")
  result = average_checkpoints(inputs, output)
  assert result.output_path == output and os.path.isfile(output)
  expected = expected_average(inputs)
  assert_same_values(datasets(output), expected)
  found, loss, accuracy, iterations = _reloaded(output, policy, tmp_path)
  # Keras restored every weight and the optimizer state, counter included.
  assert_same_values(found, expected)
  newest = datasets(inputs[-1])
  counter = ("optimizer/inner_optimizer/vars/0" if policy == "mixed_float16"
             else "optimizer/vars/0")
  assert iterations == newest[counter] == 4 * len(run.weights)
  assert np.isfinite(loss) and 0 <= accuracy <= 1
  steps = [row.step for row in result.rows]
  assert steps == [8, 12, 16] and result.rows[0].step_source == counter
  with open(output + ".t2t_avg.json", encoding="utf-8") as f:
    assert json.load(f)["output"] == output


def test_mixed_float16_keeps_every_dtype_and_the_loss_scale_state(keras_runs,
                                                                  tmp_path):
  inputs = keras_runs["mixed_float16"].weights
  output = str(tmp_path / "avg.weights.h5")
  average_checkpoints(inputs, output)
  with open_weights(inputs[-1]) as newest, open_weights(output) as out:
    for name in ("optimizer/vars/0", "optimizer/vars/2", "optimizer/vars/4",
                 "optimizer/inner_optimizer/vars/0"):
      assert out[name].dtype == np.int64 and out[name][()] == newest[name][()]
    assert out["optimizer/vars/0"][()] == 0  # the wrapper's own counter
    assert out["layers/dense/vars/0"].dtype == np.float32
    assert dict(out["optimizer/vars"].attrs) == dict(
        newest["optimizer/vars"].attrs)


def test_keras_archive_takes_config_metadata_and_assets_from_the_newest(
    keras_runs, tmp_path):
  inputs = list(keras_runs["float32"].archives[:2])
  # An asset (e.g. a vocabulary) in the newest input goes along.
  newest = str(tmp_path / "m-02.keras")
  with zipfile.ZipFile(inputs[1]) as src, zipfile.ZipFile(newest, "w") as dst:
    for info in src.infolist():
      dst.writestr(info, src.read(info))
    dst.writestr("assets/vocabulary.txt", "a\nb\n")
  output = str(tmp_path / "avg.keras")
  average_checkpoints([inputs[0], newest], output)
  with zipfile.ZipFile(newest) as src, zipfile.ZipFile(output) as out:
    assert out.namelist() == src.namelist()
    for name in ("config.json", "metadata.json", "assets/vocabulary.txt"):
      assert out.read(name) == src.read(name), name
    assert all(i.compress_type == zipfile.ZIP_STORED and
               i.date_time == (1980, 1, 1, 0, 0, 0) for i in out.infolist())
    assert out.testzip() is None


@pytest.mark.parametrize("suffix, kind", [(".weights.h5", "weights"),
                                          (".keras", "archives")])
def test_same_inputs_give_identical_bytes(keras_runs, tmp_path, suffix, kind):
  inputs = getattr(keras_runs["mixed_float16"], kind)
  digests = set()
  for i in range(5):
    output = str(tmp_path / f"run{i}" / f"avg{suffix}")
    average_checkpoints(inputs, output, weights=[0.1, 0.2, 0.3, 0.4])
    with open(output, "rb") as f:
      digests.add(f.read())
  assert len(digests) == 1


def test_chunked_reads_and_h5py_slices_give_the_same_average(
    keras_runs, tmp_path, monkeypatch):
  inputs = keras_runs["float32"].weights[:2]
  # A copy stored chunked and gzip-compressed is read through h5py slices.
  compressed = str(tmp_path / "w-01.weights.h5")
  with h5py.File(inputs[0], "r") as src, h5py.File(compressed, "w") as dst:
    def copy(name, item):
      if isinstance(item, h5py.Dataset):
        options = {"chunks": True, "compression": "gzip"} if item.ndim else {}
        dst.create_dataset(name, data=item[()], **options)
    src.visititems(copy)
  monkeypatch.setattr(streaming, "CHUNK_BYTES", 24)  # 6 float32: split rows
  average_checkpoints([compressed, inputs[1]], str(tmp_path / "a.weights.h5"))
  assert_same_values(datasets(str(tmp_path / "a.weights.h5")),
                     expected_average(inputs))


def test_bfloat16_round_trips_as_keras_stores_it(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  paths = []
  with policy_scope("bfloat16"):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    for i in range(2):
      model.layers[0].kernel.assign(np.full((3, 4), 1.0 + i / 3))
      paths.append(str(tmp_path / f"b-{i}.weights.h5"))
      model.save_weights(paths[-1])
    output = str(tmp_path / "avg.weights.h5")
    average_checkpoints(paths, output)
    with h5py.File(output, "r") as f:
      kernel = f["layers/dense/vars/0"]
      assert kernel.dtype == np.dtype("V2")
      assert kernel.attrs["dtype"] == "bfloat16"
      stored = kernel[()].view(ml_dtypes.bfloat16)
    model.load_weights(output)
    loaded = np.asarray(model.layers[0].kernel)
  values = [np.asarray(h5py.File(p, "r")["layers/dense/vars/0"][()]).view(
      ml_dtypes.bfloat16).astype(np.float64) for p in paths]
  expected = ((values[0] + values[1]) / 2).astype(ml_dtypes.bfloat16)
  assert stored.tobytes() == expected.tobytes()
  assert loaded.astype(np.float32).tolist() == expected.astype(
      np.float32).tolist()


# --- validation, by HDF5 path ------------------------------------------------

def _edited_copy(source, target, edit):
  shutil.copyfile(source, target)
  with h5py.File(target, "a") as f:
    edit(f)
  return target


def test_mismatches_are_named_by_their_hdf5_path(keras_runs, tmp_path):
  first, second = keras_runs["float32"].weights[:2]
  missing = _edited_copy(second, str(tmp_path / "missing.weights.h5"),
                         lambda f: f.__delitem__("layers/dense/vars/1"))
  with pytest.raises(AveragingError, match=r"^variable layers/dense/vars/1 is "
                     rf"in checkpoint {first} but not in {missing}$"):
    average_checkpoints([first, missing], str(tmp_path / "o.weights.h5"))

  def reshape(f):
    del f["layers/dense/vars/1"]
    f["layers/dense/vars/1"] = np.zeros(15, np.float32)
  shaped = _edited_copy(second, str(tmp_path / "shape.weights.h5"), reshape)
  with pytest.raises(AveragingError, match=r"^variable layers/dense/vars/1 has "
                     r"shape \[16\] in checkpoint .* but \[15\] in "):
    average_checkpoints([first, shaped], str(tmp_path / "o.weights.h5"))

  def widen(f):
    value = f["layers/dense/vars/1"][()]
    del f["layers/dense/vars/1"]
    f["layers/dense/vars/1"] = value.astype(np.float64)
  wide = _edited_copy(second, str(tmp_path / "wide.weights.h5"), widen)
  with pytest.raises(AveragingError, match=r"^variable layers/dense/vars/1 has "
                     r"dtype float32 in checkpoint .* but float64 in "):
    average_checkpoints([first, wide], str(tmp_path / "o.weights.h5"))
  assert not glob.glob(str(tmp_path / "o.weights.h5*"))


def test_float32_and_mixed_float16_files_are_not_averaged_together(
    keras_runs, tmp_path):
  with pytest.raises(AveragingError, match=r"^variable optimizer/"):
    average_checkpoints([keras_runs["float32"].weights[0],
                         keras_runs["mixed_float16"].weights[0]],
                        str(tmp_path / "o.weights.h5"))


def test_output_name_must_be_one_keras_loads(keras_runs, tmp_path):
  with pytest.raises(ArgumentError) as error:
    average_checkpoints(keras_runs["float32"].weights[:2],
                        str(tmp_path / "averaged.ckpt"))
  assert error.value.message(as_flags=True) == (
      f"--output_path '{tmp_path}/averaged.ckpt' must end in .weights.h5 for "
      "Keras .weights.h5 file inputs: Keras reads them only under such names "
      f"(e.g. {tmp_path}/averaged.weights.h5)")


def test_a_file_not_written_by_t2t_avg_is_not_replaced(keras_runs, tmp_path):
  inputs = keras_runs["float32"].weights[:2]
  output = str(tmp_path / "final.weights.h5")
  shutil.copyfile(inputs[0], output)
  with pytest.raises(AveragingError) as error:
    average_checkpoints(inputs, output)
  assert error.value.message(as_flags=True) == (
      f"output {output} already exists and was not written by t2t_avg; "
      "remove it or choose another --output_path")
  with pytest.raises(AveragingError, match="is one of the input checkpoints"):
    average_checkpoints(inputs, inputs[1])
  # An earlier average (with its record) is replaced.
  os.remove(output)
  average_checkpoints(inputs, output)
  result = average_checkpoints(inputs[::-1], output)
  assert [row.path for row in result.rows] == list(inputs[::-1])
  name = "layers/dense/vars/0"
  assert datasets(output)[name].tobytes() == expected_average(
      inputs[::-1])[name].tobytes()


def test_input_files_are_never_modified(keras_runs, tmp_path):
  inputs = keras_runs["float32"].archives
  before = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in inputs}
  average_checkpoints(inputs, str(tmp_path / "avg.keras"))
  assert before == {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns)
                    for p in inputs}


def test_corrupted_stored_member_of_a_keras_file_is_refused(keras_runs,
                                                            tmp_path):
  source = keras_runs["float32"].archives[0]
  corrupted = str(tmp_path / "m-01.keras")
  data = bytearray(open(source, "rb").read())
  with zipfile.ZipFile(source) as archive:
    info = archive.getinfo("model.weights.h5")
  data[info.header_offset + 200 + info.file_size // 2] ^= 0xff
  open(corrupted, "wb").write(bytes(data))
  with pytest.raises(AveragingError, match=rf"^{corrupted} is corrupted: its "
                     r"model.weights.h5 fails its CRC-32$"):
    average_checkpoints([corrupted, keras_runs["float32"].archives[1]],
                        str(tmp_path / "o.keras"))


def test_compressed_keras_member_is_extracted_and_averaged(keras_runs,
                                                           tmp_path):
  inputs = keras_runs["float32"].archives[:2]
  deflated = str(tmp_path / "m-01.keras")
  with zipfile.ZipFile(inputs[0]) as src, zipfile.ZipFile(
      deflated, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
      dst.writestr(info.filename, src.read(info))
  output = str(tmp_path / "avg.keras")
  average_checkpoints([deflated, inputs[1]], output)
  assert_same_values(datasets(output), expected_average(inputs))


# --- what is not a Keras file: one line ---------------------------------------

def _torch_like_zip(path):
  """The member layout torch.save writes (torch itself is not installed)."""
  with zipfile.ZipFile(path, "w") as archive:
    for name in ("data.pkl", ".format_version", "byteorder", "data/0",
                 "version"):
      archive.writestr(f"state/{name}", b"\x80\x02}q\x00.")
  return path


def test_command_line_refuses_mixing_formats_in_one_line(keras_runs,
                                                         tmp_path):
  weights = keras_runs["float32"].weights[0]
  archive = keras_runs["float32"].archives[1]
  result = call_cli(f"--checkpoints={weights},{archive}",
                    f"--output_path={tmp_path}/o.weights.h5")
  assert error_line(result) == (
      f"t2t_avg: error: {weights} is a Keras .weights.h5 file but {archive} "
      "is a Keras .keras file; average one format at a time")


@pytest.mark.parametrize("make, expected", [
    (lambda d, w: _torch_like_zip(os.path.join(d, "model.pt")),
     "{path} is a PyTorch checkpoint (a torch.save zip), not a TensorFlow or "
     "Keras one: t2t_avg averages TensorFlow checkpoints (tf_keras' "
     "TF-format weights too) and Keras .weights.h5, .weights.json, .keras "
     "and .h5 files"),
    (lambda d, w: _truncated(w, os.path.join(d, "cut.weights.h5")),
     "{path} is truncated: its HDF5 superblock says it ends at byte {size}, "
     "but it has {half} bytes"),
])
def test_command_line_names_what_a_file_is(keras_runs, tmp_path, make,
                                           expected):
  weights = keras_runs["float32"].weights[0]
  path = make(str(tmp_path), weights)
  size = os.path.getsize(weights)
  result = call_cli(f"--checkpoints={path},{weights}",
                    f"--output_path={tmp_path}/o.weights.h5")
  assert error_line(result) == "t2t_avg: error: " + expected.format(
      path=path, size=size, half=size // 2)


def _truncated(source, target):
  data = open(source, "rb").read()
  open(target, "wb").write(data[:len(data) // 2])
  return target


def test_command_line_names_a_saved_model_directory(keras_runs, tmp_path):
  import logging  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  saved = str(tmp_path / "exported")
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  try:
    tf.saved_model.save(tf.Module(), saved)
  finally:
    absl_logger.setLevel(level)  # TF's saver sets it to WARNING for good.
  weights = keras_runs["float32"].weights[0]
  result = call_cli(f"--checkpoints={saved},{weights}",
                    f"--output_path={tmp_path}/o.weights.h5")
  assert error_line(result) == (
      f"t2t_avg: error: {saved} is a TensorFlow SavedModel directory "
      f"(saved_model.pb), not a checkpoint; its variables are a TF "
      f"checkpoint, {saved}/variables/variables")


def test_other_files_are_named_too(keras_runs, tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  legacy = str(tmp_path / "legacy.h5")
  model.save(legacy)
  cases = {
      # Keras 2 files are averaged, but not with Keras 3 ones.
      legacy: f"{legacy} is a Keras 2 .h5 model file but "
              f"{keras_runs['float32'].weights[0]} is a Keras .weights.h5 "
              "file; average one format at a time",
      str(tmp_path / "notes.txt"): None,
      str(tmp_path / "plain.h5"): None,
      str(tmp_path / "other.zip"): None,
  }
  open(str(tmp_path / "notes.txt"), "w").write("hello")
  with h5py.File(str(tmp_path / "plain.h5"), "w") as f:
    f["data"] = np.zeros(3)
  with zipfile.ZipFile(str(tmp_path / "other.zip"), "w") as f:
    f.writestr("readme.md", "x")
  cases[str(tmp_path / "notes.txt")] = (
      f"{tmp_path}/notes.txt is not a checkpoint: not a TensorFlow checkpoint "
      f"(no {tmp_path}/notes.txt.index), not an HDF5 file (.weights.h5, "
      ".h5), not a zip (.keras), not a JSON index (.weights.json); it starts "
      "with b'hello'")
  cases[str(tmp_path / "plain.h5")] = (
      f"{tmp_path}/plain.h5 is an HDF5 file but not Keras weights (no "
      "layers/, optimizer/ or vars/ group at its root as Keras 3 writes, no "
      "layer_names attribute as Keras 2 writes; it holds data)")
  cases[str(tmp_path / "other.zip")] = (
      f"{tmp_path}/other.zip is a zip file but not a .keras file (no "
      "config.json and model.weights.h5 at its root; it holds readme.md)")
  weights = keras_runs["float32"].weights[0]
  for path, message in cases.items():
    with pytest.raises(AveragingError) as error:
      average_checkpoints([path, weights], str(tmp_path / "o.weights.h5"))
    assert str(error.value) == message
  with pytest.raises(AveragingError) as error:
    checkpoints.resolve(str(tmp_path / "w-09.weights.h5"))
  # What is there by name (no .index hint for a Keras name).
  assert str(error.value) == (
      f"checkpoint {tmp_path}/w-09.weights.h5 does not exist; {tmp_path} "
      "holds legacy.h5, plain.h5")


# --- finding Keras files in a directory --------------------------------------

def test_last_n_in_a_directory_by_iteration_counter(keras_runs, tmp_path,
                                                    caplog):
  import logging  # pylint: disable=import-outside-toplevel
  directory = str(tmp_path / "ckpts")
  shutil.copytree(os.path.dirname(keras_runs["float32"].weights[0]), directory)
  # Names alone would order these wrongly; the counters inside do not.
  os.rename(os.path.join(directory, "w-04.weights.h5"),
            os.path.join(directory, "w-00.weights.h5"))
  with caplog.at_level(logging.INFO):
    chosen = checkpoints.last_n(os.path.join(directory, "w-"), 2)
  assert [os.path.basename(p) for p in chosen] == ["w-03.weights.h5",
                                                   "w-00.weights.h5"]
  assert "by their optimizer iteration counters (optimizer/vars/0)" in (
      caplog.text)
  # A directory given as a checkpoint means its newest file.
  assert checkpoints.resolve(directory) == chosen[-1]
  # An earlier average written there (with its record) is not an input.
  average_checkpoints(chosen, os.path.join(directory, "w-99.weights.h5"))
  assert checkpoints.last_n(os.path.join(directory, ""), 1) == chosen[-1:]


def test_files_without_a_counter_are_ordered_by_name_then_mtime(keras_runs,
                                                                tmp_path):
  directory = str(tmp_path / "plain")
  os.makedirs(directory)
  names = ["a-10.weights.h5", "a-9.weights.h5", "b.weights.h5"]
  for i, name in enumerate(names):
    path = _edited_copy(keras_runs["float32"].weights[i],
                        os.path.join(directory, name),
                        lambda f: f.__delitem__("optimizer"))
    os.utime(path, ns=(10**18 - i * 10**9,) * 2)  # newest first by mtime
  by_mtime = naming.KerasNames().find_all(directory)
  assert [os.path.basename(f.path) for f in by_mtime] == names[::-1]
  os.remove(os.path.join(directory, "b.weights.h5"))
  by_name = naming.KerasNames().find_all(directory)
  assert [(os.path.basename(f.path), f.step, f.step_source)
          for f in by_name] == [("a-9.weights.h5", 9, "name"),
                                ("a-10.weights.h5", 10, "name")]


def test_a_directory_of_tf_checkpoints_and_keras_files_is_refused(keras_runs,
                                                                  tmp_path):
  # pylint: disable-next=import-outside-toplevel
  from conftest import step_valued, write_tf1_series
  directory = str(tmp_path / "both")
  write_tf1_series(directory, [10], step_valued({"v": (2,)}))
  os.remove(os.path.join(directory, "checkpoint"))
  shutil.copy(keras_runs["float32"].weights[0], directory)
  with pytest.raises(AveragingError) as error:
    checkpoints.last_n(os.path.join(directory, ""), 2)
  assert error.value.message(as_flags=True) == (
      f"directory {directory} holds both TF checkpoints (model.ckpt-10) "
      "and Keras files (w-01.weights.h5); t2t_avg lists one kind per "
      "directory: move one kind elsewhere, or name the files with "
      "--checkpoints")


@pytest.mark.parametrize("name, number", [
    ("w-03.weights.h5", 3), ("weights.03-0.52.keras", 3),
    ("resnet50-07.weights.h5", 7), ("model_12.keras", 12),
    ("best.weights.h5", None), ("e1.5.keras", None)])
def test_the_number_modelcheckpoint_put_in_a_name(name, number):
  assert naming.name_number(f"/x/{name}") == number


# --- compare -----------------------------------------------------------------

def test_compare_reads_both_keras_formats(keras_runs, tmp_path):
  run = keras_runs["mixed_float16"]
  weights = str(tmp_path / "avg.weights.h5")
  archive = str(tmp_path / "avg.keras")
  average_checkpoints(run.weights, weights)
  average_checkpoints(run.archives, archive)
  report = compare_checkpoints(weights, archive)
  assert report.passed(strict=True)
  assert {v.status.value for v in report.variables} == {"identical"}
  assert len(report.variables) == len(datasets(weights))
  different = compare_checkpoints(run.weights[-1], weights)
  assert not different.passed()
  largest = different.largest_difference
  assert largest.name.startswith(("layers/", "optimizer/"))


def test_prefetch_finds_keras_files_without_a_state_file(keras_runs):
  from t2t_avg import options  # pylint: disable=import-outside-toplevel
  from t2t_avg.inputs import prefetch
  weights = keras_runs["float32"].weights
  directory = os.path.dirname(weights[0])
  last_two = options.InputOptions(prefix=os.path.join(directory, "w-"),
                                  num_last_checkpoints=2)
  assert prefetch.input_prefixes(last_two) == list(weights[-2:])
  listed = options.InputOptions(checkpoints=(weights[0],))
  assert prefetch.input_prefixes(listed) == [weights[0]]
  thread = prefetch.start(list(weights))
  assert thread is not None
  thread.join()


@pytest.mark.parametrize("suffix, kind", [(".weights.h5", "weights"),
                                          (".keras", "archives")])
def test_keras_files_are_averaged_without_tensorflow(keras_runs, tmp_path,
                                                     suffix, kind):
  inputs = getattr(keras_runs["float32"], kind)[-3:]
  output = str(tmp_path / "without" / f"avg{suffix}")
  result = run_cli_without_tensorflow(f"--checkpoints={','.join(inputs)}",
                                      f"--output_path={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow never imported" in result.stdout
  expected = str(tmp_path / "normal" / f"avg{suffix}")
  average_checkpoints(inputs, expected)
  with open(output, "rb") as a, open(expected, "rb") as b:
    assert a.read() == b.read()
