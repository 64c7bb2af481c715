"""Continuous mode (t2t-avg-all): windows, outputs, robustness, vs legacy."""
import glob
import json
import logging as std_logging
import os
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from conftest import (assert_same_values, average_all, call_cli, error_line,
                      logged, mixed_series, read_checkpoint, run_legacy,
                      step_valued, tree_fingerprint, wait_for_first_save,
                      write_tf1_series)
from t2t_avg import AveragingError
from t2t_avg import options
from t2t_avg.errors import ArgumentError
from t2t_avg.engine import averaging
from t2t_avg.inputs import checkpoints
from t2t_avg.inputs import naming
from t2t_avg.metrics import events
from t2t_avg.jobs import oneshot
from t2t_avg.jobs import continuous

STEPS = [100, 200, 300, 400, 500]


class FakeTime:
  """An injectable clock and sleep: sleeping advances the clock at once.

  Starts at the real time, because checkpoint ctimes are real times.
  `on_sleep(count)` runs after each sleep, to change the world meanwhile.
  """

  def __init__(self, on_sleep=None):
    self.now = time.time()
    self.sleeps = []
    self._on_sleep = on_sleep

  def clock(self):
    return self.now

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    self.now += seconds
    if self._on_sleep:
      self._on_sleep(len(self.sleeps))


def _run_files(model_dir):
  """flags.txt and hparams.json, dated well before the checkpoints."""
  times = {}
  for i, name in enumerate(("flags.txt", "hparams.json")):
    path = os.path.join(model_dir, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write(f"--{name}=1\n")
    os.utime(path, ns=(1_600_000_000_123_456_789 + i,) * 2)
    times[name] = os.stat(path).st_mtime_ns
  return times


def _one_shot(window, output_dir, step, **kwargs):
  """The one-shot average of a window of checkpoint prefixes."""
  result = averaging.average_checkpoints(
      window, os.path.join(output_dir, "model.ckpt"), output_step=step,
      **kwargs)
  return read_checkpoint(result.output_path)


def _files_of(prefix):
  return glob.glob(glob.escape(prefix) + ".*")


def _delete_checkpoint(prefix):
  for path in _files_of(prefix):
    os.remove(path)


def _write_metric(directory, values, tag="loss"):
  """TF2 `tf.summary.scalar` events, one per {step: value}."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  summary_writer = tf.summary.create_file_writer(directory)
  with summary_writer.as_default():
    for step, value in values.items():
      tf.summary.scalar(tag, value, step=step)
  summary_writer.close()


# --- discovery ---------------------------------------------------------------


def test_stepfiles_oldest_first_by_name_number_with_min_steps(tmp_path):
  train = str(tmp_path / "train")
  write_tf1_series(train, [30, 1000, 200], step_valued({"w": (2,)}))
  (tmp_path / "train" / "notes-12abc.index").write_text("not a checkpoint")
  fake = FakeTime()

  found = list(continuous.stepfiles(train, clock=fake.clock, sleep=fake.sleep))
  assert [s.step for s in found] == [30, 200, 1000]
  assert found[0].path == os.path.join(train, "model.ckpt-30")
  assert found[0].mtime_ns == os.stat(found[0].path + ".index").st_mtime_ns
  assert fake.sleeps == []  # wait_minutes=0: no waiting at all, as T2T

  above = list(continuous.stepfiles(train, min_steps=200, clock=fake.clock,
                               sleep=fake.sleep))
  assert [s.step for s in above] == [200, 1000]


def test_stepfiles_waits_for_the_next_from_the_last_ones_ctime(tmp_path):
  train = str(tmp_path / "train")
  write_tf1_series(train, [1, 2], step_valued({"w": (2,)}))

  def trainer_saves_step_3(count):
    if count == 2:
      write_tf1_series(train, [3], step_valued({"w": (2,)}))

  fake = FakeTime(trainer_saves_step_3)
  found = []
  for step_file in continuous.stepfiles(train, wait_minutes=1, poll_seconds=10,
                                   clock=fake.clock, sleep=fake.sleep):
    found.append(step_file)
  assert [s.step for s in found] == [1, 2, 3]
  # After step 3 it waited until 1 minute after step 3's ctime, then ended.
  deadline = os.stat(found[-1].path + ".index").st_ctime_ns / 1e9 + 60
  assert fake.now > deadline
  assert fake.now - 10 <= deadline
  assert set(fake.sleeps) == {10}


def test_stepfiles_waits_for_a_directory_that_is_not_there_yet(tmp_path):
  fake = FakeTime()
  start = fake.now
  assert not list(continuous.stepfiles(str(tmp_path / "later"), wait_minutes=2,
                                  poll_seconds=30, clock=fake.clock,
                                  sleep=fake.sleep))
  assert start + 120 < fake.now <= start + 150


def _step_file(step):
  return naming.Checkpoint(f"d/model.ckpt-{step}", step, "name")


@pytest.mark.parametrize("steps, n, expected", [
    ([1, 2, 3, 4, 5], 3, [(1, 2, 3), (2, 3, 4), (3, 4, 5)]),
    ([1, 2], 3, []),
    ([7, 9], 1, [(7,), (9,)]),
    ([1, 2, 3], 3, [(1, 2, 3)]),
])
def test_windows_slide_over_consecutive_checkpoints(steps, n, expected):
  got = list(continuous.windows([_step_file(s) for s in steps], n))
  assert [tuple(s.step for s in w) for w in got] == expected


# --- outputs -----------------------------------------------------------------


def test_outputs_equal_one_shot_average_of_each_window(tmp_path):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = mixed_series(train, STEPS)
  run_file_times = _run_files(train)

  outcomes = list(average_all(train, out, n=3))

  assert [(o.step, o.status) for o in outcomes] == [
      (300, continuous.WRITTEN), (400, continuous.WRITTEN), (500, continuous.WRITTEN)]
  assert sorted(f for f in os.listdir(out) if f.endswith(".index")) == [
      "model.ckpt-300.index", "model.ckpt-400.index", "model.ckpt-500.index"]
  for i, step in enumerate([300, 400, 500]):
    window = prefixes[i:i + 3]
    ours = read_checkpoint(os.path.join(out, f"model.ckpt-{step}"))
    expected = _one_shot(window, str(tmp_path / f"oneshot{step}"), step)
    assert_same_values(ours, expected)
    # dtypes kept (legacy forced float32), global_step = step, and the
    # non-float counter from the newest checkpoint, not averaged.
    assert ours["transformer/body/decoder/layer_0/layer_prepostprocess/scale"].dtype == np.float16
    assert (ours["transformer/symbol_modality/shared/weights_0"].dtype ==
            ml_dtypes.bfloat16)
    assert ours["transformer/body/scale64"].dtype == np.float64
    assert ours["global_step"] == step
    assert ours["train_stats/problem_0_steps"] == step * 5 + 1
    # t2t-bleu and t2t-translate-all date an output by its index file.
    source_mtime = os.stat(prefixes[i + 2] + ".index").st_mtime_ns
    output_files = _files_of(os.path.join(out, f"model.ckpt-{step}"))
    dated = [f for f in output_files if f.endswith(".index") or ".data-" in f]
    assert len(dated) >= 2 and any(".data-" in f for f in dated)
    for path in dated:
      assert os.stat(path).st_mtime_ns == source_mtime, path

  for name, mtime in run_file_times.items():
    copied = os.path.join(out, name)
    assert os.stat(copied).st_mtime_ns == mtime
    with open(copied, encoding="utf-8") as f:
      assert f.read() == f"--{name}=1\n"
  assert not os.path.exists(os.path.join(out, "flags_t2t.txt"))

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  state = tf.train.get_checkpoint_state(out)
  with open(os.path.join(out, "checkpoint"), encoding="utf-8") as f:
    text = f.read()
  assert 'model_checkpoint_path: "model.ckpt-500"' in text  # relative
  assert list(state.all_model_checkpoint_paths) == [
      os.path.join(out, f"model.ckpt-{s}") for s in (300, 400, 500)]
  # The training directory's state file is the trainer's, untouched.
  assert tf.train.get_checkpoint_state(train).model_checkpoint_path == (
      prefixes[-1])
  with open(os.path.join(out, "model.ckpt-500.t2t_avg.json"),
            encoding="utf-8") as f:
    record = json.load(f)
  assert [r["path"] for r in record["inputs"]] == prefixes[2:]


def test_same_files_as_legacy_t2t_avg_all(tmp_path):
  train = str(tmp_path / "train")
  prefixes = write_tf1_series(
      train, STEPS, lambda s: {
          "body/kernel": np.full((4, 3), s / 7, np.float32),
          "body/bias": np.linspace(0, 1, 5, dtype=np.float32) * s,
          "train_stats/problem_0_steps": np.int32(s)})
  run_file_times = _run_files(train)
  legacy, ours = str(tmp_path / "legacy"), str(tmp_path / "ours")

  run_legacy("t2t_avg_all", f"--model_dir={train}", f"--output_dir={legacy}",
             "--n=3")
  list(average_all(train, ours, n=3))

  def indexes(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".index"))
  assert indexes(ours) == indexes(legacy) == [
      f"model.ckpt-{s}.index" for s in (300, 400, 500)]
  # Legacy copies flags.txt (not hparams.json) with shutil.copy2; so do we.
  legacy_flags = os.stat(os.path.join(legacy, "flags.txt"))
  our_flags = os.stat(os.path.join(ours, "flags.txt"))
  assert legacy_flags.st_mtime_ns == our_flags.st_mtime_ns == (
      run_file_times["flags.txt"])
  for prefix, name in zip(prefixes[2:], indexes(ours)):
    source = os.stat(prefix + ".index").st_mtime_ns
    ours_mtime = os.stat(os.path.join(ours, name)).st_mtime_ns
    legacy_mtime = os.stat(os.path.join(legacy, name)).st_mtime_ns
    assert ours_mtime == source
    # Legacy's os.utime takes float seconds: within a microsecond.
    assert abs(legacy_mtime - source) < 2000
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  assert os.path.basename(
      tf.train.get_checkpoint_state(legacy).model_checkpoint_path) == (
          os.path.basename(tf.train.get_checkpoint_state(ours)
                           .model_checkpoint_path))
  # The numbers are not compared bit for bit: legacy keeps a running sum
  # (adding x/n, subtracting the oldest x/n), which drifts, and forces
  # float32; ours equal a one-shot average of each window (tested above).
  ours_500 = read_checkpoint(os.path.join(ours, "model.ckpt-500"))
  legacy_500 = read_checkpoint(os.path.join(legacy, "model.ckpt-500"))
  np.testing.assert_allclose(ours_500["body/kernel"], 400 / 7, rtol=1e-6)
  np.testing.assert_allclose(legacy_500["body/kernel"],
                             ours_500["body/kernel"], rtol=1e-5)
  # Legacy zeroes train_stats; ours keeps the newest checkpoint's value.
  assert legacy_500["train_stats/problem_0_steps"] == 0
  assert ours_500["train_stats/problem_0_steps"] == 500


# --- robustness --------------------------------------------------------------


_TRAINER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import tensorflow.compat.v1 as tf
    tf.disable_v2_behavior()
    directory, keep = sys.argv[1], int(sys.argv[2])
    steps = [int(s) for s in sys.argv[3].split(",")]
    bursts = {int(s) for s in sys.argv[4].split(",")}
    w = tf.get_variable("w", shape=(4,), dtype=tf.float32)
    step_ph = tf.placeholder(tf.float32, shape=())
    global_step = tf.train.get_or_create_global_step()
    step_int = tf.placeholder(tf.int64, shape=())
    assigns = [w.assign(tf.fill([4], step_ph)), global_step.assign(step_int)]
    saver = tf.train.Saver(max_to_keep=keep)
    # With a 5th argument, an eval dir: a loss is appended after each save.
    evals = tf.summary.FileWriter(sys.argv[5]) if len(sys.argv) > 5 else None
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      for step in steps:
        sess.run(assigns, {step_ph: step, step_int: step})
        saver.save(sess, os.path.join(directory, "model.ckpt"),
                   global_step=step)
        if evals is not None:
          evals.add_summary(tf.Summary(value=[tf.Summary.Value(
              tag="loss", simple_value=1000.0 / step)]), step)
          evals.flush()
        if step not in bursts:  # a burst: the next save follows at once
          time.sleep(0.25)
""")


def _average_beside_trainer(train, steps, bursts, caplog, *, evals=None,
                            **kwargs):
  """Runs `continuous.average_all(train, **kwargs)` while `_TRAINER` saves `steps`.

  Returns the outcomes, checked to be consecutive windows up to the last step.
  """
  os.makedirs(train)
  command = [sys.executable, "-c", _TRAINER, train, "3",
             ",".join(map(str, steps)), ",".join(map(str, bursts))]
  trainer = subprocess.Popen(command + ([evals] if evals else []),
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                             stderr=subprocess.PIPE, text=True)
  try:
    wait_for_first_save(trainer, os.path.join(train, "*.index"))
    with caplog.at_level(std_logging.INFO):
      outcomes = list(average_all(train, wait_minutes=0.1,
                                  poll_seconds=0.1, **kwargs))
  finally:
    _, stderr = trainer.communicate(timeout=120)
  assert trainer.returncode == 0, stderr[-2000:]
  # Every window of consecutive checkpoints that were found got an outcome.
  for before, after in zip(outcomes, outcomes[1:]):
    assert after.inputs[:-1] == before.inputs[1:]
  assert outcomes[-1].step == steps[-1]
  return outcomes


def test_beside_a_training_process_that_deletes_old_checkpoints(
    tmp_path, caplog):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  steps = list(range(10, 170, 10))
  outcomes = _average_beside_trainer(train, steps, [60, 70, 110, 120], caplog,
                                     output_dir=out, n=3)
  warnings = "\n".join(logged(caplog))
  written = 0
  for outcome in outcomes:
    if outcome.status == continuous.WRITTEN:
      written += 1
      values = read_checkpoint(outcome.output_path)
      expected = np.mean([s.step for s in outcome.inputs])
      np.testing.assert_array_equal(values["w"], np.full(4, expected,
                                                         np.float32))
      assert values["global_step"] == outcome.step
    else:
      # Skipped only because a checkpoint of its window was deleted.
      assert outcome.status == continuous.SKIPPED
      gone = [s.path for s in outcome.inputs if s.path in outcome.reason]
      assert gone and not any(checkpoints.exists(p) for p in gone)
      assert outcome.output_path in warnings and gone[0] in warnings
  # The last window (the checkpoints the trainer keeps) is always formed.
  assert outcomes[-1].status == continuous.WRITTEN
  assert written >= 1
  print(f"{len(outcomes)} windows: {written} written, "
        f"{len(outcomes) - written} skipped for vanished checkpoints")


def test_restart_skips_existing_outputs_but_builds_windows_from_before(
    tmp_path, caplog):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = mixed_series(train, STEPS)
  list(average_all(train, out, n=3))
  before = tree_fingerprint(out)
  inodes = {f: os.stat(os.path.join(out, f)).st_ino for f in os.listdir(out)}

  with caplog.at_level(std_logging.INFO):
    again = list(average_all(train, out, n=3))
  assert [o.status for o in again] == [continuous.EXISTED] * 3
  assert tree_fingerprint(out) == before
  assert {f: os.stat(os.path.join(out, f)).st_ino
          for f in os.listdir(out)} == inodes
  messages = "\n".join(r.getMessage() for r in caplog.records)
  for step in (300, 400, 500):
    assert f"model.ckpt-{step} exists; skipped, not recomputed" in messages

  # Only the missing output is computed, from the checkpoints before it.
  _delete_checkpoint(os.path.join(out, "model.ckpt-500"))
  third = list(average_all(train, out, n=3))
  assert [o.status for o in third] == [continuous.EXISTED, continuous.EXISTED,
                                       continuous.WRITTEN]
  assert_same_values(read_checkpoint(os.path.join(out, "model.ckpt-500")),
                     _one_shot(prefixes[2:], str(tmp_path / "one"), 500))
  after = tree_fingerprint(out)
  for name, fingerprint in before.items():
    if "model.ckpt-500" not in name and name != "checkpoint":
      assert after[name] == fingerprint, name


def test_checkpoint_vanishing_after_discovery_skips_its_windows(
    tmp_path, caplog):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = write_tf1_series(train, STEPS + [600], step_valued({"w": (3,)}))
  outcomes = []
  with caplog.at_level(std_logging.WARNING):
    for outcome in average_all(train, out, n=3):
      outcomes.append(outcome)
      if outcome.step == 300:  # the trainer's max_to_keep deletes step 300
        _delete_checkpoint(prefixes[2])
  assert [(o.step, o.status) for o in outcomes] == [
      (300, continuous.WRITTEN), (400, continuous.SKIPPED), (500, continuous.SKIPPED),
      (600, continuous.WRITTEN)]
  warnings = logged(caplog)
  assert len(warnings) == 2
  for step, warning in zip((400, 500), warnings):
    assert f"model.ckpt-{step}" in warning
    assert f"checkpoint {prefixes[2]} vanished" in warning
  assert read_checkpoint(os.path.join(out, "model.ckpt-600"))["w"].tolist() == [
      500.0] * 3


def test_checkpoint_vanishing_while_averaging_skips_that_window(
    tmp_path, caplog, monkeypatch):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = write_tf1_series(train, STEPS, step_valued({"w": (3,)}))
  real = averaging.average_checkpoints

  def deleting_first(inputs, output_path, **kwargs):
    if kwargs["output_step"] == 400:
      _delete_checkpoint(prefixes[1])
      # As on an object store: files held open do not outlive a delete.
      for c in inputs:
        c.source.close()
    return real(inputs, output_path, **kwargs)

  monkeypatch.setattr(continuous.averaging, "average_checkpoints", deleting_first)
  with caplog.at_level(std_logging.WARNING):
    outcomes = list(average_all(train, out, n=3))
  assert [o.status for o in outcomes] == [continuous.WRITTEN, continuous.SKIPPED,
                                          continuous.WRITTEN]
  assert f"{prefixes[1]} vanished while being averaged" in outcomes[1].reason
  assert any("model.ckpt-400" in w and prefixes[1] in w
             for w in logged(caplog))
  assert not glob.glob(os.path.join(out, "*400*"))
  assert not glob.glob(os.path.join(out, "*tmp*"))


def test_a_window_across_a_deleted_checkpoint_says_which_step(tmp_path,
                                                              caplog):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  steps = [20, 40, 60, 80, 100, 120]
  prefixes = write_tf1_series(train, steps, step_valued({"w": (3,)}))
  _delete_checkpoint(prefixes[3])  # Step 80, before the run looks.
  with caplog.at_level(std_logging.WARNING):
    outcomes = list(average_all(train, out, n=3))
  assert [(o.step, o.status) for o in outcomes] == [
      (60, continuous.WRITTEN), (100, continuous.WRITTEN),
      (120, continuous.WRITTEN)]
  assert logged(caplog) == [
      f"The window of {out}/model.ckpt-{newest} (steps {window}) spans "
      "missing checkpoints: step 80 (the others are 20 steps apart); "
      "averaging the 3 checkpoints there"
      for newest, window in ((100, "40, 60, 100"), (120, "60, 100, 120"))]
  # Averaged as the 3 it holds, as before.
  assert read_checkpoint(os.path.join(out, "model.ckpt-100"))["w"].tolist() == [
      float(np.float32((40 + 60 + 100) / 3))] * 3


def test_a_window_across_a_checkpoint_deleted_while_listed_says_so(
    tmp_path, caplog, monkeypatch):
  """Saved at uneven steps (every N seconds): only the listing tells."""
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = write_tf1_series(train, [10, 25, 45, 80, 100],
                              step_valued({"w": (3,)}))
  real_times = continuous.filesystem.times

  def deleted_after_listing(path):
    if path == prefixes[2] + ".index":
      return None
    return real_times(path)

  monkeypatch.setattr(continuous.filesystem, "times", deleted_after_listing)
  with caplog.at_level(std_logging.WARNING):
    outcomes = list(average_all(train, out, n=2))
  assert [o.step for o in outcomes] == [25, 80, 100]
  assert logged(caplog) == [
      f"The window of {out}/model.ckpt-80 (steps 25, 80) spans missing "
      "checkpoints: step 45 (listed, then deleted); averaging the 2 "
      "checkpoints there"]


@pytest.mark.parametrize("steps, spacing", [
    ([100, 200, 300, 500], 100), ([40, 60, 100], 20),
    ([1000, 1234, 2456, 3701], None), ([5], None), ([1000, 2000, 2437], None)])
def test_the_usual_spacing_of_a_series(steps, spacing):
  series = continuous._Series()  # pylint: disable=protected-access
  series.steps = steps
  assert series.spacing() == spacing


@pytest.mark.parametrize("damage, says", [
    ("remove_data", "is incomplete: {prefix}.data-00000-of-00001 is missing"),
    ("truncate_data", "{prefix}"),
    ("corrupt_data", "{prefix}"),
])
def test_half_written_checkpoint_skips_its_windows(tmp_path, caplog, damage,
                                                   says):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = write_tf1_series(train, STEPS + [600, 700],
                              step_valued({"w": (64,), "v": (8, 8)}))
  data = prefixes[3] + ".data-00000-of-00001"
  if damage == "remove_data":
    os.remove(data)
  elif damage == "truncate_data":
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 3)
  else:  # same size, other bytes: only the checksums tell
    with open(data, "r+b") as f:
      f.seek(40)
      f.write(b"\x7f" * 64)
  with caplog.at_level(std_logging.WARNING):
    outcomes = list(average_all(train, out, n=3))
  assert [(o.step, o.status) for o in outcomes] == [
      (300, continuous.WRITTEN), (400, continuous.SKIPPED), (500, continuous.SKIPPED),
      (600, continuous.SKIPPED), (700, continuous.WRITTEN)]
  expected = says.format(prefix=prefixes[3])
  for outcome in outcomes[1:4]:
    assert expected in outcome.reason
  warnings = logged(caplog)
  assert len(warnings) == 3 and all(expected in w for w in warnings)


def test_nan_in_a_window_stops_the_run_unless_allowed(tmp_path):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")

  def make(step):
    value = np.full((3,), step, np.float32)
    if step == 400:
      value[1] = np.nan
    return {"w": value}

  prefixes = write_tf1_series(train, STEPS, make)
  outcomes = []
  with pytest.raises(AveragingError, match=f"checkpoint {prefixes[3]} holds"):
    for outcome in average_all(train, out, n=3):
      outcomes.append(outcome)
  # Not a vanished input: the trainer diverged, and saying so beats
  # skipping every window from now on.
  assert [o.step for o in outcomes] == [300]
  allowed = list(average_all(train, str(tmp_path / "nan"), n=3,
                                  allow_nonfinite=True))
  assert [o.status for o in allowed] == [continuous.WRITTEN] * 3


# --- refusals ----------------------------------------------------------------


def test_output_dir_equal_to_model_dir_is_refused(tmp_path):
  train = str(tmp_path / "train")
  write_tf1_series(train, [1, 2], step_valued({"w": (2,)}))
  before = tree_fingerprint(train)
  same = os.path.join(train, "..", "train") + "/"
  with pytest.raises(ArgumentError) as raised:
    average_all(train, same, n=1)
  assert train in str(raised.value) and same in str(raised.value)

  result = call_cli(f"--model_dir={train}", f"--output_dir={train}", "--n=1")
  line = error_line(result)
  assert f"--output_dir {train} is the training directory" in line
  script = os.path.join(os.path.dirname(sys.executable), "t2t-avg-all")
  console = subprocess.run(
      [script, f"--model_dir={train}", f"--output_dir={train}/", "--n=1"],
      capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert f"--model_dir {train}" in error_line(console)
  assert tree_fingerprint(train) == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be >= 1"),
    (dict(n=3, weighting="softmax"), "needs metrics_from_events"),
    (dict(n=3, weighting="explicit", weights=[1, 2]), "needs n=3 weights"),
    (dict(n=2, weighting="top_k", top_k=3, metrics_from_events=["e"]),
     "top_k must be between 1 and n=2"),
    (dict(n=2, wait_minutes=-1), "must be >= 0"),
])
def test_bad_arguments_are_refused_before_anything_happens(tmp_path, kwargs,
                                                           match):
  with pytest.raises(ArgumentError, match=match):
    average_all(str(tmp_path), str(tmp_path / "avg"), **kwargs)
  assert not os.path.exists(tmp_path / "avg")


def test_missing_model_dir_without_waiting_is_an_error(tmp_path):
  with pytest.raises(AveragingError, match="is not a directory"):
    average_all(str(tmp_path / "nope"), str(tmp_path / "avg"))


def test_run_fails_when_every_window_is_skipped(tmp_path):
  train = str(tmp_path / "train")
  prefixes = write_tf1_series(train, [1, 2, 3], step_valued({"w": (2,)}))
  os.remove(prefixes[0] + ".data-00000-of-00001")
  with pytest.raises(AveragingError, match="no window could be averaged"):
    continuous.run(options.ContinuousOptions(train, str(tmp_path / "avg"), n=3))
  assert not glob.glob(str(tmp_path / "avg" / "*.index"))
  assert continuous.run(options.ContinuousOptions(
      train, str(tmp_path / "avg"), n=2, min_steps=2)) == [
                       os.path.join(str(tmp_path / "avg"), "model.ckpt-3")]


# --- metric weighting --------------------------------------------------------

def test_softmax_window_matches_one_shot_weighted_average(tmp_path):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = mixed_series(train, STEPS[:4])
  eval_dir = str(tmp_path / "train" / "eval")
  _write_metric(eval_dir, {100: 2.0, 200: 1.5, 300: 1.0, 400: 1.25})

  outcomes = list(average_all(train, out, n=3, weighting="softmax",
                                   metrics_from_events=[eval_dir], metric="loss",
                                   weight_summaries=True))
  assert [(o.step, o.status) for o in outcomes] == [(300, continuous.WRITTEN),
                                                    (400, continuous.WRITTEN)]
  for i, step in enumerate([300, 400]):
    window = [checkpoints.load(p) for p in prefixes[i:i + 3]]
    weighing = oneshot.weigh(window, options.WeightingOptions(
        weighting="softmax", metrics_from_events=(eval_dir,), metric="loss",
        metric_mode="min"))
    ours = read_checkpoint(os.path.join(out, f"model.ckpt-{step}"))
    assert_same_values(ours, _one_shot(
      weighing.checkpoints, str(tmp_path / f"weighted{step}"), step,
      weights=weighing.weights))
    uniform = _one_shot(prefixes[i:i + 3], str(tmp_path / f"uniform{step}"),
                        step)
    name = "transformer/body/encoder/layer_0/self_attention/q/kernel"
    assert ours[name].tobytes() != uniform[name].tobytes()
    weights = [r.weight for r in outcomes[i].result.rows]
    assert weights == pytest.approx(list(weighing.weights))
    assert len(set(weights)) == 3
  # Each window's weights as TensorBoard scalars; the latest window's last.
  points = events.read_metric([os.path.join(out, "t2t_avg")],
                              "t2t_avg/weight")
  assert [p.step for p in points] == [100, 200, 300, 400]
  assert points[-1].value == pytest.approx(outcomes[1].result.rows[-1].weight)


def test_window_waits_for_its_newest_metric_then_is_skipped(tmp_path, caplog):
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  prefixes = write_tf1_series(train, STEPS, step_valued({"w": (3,)}))
  eval_dir = str(tmp_path / "eval")
  _write_metric(eval_dir, {100: 3.0, 200: 2.0, 300: 1.0})

  def eval_of_400_arrives(count):
    if count == 3:
      _write_metric(eval_dir, {400: 0.5})

  fake = FakeTime(eval_of_400_arrives)
  with caplog.at_level(std_logging.WARNING):
    outcomes = list(average_all(
        train, out, n=3, wait_minutes=1, poll_seconds=10, clock=fake.clock,
        sleep=fake.sleep, weighting="rank", metrics_from_events=[eval_dir], metric="loss"))

  assert [(o.step, o.status) for o in outcomes] == [
      (300, continuous.WRITTEN), (400, continuous.WRITTEN), (500, continuous.SKIPPED)]
  # 400 waited three polls for its metric; 500 waited until a minute after
  # its ctime, then was skipped, and the loop went on to its end.
  deadline_500 = os.stat(prefixes[4] + ".index").st_ctime_ns / 1e9 + 60
  assert fake.now > deadline_500
  assert len(fake.sleeps) >= 6
  assert "step 500" in outcomes[2].reason and "loss" in outcomes[2].reason
  assert [w for w in logged(caplog) if "model.ckpt-500" in w]
  rank_weights = [r.weight for r in outcomes[1].result.rows]
  assert rank_weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
  assert not os.path.exists(os.path.join(out, "model.ckpt-500.index"))


def test_explicit_weights_apply_per_window_position(tmp_path):
  train = str(tmp_path / "train")
  write_tf1_series(train, [1, 2, 3], step_valued({"w": (2,)}))
  outcomes = list(average_all(train, str(tmp_path / "avg"), n=2,
                                   weighting="explicit", weights=[1, 3]))
  assert [(o.step, o.status) for o in outcomes] == [(2, continuous.WRITTEN),
                                                    (3, continuous.WRITTEN)]
  for step in (2, 3):
    value = read_checkpoint(naming.OutputNames().build_name(
        str(tmp_path / "avg"), step))["w"]
    np.testing.assert_array_equal(value, np.full(2, (step - 1 + 3 * step) / 4,
                                                 np.float32))


def test_weighted_beside_a_trainer_appending_eval_events(tmp_path, caplog):
  """Checkpoints appear and vanish, the events file grows: no window whose
  checkpoints were all still there is lost, each weighted by its metrics."""
  train, out = str(tmp_path / "train"), str(tmp_path / "avg")
  steps = list(range(10, 130, 10))
  outcomes = _average_beside_trainer(
      train, steps, [50, 90], caplog, evals=str(tmp_path / "train/eval"),
      output_dir=out, n=2, weighting="softmax",
      metrics_from_events=[str(tmp_path / "train/eval")], metric="loss")
  for outcome in outcomes:
    if outcome.status == continuous.SKIPPED:
      gone = [s.path for s in outcome.inputs if s.path in outcome.reason]
      assert gone and not any(checkpoints.exists(p) for p in gone), (
          outcome.reason)
      continue
    assert outcome.status == continuous.WRITTEN
    older, newer = (s.step for s in outcome.inputs)
    # Lower loss (1000 / step) is better: the newer checkpoint weighs more.
    losses = np.array([1000.0 / older, 1000.0 / newer], np.float32)
    logits = -(losses.astype(np.float64) - losses.min()) / np.std(losses)
    w = np.exp(logits) / np.exp(logits).sum()
    expected = np.float32(w[0] * older + w[1] * newer)
    np.testing.assert_array_equal(read_checkpoint(outcome.output_path)["w"],
                                  np.full(4, expected, np.float32))
  assert outcomes[-1].status == continuous.WRITTEN
