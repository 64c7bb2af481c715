"""The zip CRC-32 of `.keras` files, checked and computed as the bytes stream.

Inputs: a flipped byte anywhere in `model.weights.h5` (a dataset averaged,
one copied from the newest input only, one excluded, HDF5 metadata, the
bytes between datasets) is refused in one line naming the file, and
nothing is written. Outputs: the CRC-32 set from the chunks written is the
one `zipfile` finds, Keras loads the file, and the bytes are those
`zipfile` writes for the same members. The inputs are read, and the output
written, once (the process's I/O counters).
"""
import glob
import io
import os
import zipfile

import h5py
import numpy as np
import pytest

from conftest import assert_same_values, error_line, run_cli
from keras_runs import datasets, expected_average, policy_scope
from keras_runs import keras_runs_fixture  # noqa: F401  (the fixture)
from t2t_avg import AveragingError, average_checkpoints
from t2t_avg.engine import streaming
from t2t_avg.files import crc32

MEMBER = "model.weights.h5"


@pytest.fixture(name="in_pieces", params=["swept", "pieces"])
def in_pieces_fixture(request, monkeypatch):
  """Small chunks, and ("pieces") every chunk's CRC-32 recorded and
  combined; ("swept") the default, where pieces this small are read again
  in the final sweep."""
  monkeypatch.setattr(streaming, "CHUNK_BYTES", 256)
  if request.param == "pieces":
    monkeypatch.setattr(crc32, "SMALL_PIECE", 1)
  return request.param


def _extents(path):
  """{dataset: (start, stop)} of a .keras file's weights, in the file,
  found with zipfile and h5py, plus the member's (start, stop)."""
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(MEMBER)
    member = archive.read(info)
  with open(path, "rb") as f:
    raw = f.read()
  start = raw.index(member)  # stored: the member's bytes as they are
  extents = {}
  with h5py.File(io.BytesIO(member), "r") as f:
    def visit(name, item):
      if isinstance(item, h5py.Dataset) and item.id.get_offset() is not None:
        offset = start + item.id.get_offset()
        extents[name] = (offset, offset + item.id.get_storage_size())
    f.visititems(visit)
  return extents, (start, start + len(member))


def _flipped(source, tmp_path, where):
  """A copy of `source` with the byte at `where(extents, member)` flipped."""
  extents, member = _extents(source)
  position = where(extents, member)
  data = bytearray(open(source, "rb").read())
  data[position] ^= 0x10
  path = str(tmp_path / os.path.basename(source))
  with open(path, "wb") as f:
    f.write(bytes(data))
  return path


def _between_datasets(extents, member):
  """A byte no dataset holds, after the first dataset (HDF5 object headers
  and heaps of the datasets that follow)."""
  del member
  ranges = sorted(extents.values())
  return ranges[0][1] + (ranges[1][0] - ranges[0][1]) // 2


_PLACES = {
    "averaged dataset": lambda e, m: (
        e["layers/dense/vars/0"][0] + 301),
    "dataset copied from the newest": lambda e, m: e["optimizer/vars/0"][0],
    "excluded dataset": lambda e, m: e["layers/dense_1/vars/0"][0] + 5,
    "superblock": lambda e, m: m[0] + 40,
    "between datasets": _between_datasets,
    "last byte": lambda e, m: m[1] - 1,
}


@pytest.mark.parametrize("place", sorted(_PLACES))
@pytest.mark.parametrize("which", [0, -1])
def test_a_flipped_byte_anywhere_in_the_weights_is_refused_naming_the_file(
    keras_runs, tmp_path, in_pieces, place, which):
  del in_pieces
  inputs = list(keras_runs["float32"].archives[:3])
  inputs[which] = _flipped(inputs[which], tmp_path, _PLACES[place])
  output = tmp_path / "out" / "avg.keras"
  output.parent.mkdir()
  with pytest.raises(AveragingError) as raised:
    average_checkpoints(inputs, str(output), exclude_variables="dense_1/")
  assert str(raised.value) == (
      f"{inputs[which]} is corrupted: its {MEMBER} fails its CRC-32")
  assert os.listdir(output.parent) == []


def test_the_command_line_refuses_a_corrupted_input_in_one_line(
    keras_runs, tmp_path):
  inputs = list(keras_runs["float32"].archives[:2])
  inputs[1] = _flipped(inputs[1], tmp_path, _PLACES["averaged dataset"])
  result = run_cli(f"--checkpoints={','.join(inputs)}",
                   f"--output_path={tmp_path}/o/avg.keras")
  assert error_line(result) == (f"t2t_avg: error: {inputs[1]} is corrupted: "
                                f"its {MEMBER} fails its CRC-32")
  assert not os.path.exists(tmp_path / "o" / "avg.keras")


def test_a_flip_that_makes_an_average_nonfinite_is_named_as_corruption(
    keras_runs, tmp_path):
  """The exponent of a float32 set to all ones: inf or NaN, which the
  engine would blame on the input's values; the CRC-32 says why."""
  source = keras_runs["float32"].archives[1]
  extents, _ = _extents(source)
  data = bytearray(open(source, "rb").read())
  data[extents["layers/dense/vars/0"][0] + 3] |= 0x7f
  data[extents["layers/dense/vars/0"][0] + 2] |= 0x80
  corrupted = str(tmp_path / "m-02.keras")
  with open(corrupted, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(AveragingError, match=(
      rf"^{corrupted} is corrupted: its {MEMBER} fails its CRC-32$")):
    average_checkpoints([keras_runs["float32"].archives[0], corrupted],
                        str(tmp_path / "avg.keras"))


def test_an_input_of_weight_zero_is_not_read_so_not_checked(keras_runs,
                                                            tmp_path):
  """Nothing of it reaches the output (as for TF inputs, whose parts are
  checked when read): reading it only for its CRC-32 would cost the pass
  this design saves."""
  inputs = list(keras_runs["float32"].archives[:3])
  inputs[0] = _flipped(inputs[0], tmp_path, _PLACES["averaged dataset"])
  output = str(tmp_path / "avg.keras")
  average_checkpoints(inputs, output, weights=[0, 1, 1])
  assert_same_values(datasets(output), expected_average(inputs[1:]))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_the_output_crc_is_zipfiles_and_keras_loads_it(keras_runs, tmp_path,
                                                       in_pieces, policy):
  del in_pieces
  import keras  # pylint: disable=import-outside-toplevel
  inputs = keras_runs[policy].archives
  output = str(tmp_path / "avg.keras")
  average_checkpoints(inputs, output)
  with zipfile.ZipFile(output) as archive:
    assert archive.testzip() is None
  with policy_scope(policy):
    model = keras.models.load_model(output)
  dense = [layer for layer in model.layers
           if isinstance(layer, keras.layers.Dense)][0]
  expected = expected_average(inputs)
  assert np.asarray(dense.kernel.numpy()).tobytes() == (
      expected["layers/dense/vars/0"].tobytes())
  assert_same_values(datasets(output), expected)


def _zipped_as_zipfile_writes(newest, weights, path):
  """What `zipfile` writes for `newest`'s members with `weights` as the
  model's: stored, in order, dated 1980-01-01, attributes kept."""
  with zipfile.ZipFile(newest) as source, zipfile.ZipFile(
      path, "w", zipfile.ZIP_STORED) as target:
    for info in source.infolist():
      entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
      entry.create_system = 3
      entry.external_attr = info.external_attr
      target.writestr(entry, weights if info.filename == MEMBER
                      else source.read(info))


def test_the_output_is_the_bytes_zipfile_writes(keras_runs, tmp_path,
                                                in_pieces):
  del in_pieces
  inputs = keras_runs["float32"].archives
  output = str(tmp_path / "avg.keras")
  average_checkpoints(inputs, output)
  with zipfile.ZipFile(output) as archive:
    weights = archive.read(MEMBER)
  reference = str(tmp_path / "reference.keras")
  _zipped_as_zipfile_writes(inputs[-1], weights, reference)
  assert open(output, "rb").read() == open(reference, "rb").read()


def _with_assets(source, path):
  """`source` re-zipped (stored) with a directory and a file after its
  weights, as a model with assets has them."""
  with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
    for info in src.infolist():
      dst.writestr(info, src.read(info))
    dst.mkdir("assets")
    dst.writestr("assets/vocabulary.txt", "a\nb\nc\n" * 1000)
  return path


def test_members_after_the_weights_are_kept_and_the_crc_set(keras_runs,
                                                              tmp_path):
  inputs = [_with_assets(p, str(tmp_path / os.path.basename(p)))
            for p in keras_runs["float32"].archives[:2]]
  output = str(tmp_path / "avg.keras")
  average_checkpoints(inputs, output)
  with zipfile.ZipFile(output) as archive:
    assert archive.testzip() is None
    assert [i.filename for i in archive.infolist()][-2:] == [
        "assets/", "assets/vocabulary.txt"]
    weights = archive.read(MEMBER)
  reference = str(tmp_path / "reference.keras")
  _zipped_as_zipfile_writes(inputs[-1], weights, reference)
  assert open(output, "rb").read() == open(reference, "rb").read()
  assert_same_values(datasets(output), expected_average(
      keras_runs["float32"].archives[:2]))


def _io_counters():
  with open("/proc/self/io") as f:
    fields = dict(line.split(": ") for line in f.read().splitlines())
  return int(fields["rchar"]), int(fields["wchar"])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"),
                    reason="needs Linux's per-process I/O counters")
def test_inputs_are_read_once_and_the_output_written_once(tmp_path):
  """.keras files of 8 MB from ModelCheckpoint (a 1024x1024 Dense, Adam):
  the weights' bytes are read once (no separate CRC-32 read) and written
  once (not to a temporary file, then copied into the zip)."""
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(0)
  inputs = keras.Input((1024,))
  model = keras.Model(inputs, keras.layers.Dense(1024)(inputs))
  model.compile(keras.optimizers.Adam(), "mse")
  x = np.random.default_rng(0).standard_normal((8, 1024)).astype("float32")
  model.fit(x, x, epochs=3, verbose=0, callbacks=[
      keras.callbacks.ModelCheckpoint(str(tmp_path / "m-{epoch:02d}.keras"))])
  files = sorted(glob.glob(str(tmp_path / "m-*.keras")))
  members = sum(_extents(p)[1][1] - _extents(p)[1][0] for p in files)
  average_checkpoints(files, str(tmp_path / "warm.keras"))  # imports done
  read_before, written_before = _io_counters()
  output = str(tmp_path / "avg.keras")
  average_checkpoints(files, output)
  read_after, written_after = _io_counters()
  assert read_after - read_before < 1.2 * members
  assert written_after - written_before < 1.2 * os.path.getsize(output)
  with zipfile.ZipFile(output) as archive:
    assert archive.testzip() is None
