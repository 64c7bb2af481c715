"""Tests of t2t_avg.metrics.events on event files written by TensorFlow's writers."""
import logging
import math
import os
import shutil
import struct
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from conftest import logged
from t2t_avg.formats import tf_events
from t2t_avg.metrics import events
from t2t_avg.metrics.points import MetricPoint
from t2t_avg.errors import AveragingError

tf1 = tf.compat.v1

T2T = "metrics-translate_ende_wmt32k/targets"


def _scalars_event(step, wall_time, scalars):
  """An Event of one summary of `simple_value`s, as TF1/Estimator/T2T write."""
  return event_pb2.Event(
      step=step, wall_time=wall_time,
      summary=tf1.Summary(value=[tf1.Summary.Value(tag=tag, simple_value=value)
                                 for tag, value in scalars.items()]))


def _write_tf1(path, event_list):
  """Writes Events with a TF1 graph-mode `FileWriter` into the file `path`."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  scratch = tempfile.mkdtemp(dir=directory)
  with tf.Graph().as_default():
    writer = tf1.summary.FileWriter(scratch)
    for event in event_list:
      writer.add_event(event)
    writer.close()
  [name] = os.listdir(scratch)
  shutil.move(os.path.join(scratch, name), path)
  os.rmdir(scratch)
  return str(path)


def _record_spans(data):
  """(offset, size) of each TFRecord in a well-formed file's bytes."""
  spans, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    spans.append((offset, 16 + length))
    offset += 16 + length
  return spans


def _steps_values(points):
  return [(p.step, p.value) for p in points]


def test_tf2_summary_scalar_tensor_encoding(tmp_path):
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default():
    for step in range(0, 500, 100):
      tf.summary.scalar("eval/loss", 3.0 - step / 400, step=step)
      tf.summary.scalar("eval/bleu", step / 20, step=step)
  writer.close()

  loss = events.read_metric([str(tmp_path)], "eval/loss")
  bleu = events.read_metric([str(tmp_path)], "eval/bleu")

  assert _steps_values(loss) == [(s, float(np.float32(3.0 - s / 400)))
                                 for s in range(0, 500, 100)]
  assert _steps_values(bleu) == [(s, s / 20) for s in range(0, 500, 100)]
  assert all(p.wall_time > 1e9 for p in loss)


def test_tensor_scalars_are_matched_by_tag_not_by_metadata(tmp_path):
  metadata = tf1.SummaryMetadata(
      plugin_data=tf1.SummaryMetadata.PluginData(plugin_name="scalars"))
  event_list = []
  for step, value in enumerate([np.float32(0.5), np.float64(0.25),
                                np.int64(7)]):
    summary_value = tf1.Summary.Value(tag="accuracy",
                                      tensor=tf.make_tensor_proto(value))
    if step == 0:
      summary_value.metadata.CopyFrom(metadata)
    event_list.append(event_pb2.Event(
        step=step, wall_time=100.0 + step,
        summary=tf1.Summary(value=[summary_value])))
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", event_list)

  points = events.read_metric([path], "accuracy")

  assert points == [MetricPoint(0, 100.0, 0.5),
                    MetricPoint(1, 101.0, 0.25),
                    MetricPoint(2, 102.0, 7.0)]


def test_estimator_t2t_eval_dir(tmp_path):
  eval_dir = tmp_path / "train" / "eval"
  event_list = []
  for step in (1000, 2000, 3000):
    event_list.append(_scalars_event(step, 10.0 + step, {
        "loss": 4.0 - step / 1000,
        f"{T2T}/approx_bleu_score": step / 10000,
        f"{T2T}/neg_log_perplexity": -4.0 + step / 1000,
        f"{T2T}/accuracy": 0.5,
        "global_step": step,
    }))
    # Estimator writes the evaluated checkpoint as a string tensor summary.
    event_list.append(event_pb2.Event(
        step=step, wall_time=10.0 + step, summary=tf1.Summary(value=[
            tf1.Summary.Value(tag="checkpoint_path",
                              tensor=tf.make_tensor_proto(
                                  f"train/model.ckpt-{step}",
                                  dtype=tf.string))])))
  _write_tf1(eval_dir / "events.out.tfevents.1.host", event_list)

  bleu = events.read_metric([str(eval_dir)], f"{T2T}/approx_bleu_score")
  loss = events.read_metric([str(eval_dir)], "loss")

  assert _steps_values(bleu) == [(1000, float(np.float32(0.1))),
                                 (2000, float(np.float32(0.2))),
                                 (3000, float(np.float32(0.3)))]
  assert _steps_values(loss) == [(1000, 3.0), (2000, 2.0), (3000, 1.0)]
  assert [p.wall_time for p in loss] == [1010.0, 2010.0, 3010.0]
  with pytest.raises(AveragingError) as error:
    events.read_metric([str(eval_dir)], "checkpoint_path")
  assert str(error.value).endswith(
      f"scalar tags there: global_step, loss, {T2T}/accuracy, "
      f"{T2T}/approx_bleu_score, {T2T}/neg_log_perplexity")


def test_t2t_bleu_tags(tmp_path):
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", [
      _scalars_event(step, float(step), {"BLEU_cased": cased,
                                         "BLEU_uncased": cased + 1})
      for step, cased in ((100, 20.5), (200, 25.25))])

  assert _steps_values(events.read_metric([path], "BLEU_cased")) == [
      (100, 20.5), (200, 25.25)]
  assert _steps_values(events.read_metric([path], "BLEU_uncased")) == [
      (100, 21.5), (200, 26.25)]


def test_restart_in_two_files_latest_wall_time_wins(tmp_path, caplog):
  # The restarted run's file sorts first by name: wall time decides, not order.
  _write_tf1(tmp_path / "events.out.tfevents.2.b", [
      _scalars_event(s, 100.0 + s, {"loss": 10.0 - s}) for s in range(0, 6)])
  start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
  _write_tf1(tmp_path / "events.out.tfevents.1.a", [
      event_pb2.Event(step=3, wall_time=200.0, session_log=start)] + [
          _scalars_event(s, 200.0 + s, {"loss": 5.0 if s == 5 else 20.0 - s})
          for s in range(3, 8)])

  with caplog.at_level(logging.WARNING):
    points = events.read_metric([str(tmp_path)], "loss")

  assert _steps_values(points) == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 17.0),
                                   (4, 16.0), (5, 5.0), (6, 14.0), (7, 13.0)]
  assert points[3].wall_time == 203.0
  warnings = logged(caplog)
  assert len(warnings) == 2  # step 5 was logged twice with the same value
  assert "'loss'" in warnings[0] and "step 3" in warnings[0]
  assert "17.0" in warnings[0] and "7.0" in warnings[0]
  assert "step 4" in warnings[1]


def test_restart_marker_does_not_drop_later_evals(tmp_path):
  # TensorBoard's EventAccumulator purges steps 4..9 here; nothing is lost.
  event_list = [_scalars_event(s, 100.0 + s, {"loss": float(s)})
                for s in range(10)]
  event_list.append(event_pb2.Event(
      step=3, wall_time=200.0,
      session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
  event_list.append(event_pb2.Event(wall_time=200.0,
                                    file_version="brain.Event:2"))
  event_list += [_scalars_event(s, 200.0 + s, {"loss": float(s)})
                 for s in (3, 4)]
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", event_list)

  points = events.read_metric([path], "loss")

  assert _steps_values(points) == [(s, float(s)) for s in range(10)]
  assert points[4].wall_time == 204.0 and points[5].wall_time == 105.0


def test_twenty_thousand_points_all_kept(tmp_path):
  rng = np.random.default_rng(0)
  values = rng.standard_normal(20000).astype(np.float32)
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", [
      _scalars_event(s * 10, 1e9 + s, {"loss": float(v), "other": 1.0})
      for s, v in enumerate(values)])

  start = time.perf_counter()
  points = events.read_metric([path], "loss")
  elapsed = time.perf_counter() - start

  assert _steps_values(points) == [(s * 10, float(v))
                                   for s, v in enumerate(values)]
  assert elapsed < 2.0, elapsed


def _ten_step_file(tmp_path):
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", [
      _scalars_event(s, 100.0 + s, {"loss": float(s)}) for s in range(10)])
  with open(path, "rb") as f:
    data = f.read()
  spans = _record_spans(data)
  assert len(spans) == 11  # file_version, then one record per step
  return path, data, spans


@pytest.mark.parametrize("keep", ["half_record", "part_of_header"])
def test_truncated_last_record_ends_the_file_quietly(tmp_path, caplog, keep):
  path, data, spans = _ten_step_file(tmp_path)
  start, size = spans[-1]
  cut = start + (size // 2 if keep == "half_record" else 5)
  with open(path, "wb") as f:
    f.write(data[:cut])

  with caplog.at_level(logging.DEBUG):
    points = events.read_metric([path], "loss")

  assert _steps_values(points) == [(s, float(s)) for s in range(9)]
  assert not logged(caplog)
  assert any("truncated" in m for m in logged(caplog, logging.DEBUG))


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_corrupted_record_warns_with_file_and_offset(tmp_path, caplog, where):
  path, data, spans = _ten_step_file(tmp_path)
  start, size = spans[6]  # the record of step 5
  position = {"length": start + 1, "length_crc": start + 9,
              "data": start + size // 2, "data_crc": start + size - 2}[where]
  corrupted = bytearray(data)
  corrupted[position] ^= 0x40
  with open(path, "wb") as f:
    f.write(corrupted)

  with caplog.at_level(logging.WARNING):
    points = events.read_metric([path], "loss")

  assert _steps_values(points) == [(s, float(s)) for s in range(5)]
  [warning] = logged(caplog)
  assert path in warning and f"byte {start}" in warning


def test_record_that_is_not_an_event_warns_with_offset(tmp_path, caplog):
  path, data, _ = _ten_step_file(tmp_path)
  record_file = str(tmp_path / "records")
  with tf.io.TFRecordWriter(record_file) as writer:  # valid CRCs, bad proto
    writer.write(b"\xff" * 10)
  with open(record_file, "rb") as f, open(path, "ab") as out:
    out.write(f.read())
  os.remove(record_file)

  with caplog.at_level(logging.WARNING):
    points = events.read_metric([path], "loss")

  assert _steps_values(points) == [(s, float(s)) for s in range(10)]
  [warning] = logged(caplog)
  assert path in warning and f"byte {len(data)}" in warning


def test_empty_and_garbage_files_contribute_nothing(tmp_path, caplog):
  good = _write_tf1(tmp_path / "events.out.tfevents.1.host", [
      _scalars_event(s, 1.0 + s, {"loss": 0.5 * s}) for s in range(3)])
  (tmp_path / "events.out.tfevents.2.empty").write_bytes(b"")
  garbage = tmp_path / "events.out.tfevents.3.garbage"
  garbage.write_bytes(b"this is not a TFRecord file at all\n" * 4)

  with caplog.at_level(logging.WARNING):
    points = events.read_metric([str(tmp_path)], "loss")

  assert points == events.read_metric([good], "loss")
  assert _steps_values(points) == [(0, 0.0), (1, 0.5), (2, 1.0)]
  [warning] = logged(caplog)
  assert str(garbage) in warning and "byte 0" in warning


@pytest.mark.parametrize("content", [b"", b"garbage " * 10])
def test_nothing_readable_says_no_scalar_tags(tmp_path, content):
  path = tmp_path / "events.out.tfevents.1.host"
  path.write_bytes(content)

  with pytest.raises(AveragingError, match="no scalar tags were found in") as e:
    events.read_metric([str(tmp_path)], "loss")
  assert str(tmp_path) in str(e.value)


def test_nan_and_inf_values_are_returned(tmp_path):
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", [
      _scalars_event(s, float(s), {"loss": v})
      for s, v in enumerate([1.0, math.nan, math.inf, 2.0])])

  values = [p.value for p in events.read_metric([path], "loss")]

  assert values[0] == 1.0 and math.isnan(values[1])
  assert values[2] == math.inf and values[3] == 2.0


def test_unknown_tag_lists_existing_tags_sorted_and_truncated(tmp_path):
  tags = [f"metric_{i:03d}" for i in range(100)]
  path = _write_tf1(tmp_path / "events.out.tfevents.1.host", [
      _scalars_event(1, 1.0, {tag: 1.0 for tag in reversed(tags)})])

  with pytest.raises(AveragingError) as error:
    events.read_metric([path], "bleu")

  message = str(error.value)
  assert "'bleu'" in message and path in message
  assert ", ".join(tags[:5]) in message
  assert "metric_099" not in message and "more" in message


@pytest.mark.parametrize("checkpoint_file", ["checkpoint",
                                             "model.ckpt-100.index"])
def test_directory_with_checkpoints_warns_training_loss(tmp_path, caplog,
                                                        checkpoint_file):
  _write_tf1(tmp_path / "events.out.tfevents.1.host",
             [_scalars_event(1, 1.0, {"loss": 1.0})])
  (tmp_path / checkpoint_file).write_text("")

  with caplog.at_level(logging.WARNING):
    points = events.read_metric([str(tmp_path)], "loss")

  assert len(points) == 1
  [warning] = logged(caplog)
  assert str(tmp_path) in warning
  assert "usually training loss, not eval" in warning


def test_eval_directory_alone_does_not_warn(tmp_path, caplog):
  _write_tf1(tmp_path / "events.out.tfevents.1.host",
             [_scalars_event(1, 1.0, {"loss": 1.0})])
  with caplog.at_level(logging.WARNING):
    events.read_metric([str(tmp_path)], "loss")
  assert not logged(caplog)


def test_several_sources_are_merged(tmp_path):
  first = _write_tf1(
      tmp_path / "a" / "events.out.tfevents.1.host",
      [_scalars_event(s, float(s), {"loss": 1.0}) for s in (1, 3)])
  _write_tf1(tmp_path / "b" / "events.out.tfevents.1.host",
             [_scalars_event(s, float(s), {"loss": 2.0}) for s in (2, 4)])
  (tmp_path / "b" / "nested").mkdir()
  _write_tf1(tmp_path / "b" / "nested" / "events.out.tfevents.1.host",
             [_scalars_event(5, 5.0, {"loss": 3.0})])  # not recursive

  points = events.read_metric([first, str(tmp_path / "b")], "loss")

  assert _steps_values(points) == [(1, 1.0), (2, 2.0), (3, 1.0), (4, 2.0)]


def test_missing_source_is_an_error(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(AveragingError, match="does not exist") as error:
    events.read_metric([missing], "loss")
  assert missing in str(error.value)


def test_directory_without_event_files_is_an_error(tmp_path):
  (tmp_path / "checkpoint").write_text("")
  with pytest.raises(AveragingError, match="No TensorBoard event files") as e:
    events.read_metric([str(tmp_path)], "loss")
  assert str(tmp_path) in str(e.value)


def test_random_truncations_and_bit_flips_never_crash_or_invent_points(
    tmp_path):
  """A seeded fuzz loop over real files of both encodings, bounded in time."""
  tf2_dir = tmp_path / "tf2"
  writer = tf.summary.create_file_writer(str(tf2_dir))
  with writer.as_default():
    for step in range(0, 400, 10):
      tf.summary.scalar("loss", 5.0 - step / 100, step=step)
  writer.close()
  [tf2_file] = [str(tf2_dir / name) for name in os.listdir(tf2_dir)]
  tf1_file = _write_tf1(
      tmp_path / "tf1/events.out.tfevents.1.x",
      [_scalars_event(step, 1000.0 + step, {"loss": step * 0.5, "other": 1.0})
       for step in range(0, 400, 10)])
  rng = np.random.default_rng(20261127)
  deadline = time.monotonic() + 10
  tried = 0
  for path in (tf2_file, tf1_file):
    original = {(p.step, p.value) for p in events.read_metric([path], "loss")}
    data = open(path, "rb").read()
    fuzzed = str(tmp_path / "fuzzed.tfevents")
    for _ in range(150):
      damaged = bytearray(data)
      if rng.random() < 0.5:
        del damaged[rng.integers(0, len(damaged)):]
      for _ in range(rng.integers(1, 4)):
        if damaged:
          damaged[rng.integers(0, len(damaged))] ^= 1 << rng.integers(0, 8)
      with open(fuzzed, "wb") as f:
        f.write(bytes(damaged))
      try:
        points = events.read_metric([fuzzed], "loss")
      except AveragingError:
        continue  # Nothing readable: the tag is "not found".
      assert {(p.step, p.value) for p in points} <= original
      tried += 1
      if time.monotonic() > deadline:
        break
  assert tried > 20


def test_reader_reads_only_what_was_appended(tmp_path, monkeypatch):
  """Continuous mode polls one MetricReader: each read parses new records only,
  a truncated tail is read whole once complete, corruption ends the file."""
  written = _write_tf1(tmp_path / "scratch" / "events", [
      _scalars_event(step, 1e9 + step, {"loss": step / 10})
      for step in range(1, 6)])
  with open(written, "rb") as f:
    data = f.read()
  # The first record is TF's file_version event.
  records = [data[o:o + n] for o, n in _record_spans(data)]
  assert len(records) == 6
  path = tmp_path / "run" / "events.out.tfevents.1"
  path.parent.mkdir()
  path.write_bytes(b"".join(records[:3]) + records[3][:7])  # 4th truncated
  parsed = []
  real = tf_events.decode_event
  monkeypatch.setattr(tf_events, "decode_event",
                      lambda data: parsed.append(1) or real(data))
  reader = events.MetricReader([str(path.parent)], "loss")
  assert [p.step for p in reader.read()] == [1, 2]
  assert len(parsed) == 3
  assert [p.step for p in reader.read()] == [1, 2]
  assert len(parsed) == 3  # Nothing new: nothing parsed again.
  path.write_bytes(b"".join(records[:5]))  # The tail completed, one more.
  assert [p.step for p in reader.read()] == [1, 2, 3, 4]
  assert len(parsed) == 5
  corrupted = bytearray(records[5])
  corrupted[-1] ^= 0xff
  path.write_bytes(b"".join(records[:5]) + bytes(corrupted) + records[1])
  assert [p.step for p in reader.read()] == [1, 2, 3, 4]
  path.write_bytes(b"".join(records[:6]))  # Ended for good.
  assert [p.step for p in reader.read()] == [1, 2, 3, 4]
