"""Weighting Keras files by Keras' own logs: TensorBoard tags and CSVLogger files."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, assert_same_values, load_script, one_shot
from keras_runs import (EPOCHS, build_model, csv_column, data, datasets,
                        expected_average, policy_scope, softmax_weights,
                        tensorboard_scalars)
from keras_runs import keras_runs_fixture  # noqa: F401  (the fixture)
from t2t_avg import AveragingError
from t2t_avg.metrics import keras_logs
from t2t_avg.metrics import points as metric_points
from t2t_avg.jobs import oneshot
from t2t_avg import options
from t2t_avg.inputs.checkpoints import Checkpoint
from t2t_avg.errors import ArgumentError
from t2t_avg.metrics.points import EPOCH, ITERATIONS, STEP, MetricPoint


def _readme_keras_commands():
  """The commands of the README's Keras 3 section, one argv per line."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## Keras 3"):]
  block = section[section.index("```sh\n") + 6:section.index("```\n", 6)]
  return [shlex.split(line, comments=True) for line in block.splitlines()
          if line and not line.startswith(("#", "pip "))]


# Runs commands in one process (TensorFlow imported once): absl's app.run
# re-parses the flags of a rerun, reset to their defaults first.
_README_DRIVER = """
import json, sys
from absl import flags
from t2t_avg.cli import average
from t2t_avg.cli import compare as cli_compare
mains = {"t2t_avg": average.run_main, "t2t_avg.compare": cli_compare.run,
         "t2t-avg-all": average.run_avg_all}
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  sys.argv = argv
  try:
    mains[argv[0]]()
  except SystemExit as e:
    if e.code:
      sys.exit(f"{argv} exited with {e.code}")
"""


def test_readme_keras_commands_work_on_a_real_run(keras_runs, tmp_path):
  run = keras_runs["float32"]  # what `scripts/make_keras_run.py` writes
  commands = _readme_keras_commands()
  assert commands[0] == ["python", "scripts/make_keras_run.py",
                         "/tmp/keras_run"]
  places = {"/tmp/keras_run": run.directory,
            "/tmp/keras_avg": str(tmp_path / "keras_avg")}
  runs = []
  for command in commands[1:]:
    argv = command
    for old, new in places.items():
      argv = [arg.replace(old, new) for arg in argv]
    if argv[0] == "python":
      assert argv[1] == "-m", argv
      argv = argv[2:]
    runs.append(argv)
  assert [argv[0] for argv in runs] == ["t2t_avg", "t2t_avg",
                                        "t2t_avg.compare", "t2t_avg",
                                        "t2t_avg", "t2t-avg-all"]
  result = subprocess.run(
      [sys.executable, "-c", _README_DRIVER, json.dumps(runs)],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "identical: all 24 float variables are equal" in result.stdout
  out = places["/tmp/keras_avg"]
  # Uniform: the last 3 files; softmax by the validation epoch_loss logged
  # for the epochs of w-02..w-04, i.e. at 0-based epochs 1..3.
  assert_same_values(datasets(os.path.join(out, "avg.weights.h5")),
                     expected_average(run.weights[1:]))
  validation = os.path.join(run.tensorboard, "validation")
  logged = tensorboard_scalars(validation, "epoch_loss")
  values = [logged[epoch] for epoch in (1, 2, 3)]
  weights = softmax_weights(values)
  softmax = os.path.join(out, "softmax.weights.h5")
  expected = expected_average(run.weights[1:], weights)
  assert_same_values(datasets(softmax), expected)
  with open(softmax + ".t2t_avg.json", encoding="utf-8") as f:
    record = json.load(f)
  assert [r["metric"] for r in record["inputs"]] == values
  assert [r["weight"] for r in record["inputs"]] == weights
  logged = csv_column(run.csv_log, "val_loss")
  assert_same_values(datasets(os.path.join(out, "val_loss.keras")),
                     expected_average(run.archives[2:], softmax_weights(
                         [logged[2], logged[3]])))
  assert sorted(os.listdir(os.path.join(out, "windows"))) == [
      "w-03.weights.h5", "w-03.weights.h5.t2t_avg.json", "w-04.weights.h5",
      "w-04.weights.h5.t2t_avg.json"]
  # What Keras makes of the weighted file.
  model = build_model()
  model.load_weights(softmax)
  resaved = str(tmp_path / "resaved.weights.h5")
  model.save_weights(resaved)
  assert_same_values(datasets(resaved), expected)
  assert np.isfinite(model.evaluate(*data(), verbose=0)[0])


def test_softmax_by_csvlogger_val_loss_into_a_keras_file(keras_runs,
                                                         tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  run = keras_runs["mixed_float16"]
  output = str(tmp_path / "avg.keras")
  result = one_shot(checkpoints=run.archives, output_path=output,
                    weighting="softmax", metrics_from_events=[run.csv_log],
                    metric="val_loss")
  logged = csv_column(run.csv_log, "val_loss")
  values = [logged[epoch] for epoch in range(EPOCHS)]
  weights = softmax_weights(values)
  assert [r.metric for r in result.rows] == values
  assert [r.weight for r in result.rows] == weights
  expected = expected_average(run.archives, weights)
  assert_same_values(datasets(output), expected)
  with policy_scope("mixed_float16"):
    model = keras.models.load_model(output)
    resaved = str(tmp_path / "resaved.weights.h5")
    model.save_weights(resaved)
    assert np.isfinite(model.evaluate(*data(), verbose=0)[0])
  assert_same_values(datasets(resaved), expected)


def test_iterations_tags_align_with_the_counter_in_each_file(keras_runs,
                                                             tmp_path):
  run = keras_runs["mixed_float16"]
  validation = os.path.join(run.tensorboard, "validation")
  result = one_shot(checkpoints=run.weights, output_path=str(
      tmp_path / "avg.weights.h5"), weighting="rank",
                    metrics_from_events=[validation],
                    metric="evaluation_loss_vs_iterations")
  logged = tensorboard_scalars(validation, "evaluation_loss_vs_iterations")
  assert sorted(logged) == [4, 8, 12, 16]
  assert [(r.step, r.metric) for r in result.rows] == sorted(logged.items())


def test_a_checkpoint_is_never_paired_with_the_next_epochs_metric(
    keras_runs, tmp_path):
  run = keras_runs["float32"]
  # The log of the last epoch is missing (the trainer died before writing it).
  log = str(tmp_path / "training.log")
  with open(run.csv_log, encoding="utf-8", newline="") as f:
    lines = f.read().splitlines(keepends=True)
  with open(log, "w", encoding="utf-8", newline="") as f:
    f.writelines(lines[:-1])
  flags = dict(checkpoints=run.weights, metrics_from_events=[log],
               metric="val_loss", weighting="softmax", step_from="name",
               output_path=str(tmp_path / "avg.weights.h5"))
  with pytest.raises(AveragingError) as error:
    one_shot(**flags)
  assert error.value.message(as_flags=True) == (
      f"no val_loss metric at epoch 3 (0-based, as logged: the file of epoch "
      f"4) (checkpoint {run.weights[-1]}, --max_step_gap=0); epochs (0-based) "
      "with one: 0, 1, 2 (or pass --missing_metric=skip)")
  result = one_shot(missing_metric="skip", **flags)
  logged = csv_column(run.csv_log, "val_loss")
  assert [(os.path.basename(r.path), r.step, r.metric)
          for r in result.rows] == [(f"w-0{e}.weights.h5", e, logged[e - 1])
                                    for e in (1, 2, 3)]


def test_an_iterations_metric_needs_an_iteration_counter(keras_runs,
                                                         tmp_path):
  run = keras_runs["float32"]
  with pytest.raises(AveragingError, match=(
      rf"^checkpoint {run.weights[0]} has no optimizer iteration counter \(its "
      r"step 1 is the number in its name, an epoch\), so a metric logged by "
      r"iterations cannot be matched to it; weigh by an epoch_\* tag or a "
      r"CSVLogger file$")):
    one_shot(checkpoints=run.weights, step_from="name", weighting="softmax",
             metrics_from_events=[os.path.join(run.tensorboard,
                                               "validation")],
             metric="evaluation_loss_vs_iterations",
             output_path=str(tmp_path / "avg.weights.h5"))


def test_csv_and_event_files_are_not_mixed(keras_runs):
  run = keras_runs["float32"]
  validation = os.path.join(run.tensorboard, "validation")
  with pytest.raises(ArgumentError) as error:
    keras_logs.read_metric([run.csv_log, validation], "val_loss")
  assert error.value.message(as_flags=True) == (
      f"--metrics_from_events mixes CSV logs ({run.csv_log}) and TensorBoard "
      f"events ({validation}); give one kind")


# --- where a checkpoint sits on each kind of step axis ------------------------

def _keras(name, step, source="optimizer/vars/0"):
  return Checkpoint(f"/run/{name}.weights.h5", step, source)


@pytest.mark.parametrize("kind, checkpoints, positions", [
    (EPOCH, [_keras("w-01", 4), _keras("w-03", 12)], [0, 2]),
    (EPOCH, [_keras("w-02", 2, "name")], [1]),
    (ITERATIONS, [_keras("w-01", 4), _keras("w-03", 12)], [4, 12]),
    (STEP, [Checkpoint("/t/model.ckpt-500", 500, "global_step")], [500]),
    (ITERATIONS, [Checkpoint("/t/model.ckpt-500", 500, "name")], [500]),
])
def test_checkpoint_positions(kind, checkpoints, positions):
  assert keras_logs.checkpoint_positions(checkpoints, kind) == positions


@pytest.mark.parametrize("kind, checkpoints, message", [
    (EPOCH, [Checkpoint("/t/model.ckpt-3", 3, "global_step")],
     r"^checkpoint /t/model.ckpt-3 has no epoch in its name \(only Keras "),
    (EPOCH, [_keras("best", 12)], r"^checkpoint /run/best.weights.h5 has no "),
    (EPOCH, [_keras("b-e01", 3), _keras("b-e03", 7), _keras("x-e03", 11)],
     r"both have epoch 3 in their names \(saved within an epoch"),
    (EPOCH, [_keras("w-01", 8), _keras("w-02", 4)],
     r"^the numbers in the names of /run/w-01.weights.h5 \(1\) and "
     r"/run/w-02.weights.h5 \(2\) do not follow their iteration counters "
     r"\(8, 4\), so they are not epochs"),
    (STEP, [_keras("w", None, "unknown")],
     r"^the step of checkpoint /run/w.weights.h5 is unknown"),
])
def test_checkpoint_positions_refuse_what_cannot_be_paired(kind, checkpoints,
                                                           message):
  with pytest.raises(AveragingError, match=message):
    keras_logs.checkpoint_positions(checkpoints, kind)


@pytest.mark.parametrize("tag, kind", [
    ("epoch_loss", EPOCH), ("epoch_sparse_categorical_accuracy", EPOCH),
    ("validation/epoch_loss", EPOCH), ("evaluation_loss_vs_iterations",
                                       ITERATIONS),
    ("batch_loss", ITERATIONS), ("loss", STEP), ("val_loss", STEP),
    ("metrics-translate_ende/targets/approx_bleu_score", STEP)])
def test_tag_kinds_follow_keras_naming(tag, kind):
  assert keras_logs.tag_kind(tag) == kind


@pytest.mark.parametrize("tag, direction", [
    ("val_loss", "min"), ("epoch_loss", "min"), ("val_accuracy", "max"),
    ("epoch_sparse_categorical_accuracy", "max"), ("val_auc", "max"),
    ("epoch_auc", "max"), ("val_sparse_categorical_crossentropy", "min")])
def test_keras_metric_names_give_their_direction(tag, direction):
  assert metric_points.infer_direction(tag) == direction


# --- reading CSVLogger files --------------------------------------------------

def _csv(tmp_path, text, name="log.csv"):
  path = str(tmp_path / name)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  return path


def test_csv_rows_become_epoch_points(tmp_path):
  path = _csv(tmp_path, "epoch,accuracy,loss,val_accuracy,val_loss\r\n"
              "0,0.25,1.30,0.34,1.10\r\n1,0.30,1.12,NA,NA\r\n"
              "2,0.35,nan,0.40,nan\r\n")
  points = keras_logs.read_metric([path], "val_loss")
  assert [(p.step, p.kind) for p in points] == [(0, EPOCH), (2, EPOCH)]
  assert points[0].value == 1.10 and np.isnan(points[1].value)
  assert keras_logs.is_csv(path) and not keras_logs.is_csv(str(tmp_path))


def test_csv_resumed_run_keeps_the_last_row_of_an_epoch(tmp_path, caplog):
  path = _csv(tmp_path, "epoch;loss\n0;2.0\n1;1.5\n1;1.25\n2;1.0\n3;0.")
  points = keras_logs.read_csv([path], "loss")
  # The last line, without its newline, may be half written: left out.
  assert [(p.step, p.value) for p in points] == [(0, 2.0), (1, 1.25),
                                                 (2, 1.0)]
  assert "epoch 1 has two loss values, 1.5 and 1.25" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("epoch,loss\n0,1.0\n", r"Metric column 'val_loss' not found in .*log.csv;"
     r" columns there: loss$"),
    ('epoch,val_loss\n0,"[1.0, 2.0]"\n', r"column 'val_loss' holds '\[1.0, "
     r"2.0\]' at epoch 0, not a number$"),
    ("epoch,val_loss\n0,1.0,7\n1,1.0\n", r"line 2 is not a CSVLogger row"),
])
def test_csv_problems_are_named(tmp_path, text, message):
  with pytest.raises(AveragingError, match=message):
    keras_logs.read_csv([_csv(tmp_path, text)], "val_loss")


def test_metric_points_carry_their_kind_by_default():
  assert MetricPoint(3, 0.0, 1.0).kind == STEP


# --- The Keras weighting demo, smaller ------------------------------------------

def test_keras_demo_softmax_by_epoch_loss_beats_uniform_after_a_spike(
    tmp_path):
  demo = load_script("demo_keras_weighting")
  # 12 epochs of 100 steps, the last 3 after a learning-rate spike.
  cfg = demo.demo.Config(train_size=16000, eval_size=500, test_size=2000,
                         hidden=32, steps=1200, save_every=100,
                         spike_from=900)
  data = demo.demo.make_data(cfg)
  run_dir = str(tmp_path / "run")
  saved = demo.train(cfg, run_dir, data)
  assert [int(datasets(path)["optimizer/vars/0"]) for path, _ in saved] == (
      list(range(100, 1300, 100)))
  validation = os.path.join(run_dir, demo.LOGS, "validation")
  logged = tensorboard_scalars(validation, "epoch_loss")
  assert sorted(logged) == list(range(12))  # 0-based epochs
  assert min(logged[e] for e in (9, 10, 11)) > max(
      logged[e] for e in range(4, 9))  # the spike degraded the last 3 files
  uniform = demo.average(run_dir, 8, str(tmp_path / "u" / "a.weights.h5"),
                         "uniform")
  softmax = demo.average(run_dir, 8, str(tmp_path / "s" / "a.weights.h5"),
                         "softmax")
  assert [r.metric for r in softmax.rows] == [logged[e] for e in range(4, 12)]
  uniform_loss, _ = demo.evaluate(cfg, uniform.output_path, data["test"])
  softmax_loss, _ = demo.evaluate(cfg, softmax.output_path, data["test"])
  assert softmax_loss < uniform_loss - 0.02, (softmax_loss, uniform_loss)


def test_greedy_soup_over_keras_files_scores_keras_candidates(keras_runs,
                                                              tmp_path):
  run = keras_runs["float32"]
  # A stand-in for a real evaluation: reads the candidate as Keras would
  # find it (a .weights.h5 file) and scores it; lower is better (val_loss).
  score = tmp_path / "score.py"
  score.write_text(
      "import sys, h5py\n"
      "assert sys.argv[1].endswith('.weights.h5'), sys.argv[1]\n"
      "with h5py.File(sys.argv[1], 'r') as f:\n"
      "  print(float(abs(f['layers/dense/vars/1'][()]).sum()))\n")
  output = str(tmp_path / "soup.weights.h5")
  result = oneshot.run(options.OneShotSettings(
      options.InputOptions(checkpoints=tuple(run.weights)),
      options.OutputOptions(output_path=output),
      weighting=options.WeightingOptions(
          weighting="greedy", metrics_from_events=(run.csv_log,),
          metric="val_loss"),
      evaluation=options.EvalOptions(
          eval_command=f"{sys.executable} {score} {{checkpoint}}")))
  steps = result.record["weighting"]["soup"]
  logged = csv_column(run.csv_log, "val_loss")
  # Own scores are the CSV rows of each file's epoch (e-1, 0-based).
  own = {os.path.basename(s["candidate"]): s["own_score"] for s in steps}
  assert own == {f"w-0{e}.weights.h5": logged[e - 1] for e in range(1, 5)}
  kept = [s["candidate"] for s in steps if s["kept"]]
  assert sorted(kept) == sorted(r.path for r in result.rows)
  assert_same_values(datasets(output), expected_average(
      [r.path for r in result.rows]))
  assert not [name for name in os.listdir(tmp_path) if "candidate" in name]
