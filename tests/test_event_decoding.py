"""Event files without TensorFlow: the hand-made decoder and writer equal TF's.

Files written by TF1's `FileWriter`, TF2's `tf.summary`, Keras 3's
`TensorBoard` callback and TensorBoard's own `Writer` are read by
`formats.tf_events` and by TF (`summary_iterator`, `tf.make_ndarray`), and
must agree on every field and number; random `Event`s built with TF's proto
classes must decode field by field as protobuf decodes them; the weight
summaries t2t_avg writes must read back, through TF, as intended, record
for record the bytes TF1's `FileWriter` writes. Weighted runs from TF1 and
TF2 events import no TensorFlow module.
"""
import glob
import json
import math
import os
import struct

from google.protobuf import message
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import summary_pb2, tensor_pb2
from tensorflow.core.util import event_pb2

from conftest import (run_cli_without_tensorflow, write_tf1_events,
                      write_tf1_series, write_tf2_events)
from t2t_avg.formats import tf_dtypes, tf_events
from t2t_avg.formats.tf_protos import put_varint
from t2t_avg.errors import AveragingError
from t2t_avg.metrics import events
from t2t_avg.metrics.points import MetricPoint
from t2t_avg.record import CheckpointRow

tf1 = tf.compat.v1
# TensorProto.float8_val is new in TF 2.15.
_FLOAT8 = tuple(name for name in ["float8_val"]
                if name in tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name)
_EXAMPLES = settings(max_examples=400, deadline=None)


# --- comparing with TF's decoding ---------------------------------------------

def _floats(values):
  """Floats as bytes: NaN, -0.0 and infinities compare exactly."""
  return np.asarray(list(values), np.float64).tobytes()


def _tf_number(tensor):
  """TF's number of a 0-d tensor, or the type of the error TF raises."""
  try:
    return tf.make_ndarray(tensor).item()
  except (ValueError, TypeError, OverflowError) as e:
    return type(e)


def _assert_same_tensor(mine, proto):
  assert mine.dtype == proto.dtype
  assert mine.shape == [d.size for d in proto.tensor_shape.dim]
  assert mine.tensor_content == proto.tensor_content
  for name in ("float_val", "double_val"):
    assert _floats(getattr(mine, name)) == _floats(getattr(proto, name)), name
  for name in ("int_val", "int64_val", "bool_val", "half_val", "uint32_val",
               "uint64_val") + _FLOAT8:
    assert getattr(mine, name) == type(getattr(mine, name))(
        getattr(proto, name)), name
  if proto.tensor_shape.dim or not tf_events.is_numeric(proto.dtype):
    return
  expected = _tf_number(proto)
  if expected is TypeError and not proto.tensor_content:
    return  # A float8 TF's make_ndarray does not read from its float8_val.
  try:
    number = tf_events.scalar(mine)
  except ValueError:
    assert isinstance(expected, type), expected
    return
  assert not isinstance(expected, type), (expected, number)
  assert _floats([number]) == _floats([float(expected)])


def _assert_same_event(mine, proto):
  """A decoded `tf_events.Event` against protobuf's `Event`, field by field."""
  assert _floats([mine.wall_time]) == _floats([proto.wall_time])
  assert mine.step == proto.step
  assert (mine.summary is not None) == proto.HasField("summary")
  assert len(mine.summary or ()) == len(proto.summary.value)
  for value, expected in zip(mine.summary or (), proto.summary.value):
    assert value.tag == expected.tag
    assert value.kind == expected.WhichOneof("value")
    if value.kind == "simple_value":
      assert _floats([value.simple_value]) == _floats([expected.simple_value])
    assert (value.tensor is not None) == (value.kind == "tensor")
    if value.tensor is not None:
      _assert_same_tensor(value.tensor, expected.tensor)


def _records(path):
  """Every record's bytes, by the reader's own framing."""
  state = events._FileState()  # pylint: disable=protected-access
  return [data for _, data in events._records(path, state)]  # pylint: disable=protected-access


def _assert_file_decodes_as_tf_does(path):
  """Every event of a file, and every scalar tag's points, as TF reads them."""
  expected = list(tf1.train.summary_iterator(path))
  records = _records(path)
  assert len(records) == len(expected) > 1
  points = {}
  for data, proto in zip(records, expected):
    _assert_same_event(tf_events.decode_event(data), proto)
    for value in proto.summary.value:
      if value.WhichOneof("value") == "simple_value":
        number = value.simple_value
      elif (value.WhichOneof("value") == "tensor" and
            not value.tensor.tensor_shape.dim and
            (tf.as_dtype(value.tensor.dtype).is_floating or
             tf.as_dtype(value.tensor.dtype).is_integer)):
        number = tf.make_ndarray(value.tensor).item()
      else:
        continue
      points.setdefault(value.tag, {})[proto.step] = MetricPoint(
          proto.step, proto.wall_time, float(number))
  for tag, by_step in points.items():
    got = events.read_metric([path], tag)
    want = [by_step[s] for s in sorted(by_step)]
    assert [(p.step, p.wall_time, p.kind) for p in got] == [
        (p.step, p.wall_time, p.kind) for p in want], tag
    assert _floats(p.value for p in got) == _floats(p.value for p in want)
  return points


def _only_file(directory):
  [path] = glob.glob(os.path.join(str(directory), "**", "*tfevents*"),
                     recursive=True)
  return path


# --- files from TensorFlow's, Keras' and TensorBoard's writers ----------------

def test_tf1_filewriter_simple_values_decode_as_tf_does(tmp_path):
  rng = np.random.default_rng(1)
  values = {step: float(v) for step, v in zip(
      range(0, 3000, 100), rng.standard_normal(30) * 1e3)}
  values.update({3000: math.nan, 3100: math.inf, 3200: -0.0})
  write_tf1_events(tmp_path, "metrics-translate/targets/approx_bleu_score",
                   values)

  points = _assert_file_decodes_as_tf_does(_only_file(tmp_path))

  assert len(points["metrics-translate/targets/approx_bleu_score"]) == 33


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.float16,
                                   tf.bfloat16, tf.int32, tf.int64,
                                   tf.uint8])
def test_tf2_tensor_summaries_decode_as_tf_does(tmp_path, dtype):
  writer = tf.summary.create_file_writer(str(tmp_path))
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
  with writer.as_default():
    for step in range(0, 1000, 50):
      tf.summary.scalar("eval/loss", 3.0 - step / 333, step=step)
      tf.summary.write("eval/other", tf.cast(step / 7, dtype), step=step,
                       metadata=metadata)
      tf.summary.histogram("weights", tf.random.normal([20]), step=step)
      tf.summary.text("note", f"step {step}", step=step)
  writer.close()

  points = _assert_file_decodes_as_tf_does(_only_file(tmp_path))

  assert sorted(points) == ["eval/loss", "eval/other"]
  assert len(points["eval/other"]) == 20


def test_keras_tensorboard_callback_logs_decode_as_tf_does(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.Dense(1)])
  model.compile(optimizer="adam", loss="mse", metrics=["mae"])
  x = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
  model.fit(x, x[:, :1], batch_size=16, epochs=3, verbose=0,
            validation_data=(x[:16], x[:16, :1]), callbacks=[
                keras.callbacks.TensorBoard(str(tmp_path), update_freq=1,
                                            histogram_freq=1)])

  tags = set()
  for path in glob.glob(str(tmp_path / "*" / "*tfevents*")):
    tags |= set(_assert_file_decodes_as_tf_does(path))

  assert {"epoch_loss", "epoch_mae", "evaluation_loss_vs_iterations"} <= tags


def test_tensorboard_writer_decodes_as_tf_does(tmp_path):
  tensorboard_summary = pytest.importorskip("tensorboard.summary")
  writer = tensorboard_summary.Writer(str(tmp_path))
  for step in range(40):
    writer.add_scalar("accuracy", step / 39, step * 25,
                      wall_time=1.7e9 + step / 3, description="top-1")
  writer.close()

  points = _assert_file_decodes_as_tf_does(_only_file(tmp_path))

  assert [p.value for p in points["accuracy"].values()] == [
      float(np.float32(step / 39)) for step in range(40)]


# --- random Events, built with TF's proto classes ---------------------------

_INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
_INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
_DTYPES = st.one_of(st.sampled_from(sorted(tf_dtypes.TABLE)),
                    st.integers(-3, 200))
_FEW = {"max_size": 2}


def _scalar_protos():
  """0-d tensors as TF makes them, of every numeric dtype."""
  names = [row[0] for enum, row in tf_dtypes.TABLE.items()
           if tf_events.is_numeric(enum) and row[0] in ("float16", "float32",
                                                        "float64", "bfloat16",
                                                        "int8", "int16",
                                                        "int32", "int64",
                                                        "uint8", "uint16",
                                                        "uint32", "uint64")]
  return st.builds(
      lambda name, number: tf.make_tensor_proto(
          tf.cast(number, name).numpy()),
      st.sampled_from(names), st.floats(-100, 100))


@st.composite
def _raw_tensors(draw):
  """TensorProtos with any dtype, shape and mix of value fields."""
  proto = tensor_pb2.TensorProto(dtype=draw(_DTYPES))
  for size in draw(st.lists(st.integers(-1, 1 << 40), max_size=3)):
    proto.tensor_shape.dim.add(size=size, name=draw(st.text(max_size=3)))
  if draw(st.booleans()):
    proto.tensor_content = draw(st.binary(max_size=9))
  proto.float_val.extend(draw(st.lists(st.floats(width=32), **_FEW)))
  proto.double_val.extend(draw(st.lists(st.floats(), **_FEW)))
  proto.int_val.extend(draw(st.lists(_INT32, **_FEW)))
  proto.half_val.extend(draw(st.lists(st.one_of(
      st.integers(0, 0xffff), _INT32), **_FEW)))
  proto.int64_val.extend(draw(st.lists(_INT64, **_FEW)))
  proto.uint32_val.extend(draw(st.lists(st.integers(0, (1 << 32) - 1),
                                        **_FEW)))
  proto.uint64_val.extend(draw(st.lists(st.integers(0, (1 << 64) - 1),
                                        **_FEW)))
  proto.bool_val.extend(draw(st.lists(st.booleans(), **_FEW)))
  proto.string_val.extend(draw(st.lists(st.binary(max_size=4), **_FEW)))
  for name in _FLOAT8:
    setattr(proto, name, draw(st.binary(max_size=2)))
  return proto


@st.composite
def _values(draw):
  value = summary_pb2.Summary.Value(tag=draw(st.text(max_size=12)),
                                    node_name=draw(st.text(max_size=3)))
  kind = draw(st.sampled_from(["simple_value", "tensor", "raw_tensor",
                               "image", "histo", "none"]))
  if kind == "simple_value":
    value.simple_value = draw(st.floats(width=32))
  elif kind == "tensor":
    value.tensor.CopyFrom(draw(_scalar_protos()))
  elif kind == "raw_tensor":
    value.tensor.CopyFrom(draw(_raw_tensors()))
  elif kind == "image":
    value.image.height = draw(_INT32)
  elif kind == "histo":
    value.histo.min = draw(st.floats())
  if draw(st.booleans()):
    value.metadata.plugin_data.plugin_name = draw(st.text(max_size=8))
  return value


@st.composite
def _random_events(draw):
  event = event_pb2.Event(wall_time=draw(st.floats()), step=draw(_INT64))
  kind = draw(st.sampled_from(["summary", "empty_summary", "file_version",
                               "graph_def", "log_message", "none"]))
  if kind == "summary":
    event.summary.value.extend(draw(st.lists(_values(), min_size=1,
                                             max_size=4)))
  elif kind == "empty_summary":
    event.summary.SetInParent()
  elif kind == "file_version":
    event.file_version = draw(st.text(max_size=14))
  elif kind == "graph_def":
    event.graph_def = draw(st.binary(max_size=20))
  elif kind == "log_message":
    event.log_message.message = draw(st.text(max_size=10))
  return event


@_EXAMPLES
@given(_random_events())
def test_random_events_decode_as_protobuf_does(proto):
  _assert_same_event(tf_events.decode_event(proto.SerializeToString()), proto)


@settings(max_examples=200, deadline=None)
@given(st.lists(_random_events(), min_size=2, max_size=3))
def test_concatenated_events_merge_as_protobuf_merges(protos):
  """Protobuf merges concatenated messages: a later oneof member replaces a
  summary, a second summary adds its values, a second tensor merges."""
  data = b"".join(p.SerializeToString() for p in protos)
  _assert_same_event(tf_events.decode_event(data),
                     event_pb2.Event.FromString(data))


def test_unpacked_repeated_fields_and_groups_decode_as_protobuf_does():
  tensor = tensor_pb2.TensorProto(dtype=tf.float64.as_datatype_enum,
                                  double_val=[2.5])
  # double_val (6) unpacked, an unknown group (field 20) around a varint.
  data = (tensor.SerializeToString() + bytes([6 << 3 | 1]) +
          struct.pack("<d", 2.5) + put_varint(20 << 3 | 3) +
          bytes([1 << 3, 7]) + put_varint(20 << 3 | 4))
  value = summary_pb2.Summary.Value(tag="x")
  value.tensor.ParseFromString(data)
  event = event_pb2.Event(step=3, summary=summary_pb2.Summary(value=[value]))

  mine = tf_events.decode_event(event.SerializeToString())

  _assert_same_event(mine, event)
  assert mine.summary[0].tensor.double_val == [2.5, 2.5]


@pytest.mark.parametrize("data", [b"\xff" * 10, b"\x0a\x05ab", b"\x09\x00",
                                  b"\x2a\x02\x0a\x05", b"\x1a\x01\xff",
                                  b"\x00\x00", b"\x0e"])
def test_bytes_protobuf_refuses_are_refused(data):
  with pytest.raises(message.DecodeError):
    event_pb2.Event.FromString(data)
  with pytest.raises(ValueError):
    tf_events.decode_event(data)


@pytest.mark.parametrize("enum", sorted(tf_dtypes.TABLE) + [0, 99])
def test_numeric_dtypes_are_tfs_floats_and_integers(enum):
  try:
    dtype = tf.as_dtype(enum)
  except TypeError:
    assert not tf_events.is_numeric(enum)
    return
  assert tf_events.is_numeric(enum) == (dtype.is_floating or dtype.is_integer)


def test_a_scalar_tensor_of_two_numbers_is_skipped_with_a_warning(
    tmp_path, caplog):
  broken = tf.make_tensor_proto(np.float32(1.5))
  broken.float_val.append(2.5)
  event_list = [event_pb2.Event(step=step, wall_time=10.0 + step, summary=(
      summary_pb2.Summary(value=[summary_pb2.Summary.Value(
          tag="loss", tensor=tensor)])))
                for step, tensor in ((1, tf.make_tensor_proto(np.float32(0.5))),
                                     (2, broken))]
  with tf.Graph().as_default():
    writer = tf1.summary.FileWriter(str(tmp_path))
    for event in event_list:
      writer.add_event(event)
    writer.close()

  points = events.read_metric([str(tmp_path)], "loss")

  assert points == [MetricPoint(1, 11.0, 0.5)]
  [warning] = [r.getMessage() for r in caplog.records
               if r.levelname == "WARNING"]
  assert "tag 'loss' is not one number" in warning and "byte " in warning


# --- the weight summaries t2t_avg writes -------------------------------------

@_EXAMPLES
@given(st.floats(), _INT64, st.text(max_size=14),
       st.one_of(st.none(), st.lists(st.tuples(
           st.text(max_size=10), st.floats(-3e38, 3e38)), max_size=3)))
def test_encoded_events_are_protobufs_bytes(wall_time, step, version,
                                            scalars):
  if scalars is not None:
    version = ""  # One member of the `what` oneof.
  proto = event_pb2.Event(wall_time=wall_time, step=step)
  if version:  # An empty one set would be written: a oneof member.
    proto.file_version = version
  if scalars is not None:
    proto.summary.SetInParent()
    for tag, value in scalars:
      proto.summary.value.add(tag=tag, simple_value=value)

  data = tf_events.encode_event(wall_time, step, version, scalars)

  assert data == proto.SerializeToString()


def _rows():
  return [CheckpointRow("a-100", 100, "name", 0.125, 2.5),
          CheckpointRow("a-200", 200, "name", 0.5, 1.75),
          CheckpointRow("a", None, "mtime", 0.0, 9.0),  # No step: left out.
          CheckpointRow("a-300", 300, "name", 0.375, None)]


def test_weight_summaries_read_back_through_tf_as_intended(tmp_path):
  events.write_weight_summaries(str(tmp_path / "t2t_avg"), _rows(), "loss")

  path = _only_file(tmp_path / "t2t_avg")
  written = list(tf1.train.summary_iterator(path))
  assert written[0].file_version == "brain.Event:2"
  assert not written[0].HasField("summary")
  got = [(e.step, [(v.tag, v.simple_value) for v in e.summary.value])
         for e in written[1:]]
  assert got == [(100, [("t2t_avg/weight", 0.125), ("t2t_avg/loss", 2.5)]),
                 (200, [("t2t_avg/weight", 0.5), ("t2t_avg/loss", 1.75)]),
                 (300, [("t2t_avg/weight", 0.375)])]
  assert {e.wall_time for e in written} == {written[0].wall_time}
  assert os.path.basename(path).startswith(
      f"events.out.tfevents.{int(written[0].wall_time):010d}.")

  # Record for record, the bytes TF1's FileWriter writes for those events.
  with tf.Graph().as_default():
    writer = tf1.summary.FileWriter(str(tmp_path / "tf"))
    for event in written[1:]:
      writer.add_event(event)
    writer.close()
  theirs = _records(_only_file(tmp_path / "tf"))
  ours = _records(path)
  assert ours[1:] == theirs[1:]
  assert ours[0] == event_pb2.Event(wall_time=written[0].wall_time,
                                    file_version="brain.Event:2"
                                    ).SerializeToString()
  with open(path, "rb") as f:
    assert f.read() == b"".join(tf_events.frame(r) for r in ours)


def test_weight_summaries_are_tensorboards_scalars(tmp_path):
  accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  events.write_weight_summaries(str(tmp_path), _rows(), "eval/loss")

  loaded = accumulator.EventAccumulator(str(tmp_path)).Reload()

  assert sorted(loaded.Tags()["scalars"]) == ["t2t_avg/eval/loss",
                                              "t2t_avg/weight"]
  assert [(s.step, s.value) for s in loaded.Scalars("t2t_avg/weight")] == [
      (100, 0.125), (200, 0.5), (300, 0.375)]


# --- weighted runs import no TensorFlow ---------------------------------------

_NO_READER_CHECK = ("from t2t_avg.formats import tf_bundle\n"
                    "tf_bundle.verify_readable = lambda prefix, tensors: None")


def _step_valued(step):
  return {"body/kernel": np.full((4, 3), step, np.float32),
          "body/bias": np.full((3,), step, np.float64)}


@pytest.mark.parametrize("writer", [write_tf1_events, write_tf2_events],
                         ids=["tf1-simple_value", "tf2-tensor"])
def test_softmax_from_events_imports_no_tensorflow(tmp_path, writer):
  steps = [100, 200, 300, 400]
  losses = {100: 2.5, 200: 1.75, 300: 1.5, 400: 2.0}
  prefixes = write_tf1_series(str(tmp_path / "train"), steps, _step_valued)
  eval_dir = writer(tmp_path / "train" / "eval", "eval/loss", losses)
  out = tmp_path / "out" / "avg"

  result = run_cli_without_tensorflow(
      f"--checkpoints={','.join(prefixes)}", "--weighting=softmax",
      f"--metrics_from_events={eval_dir}", "--metric=eval/loss",
      f"--output_path={out}", "--weight_summaries", setup=_NO_READER_CHECK)

  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow never imported" in result.stdout
  # The weights of the metrics TF reads, by the SPEC's softmax.
  logged = {}
  for path in glob.glob(os.path.join(eval_dir, "*tfevents*")):
    for event in tf1.train.summary_iterator(path):
      for value in event.summary.value:
        logged[event.step] = (value.simple_value if value.HasField(
            "simple_value") else tf.make_ndarray(value.tensor).item())
  goodness = [-logged[s] for s in steps]
  raw = [math.exp((g - max(goodness)) / np.std(goodness)) for g in goodness]
  weights = [r / sum(raw) for r in raw]
  with open(f"{out}-0.t2t_avg.json", encoding="utf-8") as f:
    record = json.load(f)
  assert [r["metric"] for r in record["inputs"]] == [logged[s] for s in steps]
  assert [r["weight"] for r in record["inputs"]] == pytest.approx(
      weights, rel=1e-12)
  reader = tf.train.load_checkpoint(f"{out}-0")
  kernel = np.float64(0.0)
  for weight, step in zip(weights, steps):
    kernel += np.float64(weight) * np.float64(step)
  assert np.array_equal(reader.get_tensor("body/kernel"),
                        np.full((4, 3), kernel.astype(np.float32)))
  summaries = events.read_metric([str(out.parent / "t2t_avg")],
                                 "t2t_avg/weight")
  assert [p.step for p in summaries] == steps
  assert [p.value for p in summaries] == [
      float(np.float32(r["weight"])) for r in record["inputs"]]


def test_remote_paths_are_read_and_written_through_tf(tmp_path):
  """TF's `ram://` file system stands for `gs://`: not local, so through
  `tf.io.gfile`, files listed with it and summaries written with it."""
  local = write_tf1_events(tmp_path, "loss", {10: 0.5, 20: 0.25})
  remote = f"ram://events-{os.getpid()}/eval"
  tf.io.gfile.makedirs(remote)
  tf.io.gfile.copy(_only_file(local), f"{remote}/events.out.tfevents.1.x")

  assert events.read_metric([remote], "loss") == events.read_metric(
      [local], "loss")
  events.write_weight_summaries(f"{remote}/t2t_avg", _rows(), "loss")
  [name] = tf.io.gfile.listdir(f"{remote}/t2t_avg")
  written = list(tf1.train.summary_iterator(f"{remote}/t2t_avg/{name}"))
  assert [(e.step, e.summary.value[0].simple_value) for e in written[1:]] == [
      (100, 0.125), (200, 0.5), (300, 0.375)]
  with pytest.raises(AveragingError, match="does not exist"):
    events.read_metric([f"{remote}/nothing"], "loss")


def test_an_unreadable_event_file_is_an_error_naming_it(tmp_path):
  write_tf1_events(tmp_path, "loss", {10: 0.5})
  odd = tmp_path / "events.out.tfevents.2.a-directory"
  odd.mkdir()

  with pytest.raises(AveragingError, match=f"Event file {odd} cannot be read"):
    events.read_metric([str(tmp_path)], "loss")
