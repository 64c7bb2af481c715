"""What used to crash is a difference to report or one error line.

Strings and variants of other lengths in `t2t_avg.compare`; tensor names that
are not UTF-8; a full disk while writing a Keras output.
"""
import os
import resource
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO
from conftest import error_line
from conftest import run_cli
from t2t_avg.errors import AveragingError
from t2t_avg.formats import tf_bundle
from t2t_avg.jobs.compare import compare_checkpoints
from t2t_avg.jobs.compare import format_report
from t2t_avg.jobs.compare import Status

OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def run_compare(*args):
  return run_cli(*args, module="t2t_avg.compare")


def statuses(report):
  return {v.name: v for v in report.variables}


def only_log_lines_besides(stderr, line):
  """Every other stderr line is one of absl's log lines (`I1207 ...`)."""
  others = [x for x in stderr.splitlines() if x != line]
  assert all(x[:1] in "IWE" and x[1:5].isdigit() for x in others), stderr


# --- compare: strings and variants of other lengths or shapes ----------------

def _write_tf2(path, **tracked):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.train.Checkpoint(**tracked).write(str(path))


@pytest.fixture(name="object_graphs")
def object_graphs_fixture(tmp_path):
  """Checkpoints with the same tensors whose object graphs differ in length:
  the second also tracks a module without variables."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  value = np.arange(6, dtype=np.float32)
  a = _write_tf2(tmp_path / "a", dense=tf.Variable(value))
  b = _write_tf2(tmp_path / "b", dense=tf.Variable(value),
                 head=tf.Module())
  return a, b


def test_object_graphs_of_other_lengths_are_a_non_float_difference(
    object_graphs):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  a, b = object_graphs
  graphs = [tf.train.load_checkpoint(p).get_tensor(OBJECT_GRAPH)
            for p in (a, b)]
  assert len(graphs[0]) != len(graphs[1])  # What used to crash.

  report = compare_checkpoints(a, b)

  graph = statuses(report)[OBJECT_GRAPH]
  assert (graph.status, graph.differing, graph.is_float) == (
      Status.DIFFERENT, 1, False)
  assert report.passed() and not report.passed(strict=True)
  lines = format_report(report).splitlines()
  assert lines[-2] == (f"non-float: 1 of 1 variables differ ({OBJECT_GRAPH})"
                       "; not counted (--strict counts them)")
  assert lines[-1] == "identical: all 1 float variables are equal"


@pytest.mark.parametrize("strict, status", [([], 0), (["--strict"], 1)])
def test_command_line_object_graphs_of_other_lengths_exit_as_documented(
    object_graphs, strict, status):
  result = run_compare(*object_graphs, *strict)

  assert result.returncode == status, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "internal error" not in (
      result.stderr), result.stderr[-2000:]
  rows = [x for x in result.stdout.splitlines() if x.endswith(OBJECT_GRAPH)]
  assert len(rows) == 1 and rows[0].startswith("non-float differs"), (
      result.stdout)
  last = result.stdout.splitlines()[-1]
  if strict:
    assert last == ("different: 0 of 1 float variables outside atol=0 "
                    "rtol=0, 1 non-float differ")
  else:
    assert last == "identical: all 1 float variables are equal"


def test_other_variables_tracked_are_reported_and_fail(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  value = np.arange(4, dtype=np.float32)
  a = _write_tf2(tmp_path / "a", w=tf.Variable(value))
  b = _write_tf2(tmp_path / "b", w=tf.Variable(value),
                 extra=tf.Variable(1.0))

  result = run_compare(a, b)

  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[-2] == (f"non-float: 1 of 1 variables differ ({OBJECT_GRAPH})"
                       "; not counted (--strict counts them)")
  assert lines[-1] == ("different: 0 of 1 float variables outside atol=0 "
                       "rtol=0, 1 only in B")


def test_string_variables_are_compared_element_by_element(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  words_a = [b"the", b"cat", b"", b"sat", b"on"]
  words_b = [b"the", b"catalogue", b"x", b"sat", b"o"]
  a = _write_tf2(tmp_path / "a", vocab=tf.Variable(words_a))
  b = _write_tf2(tmp_path / "b", vocab=tf.Variable(words_b))
  name = "vocab/.ATTRIBUTES/VARIABLE_VALUE"
  read = [tf.train.load_checkpoint(p).get_tensor(name) for p in (a, b)]
  expected = int(np.count_nonzero(read[0] != read[1]))

  vocab = statuses(compare_checkpoints(a, b))[name]

  assert (vocab.status, vocab.differing, vocab.size) == (
      Status.DIFFERENT, expected, len(words_a))
  same = statuses(compare_checkpoints(a, a))[name]
  assert (same.status, same.differing) == (Status.IDENTICAL, 0)


def test_sliced_string_variables_are_compared_element_by_element(tmp_path):
  # A partitioned string variable, saved in two slices as TF1's Saver does
  # (TF's own reader refuses sliced strings: "Dtype string not supported").
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  words = {"a": [b"a", b"bb", b"c", b"dddd"],
           "b": [b"a", b"bb", b"xyz", b"dddd"]}
  prefixes = {}
  for key, value in words.items():
    prefixes[key] = str(tmp_path / key / "ckpt")
    tf.raw_ops.SaveV2(prefix=prefixes[key], tensor_names=["s", "s"],
                      shape_and_slices=["4 0,2", "4 2,2"],
                      tensors=[tf.constant(value[:2]), tf.constant(value[2:])])
  expected = sum(x != y for x, y in zip(words["a"], words["b"]))

  s = statuses(compare_checkpoints(prefixes["a"], prefixes["b"]))["s"]

  assert (s.status, s.differing, s.size) == (Status.DIFFERENT, expected, 4)


@pytest.mark.parametrize("strict, status", [([], 0), (["--strict"], 1)])
def test_string_variables_of_other_shapes_count_only_when_strict(
    tmp_path, strict, status):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  value = np.arange(3, dtype=np.float32)
  a = _write_tf2(tmp_path / "a", w=tf.Variable(value),
                 vocab=tf.Variable([b"a", b"b"]))
  b = _write_tf2(tmp_path / "b", w=tf.Variable(value),
                 vocab=tf.Variable([b"a", b"b", b"c"]))

  result = run_compare(a, b, *strict)

  assert result.returncode == status, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  row = [x for x in lines if x.endswith("  vocab/.ATTRIBUTES/VARIABLE_VALUE")]
  assert len(row) == 1 and row[0].startswith("shape differs"), result.stdout
  assert "[2]|[3]" in row[0]
  assert lines[-2].startswith(
      "non-float: 1 of 2 variables differ (vocab/.ATTRIBUTES/VARIABLE_VALUE)")
  assert lines[-1] == (
      "different: 0 of 1 float variables outside atol=0 rtol=0, "
      "1 non-float differ" if strict else
      "identical: all 1 float variables are equal")


def test_iterator_states_are_compared_element_by_element(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def iterator_after(batches, directory):
    options = tf.data.Options()  # No autotuning: the same state each run.
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    dataset = tf.data.Dataset.range(1000).batch(3).with_options(options)
    iterator = iter(dataset)
    for _ in range(batches):
      next(iterator)
    return _write_tf2(directory, it=iterator)

  a = iterator_after(2, tmp_path / "a")
  a_again = iterator_after(2, tmp_path / "a_again")
  b = iterator_after(200, tmp_path / "b")
  name = "it/.ATTRIBUTES/ITERATOR_STATE"

  moved = statuses(compare_checkpoints(a, b))[name]
  same = statuses(compare_checkpoints(a, a_again))[name]

  assert (moved.dtype_a, moved.status) == ("variant", Status.DIFFERENT)
  assert 0 < moved.differing <= moved.size  # Elements, not bytes.
  assert (same.status, same.differing) == (Status.IDENTICAL, 0)


# --- tensor names that are not UTF-8 -----------------------------------------

BAD_NAME = b"\xff\xfe"


@pytest.fixture(name="non_utf8")
def non_utf8_fixture(tmp_path):
  """Two checkpoints written by TF's SaveV2 with a name that is not UTF-8."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  prefixes = []
  for step in (1, 2):
    prefix = str(tmp_path / "train" / f"model.ckpt-{step}")
    tf.raw_ops.SaveV2(prefix=prefix,
                      tensor_names=[BAD_NAME, b"global_step", b"w"],
                      shape_and_slices=["", "", ""],
                      tensors=[tf.constant([1.0, 2.0]),
                               tf.constant(step, tf.int64),
                               tf.constant([float(step)])])
    prefixes.append(prefix)
  return prefixes


@pytest.mark.parametrize("dry_run", [[], ["--dry_run"]])
def test_name_not_utf8_is_one_line_before_any_output(non_utf8, tmp_path,
                                                     dry_run):
  out = tmp_path / "out"
  out.mkdir()

  result = run_cli(f"--checkpoints={','.join(non_utf8)}",
                   f"--output_path={out}/avg.ckpt", *dry_run)

  line = error_line(result)
  assert line == (f"t2t_avg: error: checkpoint {non_utf8[0]} has a tensor "
                  f"name that is not UTF-8, {BAD_NAME!r}: TensorFlow cannot "
                  "read it back by name")
  only_log_lines_besides(result.stderr, line)
  assert "Averaging" not in result.stderr  # Refused on opening.
  assert os.listdir(out) == []


def test_compare_of_a_name_not_utf8_is_one_line(non_utf8):
  result = run_compare(*non_utf8)

  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      f"t2t_avg.compare: error: checkpoint {non_utf8[0]} has a tensor name "
      f"that is not UTF-8, {BAD_NAME!r}: TensorFlow cannot read it back by "
      "name"]


def test_name_not_utf8_read_through_tensorflow_is_refused_too(
    non_utf8, monkeypatch):
  # An index layout this package does not parse goes to TF's reader.
  monkeypatch.setattr(tf_bundle, "_parse_index", lambda table: None)

  with pytest.raises(AveragingError) as raised:
    tf_bundle.open_source(non_utf8[0])

  assert str(raised.value) == (
      f"checkpoint {non_utf8[0]} has a tensor name that is not UTF-8, "
      f"{BAD_NAME!r}: TensorFlow cannot read it back by name")


# --- a full disk while writing a Keras output ---------------------------------

@pytest.fixture(name="keras_files", scope="module")
def keras_files_fixture(tmp_path_factory):
  """Three `.weights.h5` and `.keras` files of a 200k-parameter model."""
  import keras  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp("keras_disk")
  model = keras.Sequential([keras.Input((500,)), keras.layers.Dense(400)])
  files = {".weights.h5": [], ".keras": []}
  for epoch in (1, 2, 3):
    model.set_weights([np.full(w.shape, epoch, np.float32)
                       for w in model.get_weights()])
    for suffix, paths in files.items():
      path = str(directory / f"m-{epoch:02d}{suffix}")
      if suffix == ".keras":
        model.save(path)
      else:
        model.save_weights(path)
      paths.append(path)
  return files


def _limit_file_size(limit):
  def limit_in_child():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return limit_in_child


def _size_limit(path, where):
  """A file size limit that stops an output like `path`'s at `where`."""
  if where == "layout":  # HDF5 writes its metadata: an OSError from h5py.
    return 4 << 10
  if where == "datasets":  # HDF5 allocates them, on closing: a RuntimeError.
    return os.path.getsize(path) // 2
  # Past the weights, before the end of the `.keras` zip around them.
  with zipfile.ZipFile(path) as archive:
    weights = archive.getinfo("model.weights.h5").file_size
  return (weights + os.path.getsize(path)) // 2


@pytest.mark.parametrize("suffix, where", [
    (".weights.h5", "layout"), (".weights.h5", "datasets"),
    (".keras", "layout"), (".keras", "datasets"), (".keras", "zip")])
def test_disk_full_writing_keras_is_one_line_naming_the_output(
    keras_files, tmp_path, suffix, where):
  out = tmp_path / "out"
  out.mkdir()
  output = f"{out}/avg{suffix}"
  limit = _size_limit(keras_files[suffix][-1], where)

  result = subprocess.run(
      [sys.executable, "-m", "t2t_avg",
       f"--checkpoints={','.join(keras_files[suffix])}",
       f"--output_path={output}"],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
      preexec_fn=_limit_file_size(limit))

  line = error_line(result)
  assert line == f"t2t_avg: error: cannot write {output}: File too large"
  only_log_lines_besides(result.stderr, line)
  assert os.listdir(out) == []
