"""Every message true, no silent surprises: each CLI line a tired user meets.

Each test runs the command line and checks the exit status and the exact
line (a warning or the `t2t_avg: error:` line).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import (REPO, absl_messages, call_cli, error_line, run_cli,
                      step_valued, write_tf1_events, write_tf1_series)
from t2t_avg.errors import AveragingError
from t2t_avg.metrics import events

STEPS = (100, 200, 300)
LOSSES = {100: 3.0, 200: 2.0, 300: 2.5}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A training directory with three checkpoints, eval events beside it."""
  root = tmp_path_factory.mktemp("messages")
  train = root / "train"
  prefixes = write_tf1_series(str(train), list(STEPS), step_valued({"w": (3,)}))
  write_tf1_events(train / "eval", "loss", LOSSES)
  write_tf1_events(train / "eval", "learning_rate", {s: 0.1 for s in STEPS},
                   suffix=".lr")
  return {"root": root, "train": str(train), "prefixes": prefixes,
          "eval": str(train / "eval")}


def test_metric_read_but_not_used_is_said(run, tmp_path):
  result = call_cli(f"--checkpoints={','.join(run['prefixes'])}",
                    f"--metrics_from_events={run['eval']}",
                    f"--output_path={tmp_path}/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("--metrics_from_events is read and shown, but --weighting=uniform "
          "does not use it; pass --weighting=softmax, rank, top_k or "
          "proportional to weigh by loss") in absl_messages(result.stderr, "W")


def test_continuous_rerun_with_other_settings_is_refused(run, tmp_path):
  out = tmp_path / "avg"
  first = call_cli(f"--model_dir={run['train']}", f"--output_dir={out}",
                   "--n=2")
  assert first.returncode == 0, first.stderr[-2000:]
  before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
  softmax = (f"--model_dir={run['train']}", f"--output_dir={out}", "--n=2",
             "--weighting=softmax", f"--metrics_from_events={run['eval']}")
  line = error_line(call_cli(*softmax))
  assert line == (
      f"t2t_avg: error: --output_dir {out} holds {out}/model.ckpt-200, "
      "averaged with weighting='uniform'; this run asks for "
      "weighting='softmax' (pass --recompute to replace such averages, or "
      "choose another --output_dir)")
  assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before
  again = call_cli(*softmax, "--recompute")
  assert again.returncode == 0, again.stderr[-2000:]
  with open(out / "model.ckpt-300.t2t_avg.json", encoding="utf-8") as f:
    assert json.load(f)["settings"]["weighting"] == "softmax"
  # Now the same settings again: left as they are.
  same = call_cli(*softmax)
  assert same.returncode == 0 and "exists; skipped, not recomputed" in (
      same.stderr)


def test_state_file_naming_a_deleted_checkpoint_says_so(tmp_path):
  prefixes = write_tf1_series(str(tmp_path / "t"), [1, 2],
                              step_valued({"w": (2,)}))
  for name in os.listdir(tmp_path / "t"):
    if name.startswith("model.ckpt-2."):
      os.remove(tmp_path / "t" / name)
  result = run_cli(f"--checkpoints={tmp_path}/t",
                   f"--output_path={tmp_path}/out/avg")
  assert error_line(result) == (
      f"t2t_avg: error: {tmp_path}/t/checkpoint names checkpoint "
      f"{prefixes[1]}, whose files are missing (no {prefixes[1]}.index)")
  assert len(result.stderr.strip().splitlines()) == 1  # No TF noise first.


def test_a_mistyped_checkpoint_names_the_newest_that_exist(tmp_path):
  train = tmp_path / "train"
  steps = list(range(100, 1300, 100))
  write_tf1_series(str(train), steps, step_valued({"w": (2,)}))
  line = error_line(call_cli(f"--checkpoints={train}/model.ckpt-1300",
                             f"--output_path={tmp_path}/out/avg"))
  assert line == (
      f"t2t_avg: error: checkpoint {train}/model.ckpt-1300 does not exist "
      f"(no {train}/model.ckpt-1300.index); {train} holds 12 checkpoints, "
      "the last 10 " + ", ".join(f"model.ckpt-{s}" for s in steps[-10:]))
  line = error_line(call_cli(f"--checkpoints={tmp_path}/tran/model.ckpt-100",
                             f"--output_path={tmp_path}/out/avg"))
  assert line.endswith(f"; directory {tmp_path}/tran does not exist")


def test_prefix_without_slash_suggests_the_directory(run):
  result = call_cli("--prefix=train", "--num_last_checkpoints=2",
                    "--output_path=out/avg", cwd=run["root"])
  assert error_line(result) == (
      "t2t_avg: error: no checkpoint state file ./checkpoint (the directory "
      "of --prefix); did you mean --prefix=train/?")


def test_unknown_metric_is_named_before_its_direction(run, tmp_path):
  args = (f"--checkpoints={','.join(run['prefixes'])}", "--weighting=softmax",
          f"--metrics_from_events={run['eval']}",
          f"--output_path={tmp_path}/avg")
  assert error_line(call_cli(*args, "--metric=los")) == (
      f"t2t_avg: error: Metric tag 'los' not found in {run['eval']}; scalar "
      "tags there: learning_rate, loss")
  assert error_line(call_cli(*args, "--metric=learning_rate")) == (
      "t2t_avg: error: cannot tell whether a lower or a higher "
      "'learning_rate' is better; pass --metric_mode=min|max")


def test_directory_without_events_is_only_that(run, tmp_path):
  result = call_cli(f"--checkpoints={','.join(run['prefixes'])}",
                    "--weighting=softmax", f"--metrics_from_events={run['train']}",
                    f"--output_path={tmp_path}/avg")
  assert error_line(result) == (
      "t2t_avg: error: No TensorBoard event files (*tfevents*) in directory "
      f"{run['train']}; its subdirectory eval/ holds event files: pass it")
  assert not [w for w in absl_messages(result.stderr, "W")
              if "holds checkpoints" in w]


def test_a_t2t_model_dir_as_metric_source_points_to_eval(tmp_path):
  """Training summaries beside the checkpoints, eval ones in eval/."""
  train = tmp_path / "train"
  prefixes = write_tf1_series(str(train), list(STEPS), step_valued({"w": (3,)}))
  write_tf1_events(train, "loss", {s: 1.0 for s in STEPS})  # training loss
  bleu = "metrics-translate_ende/targets/approx_bleu_score"
  write_tf1_events(train / "eval", bleu, {s: s / 1000 for s in STEPS})
  args = (f"--checkpoints={','.join(prefixes)}", "--weighting=softmax",
          f"--metrics_from_events={train}", f"--output_path={tmp_path}/avg")
  result = call_cli(*args, f"--metric={bleu}")
  assert error_line(result) == (
      f"t2t_avg: error: Metric tag {bleu!r} not found in {train}; scalar "
      "tags there: loss; its subdirectory eval/ holds event files: pass it")
  # Training loss is what the user may mean: it stays a warning, which
  # names the directory to pass for the eval metric.
  result = call_cli(*args, "--metric=loss")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (f"{train} holds checkpoints as well as events: that is usually "
          f"training loss, not eval; for the eval metric pass {train}/eval "
          "instead") in absl_messages(result.stderr, "W")


def test_a_keras_tensorboard_root_points_to_validation(tmp_path):
  """Keras' TensorBoard callback writes <log_dir>/train and /validation."""
  import keras  # pylint: disable=import-outside-toplevel
  root = tmp_path / "tb"
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile("sgd", "mse")
  data = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
  model.fit(*data, validation_data=data, epochs=2, verbose=0,
            callbacks=[keras.callbacks.TensorBoard(str(root))])
  with pytest.raises(AveragingError) as error:
    events.read_metric([str(root)], "epoch_loss")
  assert str(error.value) == (
      f"No TensorBoard event files (*tfevents*) in directory {root}; its "
      "subdirectories validation/ and train/ hold event files: pass one of "
      "them")
  assert [p.step for p in events.read_metric([str(root / "validation")],
                                             "epoch_loss")] == [0, 1]


def test_dry_run_prints_the_table_once_on_stdout(run, tmp_path):
  result = call_cli(f"--checkpoints={','.join(run['prefixes'])}", "--dry_run",
                    f"--output_path={tmp_path}/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.count(run["prefixes"][0]) == 1
  assert run["prefixes"][0] not in result.stderr
  assert not os.path.exists(tmp_path / "avg-0.index")


def test_help_says_prepended_and_groups_flags_by_mode():
  result = run_cli("--help")
  text = " ".join(result.stdout.split())
  assert "string-prepended" in text and "appended" not in text
  for flag, mode in (("checkpoints", "[one-shot]"),
                     ("model_dir", "[continuous: --model_dir, t2t-avg-all]"),
                     ("weighting", "[both modes]")):
    assert re.search(rf"--{flag}: (<[^>]*>: )?{re.escape(mode)}", text), flag
  assert "TF_CPP_MIN_LOG_LEVEL" in result.stdout


def test_top_k_without_k_says_it_is_required(run, tmp_path):
  line = error_line(call_cli(f"--checkpoints={','.join(run['prefixes'])}",
                             "--weighting=top_k",
                             f"--metrics_from_events={run['eval']}",
                             f"--output_path={tmp_path}/avg"))
  assert line == ("t2t_avg: error: --weighting=top_k needs --top_k=k, the "
                  "number of best checkpoints to average (k >= 1), not 0")


def test_checkpoints_with_num_last_is_a_warning_and_a_run(run, tmp_path):
  result = call_cli(f"--checkpoints={','.join(run['prefixes'][:2])}",
                    "--num_last_checkpoints=3",
                    f"--output_path={tmp_path}/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("--num_last_checkpoints is ignored because --checkpoints is set"
          in absl_messages(result.stderr, "W"))


def test_state_file_keeps_earlier_outputs_newest_last(run, tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for step in ("100", "200"):
    result = call_cli(f"--checkpoints={','.join(run['prefixes'])}",
                      f"--output_step={step}", f"--output_path={tmp_path}/avg")
    assert result.returncode == 0, result.stderr[-2000:]
  state = tf.train.get_checkpoint_state(str(tmp_path))
  assert list(state.all_model_checkpoint_paths) == [
      f"{tmp_path}/avg-100", f"{tmp_path}/avg-200"]
  assert tf.train.latest_checkpoint(str(tmp_path)) == f"{tmp_path}/avg-200"


def test_record_holds_absolute_paths(run, tmp_path):
  train = os.path.relpath(run["train"], tmp_path)
  result = call_cli(f"--prefix={train}/", "--num_last_checkpoints=2",
                    "--output_path=out/avg", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / "out/avg-0.t2t_avg.json", encoding="utf-8") as f:
    record = json.load(f)
  assert record["output"] == f"{tmp_path}/out/avg-0"
  assert [i["path"] for i in record["inputs"]] == [
      os.path.normpath(p) for p in run["prefixes"][1:]]


def test_no_tensorflow_start_up_noise(run, tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  result = subprocess.run(
      [sys.executable, "-m", "t2t_avg",
       f"--checkpoints={','.join(run['prefixes'])}",
       f"--output_path={tmp_path}/avg"],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  for noise in ("absl::InitializeLog", "oneDNN", "cuda", "rebuild TensorFlow"):
    assert noise not in result.stderr, result.stderr[:2000]
  # A user's own setting wins.
  loud = subprocess.run(
      [sys.executable, "-m", "t2t_avg",
       f"--checkpoints={','.join(run['prefixes'])}",
       f"--output_path={tmp_path}/loud/avg"],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env=dict(env, TF_CPP_MIN_LOG_LEVEL="0", TF_ENABLE_ONEDNN_OPTS="1"),
      check=False)
  assert "oneDNN" in loud.stderr


def test_output_data_is_one_file(run, tmp_path):
  result = call_cli(f"--checkpoints={','.join(run['prefixes'])}",
                    f"--output_path={tmp_path}/avg")
  assert result.returncode == 0
  assert sorted(os.listdir(tmp_path)) == [
      "avg-0.data-00000-of-00001", "avg-0.index", "avg-0.t2t_avg.json",
      "checkpoint"]


_NUMPY_THREADS = """
import os, sys
from t2t_avg.cli import average
if sys.argv[1] == "cli":
  average._import_numpy_without_blas_threads()
import numpy  # (Already imported by then, or the user's choice.)
print(len(os.listdir("/proc/self/task")), os.environ.get("OPENBLAS_NUM_THREADS"))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or
                    (os.cpu_count() or 1) < 2, reason="needs Linux, 2+ cores")
@pytest.mark.parametrize("user_setting", [None, "2"])
def test_numpy_loads_without_blas_threads_unless_the_user_chose(user_setting):
  env = {k: v for k, v in os.environ.items() if k not in (
      "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS")}
  if user_setting:
    env["OPENBLAS_NUM_THREADS"] = user_setting

  def threads_and_setting(how):
    result = subprocess.run([sys.executable, "-c", _NUMPY_THREADS, how],
                            capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120, check=True)
    return result.stdout.split()

  plain_threads, _ = threads_and_setting("plain")
  threads, setting = threads_and_setting("cli")
  if user_setting:  # Left to the user: as a plain import, the variable kept.
    assert (threads, setting) == (plain_threads, user_setting)
  else:  # One thread (OpenBLAS started none), the variable gone again.
    assert int(plain_threads) > 1
    assert (threads, setting) == ("1", "None")
