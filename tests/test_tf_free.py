"""The engine without TensorFlow: its dtype table, protos and state file equal TF's.

A one-shot run of local V2 checkpoints reads, averages and writes without
importing TensorFlow, and checks its output with TF's own reader loaded
alone; these tests hold the hand-written parts to what TF itself gives, and
prove the run never imports TF and that TF, imported later, is unharmed.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import tensor_bundle_pb2

from conftest import (REPO, call_cli, error_line, run_cli_without_tensorflow,
                      step_valued, write_tf1_series)
from t2t_avg.formats import state_file
from t2t_avg.files import tf_loader
from t2t_avg.errors import AveragingError
from t2t_avg.formats import base
from t2t_avg.formats import tf_dtypes
from t2t_avg.formats import tf_protos

_INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
_EXAMPLES = settings(max_examples=300, deadline=None)


# --- dtypes --------------------------------------------------------------------

_ENUMS = [(name, value) for name, value in types_pb2.DataType.items()
          if not name.endswith("_REF") and value != types_pb2.DT_INVALID]


@pytest.mark.parametrize("name,enum", _ENUMS)
def test_dtype_table_matches_tf_as_dtype_for_every_enum(name, enum):
  expected = tf.as_dtype(enum)
  dtype = tf_dtypes.dtype_of(enum)
  assert dtype.name == expected.name, name
  assert (dtype.kind == base.Kind.FLOAT) == expected.is_floating
  assert (dtype.kind == base.Kind.COMPLEX) == expected.is_complex
  assert tf_dtypes.dtype_enum(dtype) == enum
  if expected in (tf.string, tf.variant, tf.resource):
    assert dtype.numpy is None
    return
  assert dtype.numpy is not None
  assert dtype.numpy.itemsize == expected.size
  if expected.is_quantized:  # Their bytes: the plain integer of that size.
    assert dtype.numpy == np.dtype(
        f"{'u' if expected.name.startswith('qu') else 'i'}{expected.size}")
  else:
    assert dtype.numpy == np.dtype(expected.as_numpy_dtype)


def test_every_enum_is_in_the_table():
  # Equal with TF 2.21; older TFs know fewer enums (2.16: no int2, float4).
  assert {enum for _, enum in _ENUMS} <= set(tf_dtypes.TABLE)


def test_a_dtype_the_installed_ml_dtypes_lacks_is_an_error_naming_it(
    monkeypatch):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  # As with TF 2.16, which pins ml_dtypes 0.3 (no int2, uint2, float4).
  monkeypatch.delattr(ml_dtypes, "int2", raising=False)
  tf_dtypes.dtype_of.cache_clear()
  try:
    with pytest.raises(AveragingError, match="dtype int2 needs a newer "
                       "ml_dtypes"):
      tf_dtypes.dtype_of(next(enum for enum, row in tf_dtypes.TABLE.items()
                              if row[0] == "int2"))
    assert tf_dtypes.dtype_of(tf.bfloat16.as_datatype_enum).numpy == (
        np.dtype(ml_dtypes.bfloat16))
  finally:
    tf_dtypes.dtype_of.cache_clear()


def test_an_unknown_dtype_enum_is_an_error_naming_it():
  with pytest.raises(AveragingError, match="dtype enum 999"):
    tf_dtypes.dtype_of(999)


# --- protos --------------------------------------------------------------------

def _proto_entry(entry: tf_protos.Entry) -> tensor_bundle_pb2.BundleEntryProto:
  """The same entry built as the writer built it with protobuf."""
  proto = tensor_bundle_pb2.BundleEntryProto(
      dtype=entry.dtype, shard_id=entry.shard_id, offset=entry.offset,
      size=entry.size, crc32c=entry.crc32c)
  for i, size in enumerate(entry.shape):
    dim = proto.shape.dim.add(size=size)
    if entry.dim_names and entry.dim_names[i]:
      dim.name = entry.dim_names[i]
  if entry.unknown_rank:
    proto.shape.unknown_rank = True
  for extents in entry.slices:
    slice_proto = proto.slices.add()
    for start, length in extents:
      extent = slice_proto.extent.add(start=start)
      if length >= 0:
        extent.length = length
  return proto


def _from_proto(proto: tensor_bundle_pb2.BundleEntryProto) -> tf_protos.Entry:
  names = tuple(d.name for d in proto.shape.dim)
  return tf_protos.Entry(
      proto.dtype, tuple(d.size for d in proto.shape.dim), proto.shard_id,
      proto.offset, proto.size, proto.crc32c,
      tuple(tuple((e.start, e.length if e.HasField("length") else -1)
                  for e in s.extent) for s in proto.slices),
      proto.shape.unknown_rank, names if any(names) else ())


_EXTENTS = st.lists(st.tuples(_INT64, st.one_of(st.just(-1), st.integers(
    0, (1 << 63) - 1))), max_size=5).map(tuple)
_ENTRIES = st.builds(
    tf_protos.Entry,
    dtype=st.sampled_from([e for _, e in _ENUMS]),
    shape=st.lists(st.integers(0, 1 << 40), max_size=9).map(tuple),
    shard_id=st.integers(0, (1 << 31) - 1),
    offset=st.integers(0, (1 << 63) - 1),
    size=st.integers(0, (1 << 63) - 1),
    crc32c=st.integers(0, (1 << 32) - 1),
    slices=st.lists(_EXTENTS, max_size=4).map(tuple))

_FIXED = [
    tf_protos.Entry(),  # 0-d, everything default
    tf_protos.Entry(1, (), 0, 0, 4, 0x12345678),  # a 0-d float
    tf_protos.Entry(19, (0, 3, 1), 0, 1 << 40, 0, 0xffffffff),  # a 0 dim
    tf_protos.Entry(1, tuple(range(1, 12)), 3, (1 << 63) - 1, 1 << 50, 7),
    tf_protos.Entry(14, (8, 6), slices=(((0, 4), (0, -1)), ((4, -1), (-3, 0)),
                                        ())),
    tf_protos.Entry(1, (10,), slices=(((-(1 << 63), (1 << 63) - 1),),)),
]


@pytest.mark.parametrize("entry", _FIXED)
def test_entry_bytes_equal_protobufs(entry):
  data = _proto_entry(entry).SerializeToString()
  assert tf_protos.encode_entry(entry) == data
  assert tf_protos.decode_entry(data) == entry


@_EXAMPLES
@given(_ENTRIES)
def test_random_entries_encode_and_decode_as_protobuf_does(entry):
  data = _proto_entry(entry).SerializeToString()
  assert tf_protos.encode_entry(entry) == data
  assert tf_protos.decode_entry(data) == _from_proto(
      tensor_bundle_pb2.BundleEntryProto.FromString(data))


@_EXAMPLES
@given(_ENTRIES, st.lists(st.text(max_size=6), max_size=9),
       st.booleans(), st.lists(st.tuples(
           st.integers(8, 1000), st.sampled_from([0, 1, 2, 5]),
           st.binary(max_size=12), st.integers(0, (1 << 64) - 1)),
           max_size=4))
def test_decoding_skips_unknown_fields_and_reads_dim_names(entry, names,
                                                           unknown_rank,
                                                           unknown):
  proto = _proto_entry(entry)
  for dim, name in zip(proto.shape.dim, names):
    dim.name = name
  if unknown_rank:
    proto.shape.unknown_rank = True
  data = proto.SerializeToString()
  for number, wire, payload, value in unknown:  # Fields protobuf skips.
    data += tf_protos.put_varint(number << 3 | wire)
    data += {0: tf_protos.put_varint(value), 1: value.to_bytes(8, "little"),
             5: (value & 0xffffffff).to_bytes(4, "little"),
             2: tf_protos.put_varint(len(payload)) + payload}[wire]
  assert tf_protos.decode_entry(data) == _from_proto(
      tensor_bundle_pb2.BundleEntryProto.FromString(data))


@_EXAMPLES
@given(st.integers(0, (1 << 31) - 1), st.sampled_from([0, 1]),
       st.integers(0, (1 << 31) - 1), st.integers(0, (1 << 31) - 1),
       st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=4))
def test_headers_encode_and_decode_as_protobuf_does(shards, endianness,
                                                    producer, min_consumer,
                                                    bad):
  proto = tensor_bundle_pb2.BundleHeaderProto(num_shards=shards,
                                              endianness=endianness)
  if producer or min_consumer or bad:  # An empty version is left out.
    proto.version.producer = producer
    proto.version.min_consumer = min_consumer
    proto.version.bad_consumers.extend(bad)
  header = tf_protos.Header(shards, endianness, producer, min_consumer, bad)
  data = proto.SerializeToString()
  assert tf_protos.encode_header(header) == data
  assert tf_protos.decode_header(data) == header


def test_the_written_header_is_the_one_tf_writes():
  proto = tensor_bundle_pb2.BundleHeaderProto(
      num_shards=1, endianness=tensor_bundle_pb2.BundleHeaderProto.LITTLE)
  proto.version.producer = 1
  assert tf_protos.encode_header(tf_protos.Header(1, tf_protos.LITTLE, 1)) == (
      proto.SerializeToString())


# --- the state file -------------------------------------------------------------

_NAMES = ["model.ckpt-10", "a b/model.ckpt-1", 'q"uote-2', "back\\slash-3",
          "tab\tand\nnewline-4", "ünï cödé/模型-5", "it's-6", "del\x7f\x01-7",
          "/abs/path/model.ckpt-8", "../up/model.ckpt-9"]


def test_state_text_is_what_tf_writes():
  newest = _NAMES[-1]
  proto = tf.compat.v1.train.generate_checkpoint_state_proto(
      "/", newest, all_model_checkpoint_paths=list(_NAMES))
  if not inspect.signature(text_format.MessageToString).parameters[
      "as_utf8"].default:  # TF 2.16's protobuf 4: other escapes, read alike.
    pytest.skip("this protobuf escapes text otherwise; TF reads both alike "
                "(test_state_read_is_what_tf_reads)")
  assert state_file.text(newest, _NAMES) == text_format.MessageToString(proto)
  # The newest is added last when missing, as TF does.
  proto = tf.compat.v1.train.generate_checkpoint_state_proto(
      "/", "other-1", all_model_checkpoint_paths=list(_NAMES))
  assert state_file.text("other-1", _NAMES) == (
      text_format.MessageToString(proto))


@pytest.mark.parametrize("directory", ["abs", "rel"])
def test_state_read_is_what_tf_reads(tmp_path, monkeypatch, directory):
  monkeypatch.chdir(tmp_path)
  path = str(tmp_path / "d") if directory == "abs" else "d"
  os.makedirs(path)
  timestamps = [1.7e9 + i / 3 for i in range(len(_NAMES))]
  proto = tf.compat.v1.train.generate_checkpoint_state_proto(
      "/", _NAMES[-1], all_model_checkpoint_paths=list(_NAMES),
      all_model_checkpoint_timestamps=timestamps,
      last_preserved_timestamp=1.6e9)
  with open(os.path.join(path, "checkpoint"), "w", encoding="utf-8") as f:
    f.write(text_format.MessageToString(proto))
  expected = tf.train.get_checkpoint_state(path)
  state = state_file.read_without_tf(path)
  assert state is not None
  assert state.model_checkpoint_path == expected.model_checkpoint_path
  assert state.all_model_checkpoint_paths == list(
      expected.all_model_checkpoint_paths)
  assert state.all_model_checkpoint_timestamps == list(
      expected.all_model_checkpoint_timestamps)
  assert state.last_preserved_timestamp == expected.last_preserved_timestamp


@pytest.mark.parametrize("text", [
    'model_checkpoint_path: "\\141\\x62c\\303\\251"\n',  # octal, hex, UTF-8
    'model_checkpoint_path: "m-1"\nall_model_checkpoint_paths: "m-1"\n\n',
])
def test_escapes_read_as_tf_reads_them(tmp_path, text):
  (tmp_path / "checkpoint").write_text(text, encoding="utf-8")
  expected = tf.train.get_checkpoint_state(str(tmp_path))
  state = state_file.read_without_tf(str(tmp_path))
  assert state is not None
  assert state.model_checkpoint_path == expected.model_checkpoint_path
  assert state.all_model_checkpoint_paths == list(
      expected.all_model_checkpoint_paths)


@pytest.mark.parametrize("text", [
    'model_checkpoint_path: "a" "b"\n',  # adjacent literals
    'model_checkpoint_path:"a"\n',
    "model_checkpoint_path: 'a'\n",
    'model_checkpoint_path: ""\n',  # TF's error
    'model_checkpoint_path: "\\u00e9"\n',  # \u: by protobuf
    "# a comment\n",
    "garbage",
])
def test_what_the_parser_does_not_know_is_left_to_tf(tmp_path, text):
  (tmp_path / "checkpoint").write_text(text, encoding="utf-8")
  with pytest.raises(state_file.NotUnderstood):
    state_file.read_without_tf(str(tmp_path))
  try:
    expected = tf.train.get_checkpoint_state(str(tmp_path))
  except ValueError as e:
    with pytest.raises(ValueError, match=str(e)):
      state_file.read(str(tmp_path))
    return
  state = state_file.read(str(tmp_path))
  if expected is None:
    assert state is None
  else:
    assert state is not None
    assert state.model_checkpoint_path == expected.model_checkpoint_path


def test_no_state_file_is_none(tmp_path):
  assert state_file.read(str(tmp_path)) is None
  assert tf.train.get_checkpoint_state(str(tmp_path)) is None


# --- the engine, without TensorFlow ----------------------------------------------

def _output_files(directory):
  return {name: (directory / name).read_bytes()
          for name in sorted(os.listdir(directory))
          if not name.endswith(".json")}  # The record holds a timestamp.


def test_the_engine_averages_local_checkpoints_without_tensorflow(tmp_path):
  flags = ["--prefix=testdata/train/", "--num_last_checkpoints=4",
           "--exclude_variables=.*bias.*"]
  # Checking the output loads TF's reader: left to the run beside it.
  without = run_cli_without_tensorflow(
      *flags, f"--output_path={tmp_path}/without/avg",
      setup="from t2t_avg.formats import tf_bundle\n"
      "tf_bundle.verify_readable = lambda prefix, tensors: None")
  assert without.returncode == 0, without.stderr[-3000:]
  assert "tensorflow never imported" in without.stdout
  normal = call_cli(*flags, f"--output_path={tmp_path}/normal/avg")
  assert normal.returncode == 0, normal.stderr[-3000:]
  files = _output_files(tmp_path / "without")
  assert sorted(files) == ["avg-0.data-00000-of-00001", "avg-0.index",
                           "checkpoint"]
  assert files == _output_files(tmp_path / "normal")


_UNREADABLE = """
import sys
from t2t_avg.formats import tf_bundle
real = tf_bundle._table
tf_bundle._table = lambda entries: real(entries[:1] + entries[2:])  # one lost
sys.argv = ["t2t_avg"] + sys.argv[1:]
from t2t_avg.cli import average
average.run_main()
"""


def test_the_cli_checks_its_output_with_tfs_reader(tmp_path):
  prefixes = write_tf1_series(str(tmp_path / "train"), [1, 2],
                              step_valued({"a": (3,), "b": (2,)}))
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(_UNREADABLE),
       f"--checkpoints={','.join(prefixes)}",
       f"--output_path={tmp_path}/out/avg"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "internal error: TF reads the output" in error_line(result)
  assert not os.path.exists(tmp_path / "out" / "avg-0.index")


# --- TF's own reader, loaded without the rest of TensorFlow ------------------------

_READER_ALONE = """
import sys, json
from t2t_avg.files import tf_loader
prefix, broken, preload = sys.argv[1:4]
if preload == "preload":
  tf_loader.preload_reader()  # Its libraries load on a thread first.
  assert tf_loader._preloading is not None
shapes = tf_loader.checkpoint_reader(prefix).get_variable_to_shape_map()
alone = "tensorflow" not in sys.modules
try:
  tf_loader.checkpoint_reader(broken)
  error = None
except tf_loader.ReaderError as e:
  error = str(e)
import tensorflow as tf  # Afterwards, whole: must work as ever.
tf_shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
try:
  tf.train.load_checkpoint(broken)
  tf_error = None
except tf.errors.OpError as e:
  tf_error = e.message
print(json.dumps({"alone": alone, "shapes": shapes, "tf_shapes": tf_shapes,
                  "error": error, "tf_error": tf_error}))
"""


@pytest.mark.parametrize("preload", ["preload", "no_preload"])
def test_tfs_reader_loads_alone_and_tf_imports_afterwards(tmp_path, preload):
  prefixes = write_tf1_series(str(tmp_path / "train"), [1],
                              step_valued({"a": (3,), "b/c": (2, 4)}))
  broken = tmp_path / "broken"
  index = open(prefixes[0] + ".index", "rb").read()
  (tmp_path / "broken.index").write_bytes(index[:-8] + b"\0" * 8)  # Magic.
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(_READER_ALONE), prefixes[0],
       str(broken), preload], capture_output=True, text=True, cwd=REPO, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.splitlines()[-1])
  assert found["alone"]  # The reader came without `import tensorflow`.
  assert found["shapes"] == found["tf_shapes"] == {
      "a": [3], "b/c": [2, 4], "global_step": []}
  # TF's own message, and TF's own error type once TF is imported.
  assert "bad magic number" in found["error"]
  assert found["tf_error"] == found["error"]


def test_without_the_reader_module_tf_is_imported(tmp_path, monkeypatch):
  prefixes = write_tf1_series(str(tmp_path / "train"), [1],
                              step_valued({"a": (3,)}))
  monkeypatch.setattr(tf_loader, "_reader_module", lambda: None)
  reader = tf_loader.checkpoint_reader(prefixes[0])
  assert reader.get_variable_to_shape_map() == {"a": [3], "global_step": []}
  with pytest.raises(tf_loader.ReaderError, match="Failed to find"):
    tf_loader.checkpoint_reader(str(tmp_path / "nothing"))


_RUN_AND_LIST_MODULES = """
import sys
sys.argv = ["t2t_avg"] + sys.argv[1:]
from t2t_avg.cli import average
try:
  average.run_main()
finally:
  print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
"""


def test_a_local_run_never_imports_tensorflow(tmp_path):
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(_RUN_AND_LIST_MODULES),
       "--prefix=testdata/train/", "--num_last_checkpoints=4",
       f"--output_path={tmp_path}/avg"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[-1] == str(
      ["tensorflow.python.util._pywrap_checkpoint_reader"])
  assert os.path.exists(tmp_path / "avg-0.index")
