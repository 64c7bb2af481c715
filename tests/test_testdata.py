"""testdata/: what scripts/make_testdata.py writes, small, and the README's commands work on it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from t2t_avg.metrics import events

from conftest import (REPO, call_cli, load_script, read_checkpoint,
                      tree_fingerprint)

TESTDATA = os.path.join(REPO, "testdata")
TRAIN = os.path.join(TESTDATA, "train")
EVAL = os.path.join(TRAIN, "eval")
STEPS = [1000, 2000, 3000, 4000, 5000]
BLEU = "metrics-translate_ende_wmt32k/targets/approx_bleu_score"
SCALAR_TAGS = ["loss", "metrics-translate_ende_wmt32k/targets/accuracy", BLEU,
               "metrics-translate_ende_wmt32k/targets/neg_log_perplexity"]
TEXT_FILES = ["flags.txt", "flags_t2t.txt", "hparams.json"]


def _files(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


def _event_values(eval_dir):
  """[(step, wall time, tag, value)] of every summary value, in file order.

  The first record (`file_version`) is left out: FileWriter stamps it with
  the clock.
  """
  [name] = [n for n in os.listdir(eval_dir) if "tfevents" in n]
  found = []
  for record in tf.data.TFRecordDataset(os.path.join(eval_dir, name)):
    event = event_pb2.Event.FromString(record.numpy())
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        found.append((event.step, event.wall_time, value.tag,
                      value.simple_value))
      else:
        found.append((event.step, event.wall_time, value.tag,
                      tf.make_ndarray(value.tensor).item()))
  return name, found


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
  make_testdata = load_script("make_testdata")
  return make_testdata.write_testdata(str(tmp_path_factory.mktemp("td")))


def test_committed_checkpoints_equal_what_make_testdata_writes(regenerated):
  assert _files(TRAIN) == _files(regenerated)
  for step in STEPS:
    committed = read_checkpoint(os.path.join(TRAIN, f"model.ckpt-{step}"))
    fresh = read_checkpoint(os.path.join(regenerated, f"model.ckpt-{step}"))
    assert sorted(committed) == sorted(fresh)
    for name, value in committed.items():
      assert value.dtype == fresh[name].dtype, (step, name)
      assert value.shape == fresh[name].shape, (step, name)
      assert value.tobytes() == fresh[name].tobytes(), (step, name)
  for name in TEXT_FILES:
    with open(os.path.join(TRAIN, name), encoding="utf-8") as f:
      committed_text = f.read()
    with open(os.path.join(regenerated, name), encoding="utf-8") as f:
      assert f.read() == committed_text, name


def test_committed_events_equal_what_make_testdata_writes(regenerated):
  committed_name, committed = _event_values(EVAL)
  fresh_name, fresh = _event_values(os.path.join(regenerated, "eval"))

  assert committed_name == fresh_name
  assert committed == fresh
  for tag in SCALAR_TAGS:
    points = events.read_metric([EVAL], tag)
    assert points == events.read_metric([os.path.join(regenerated, "eval")],
                                        tag)
    assert [p.step for p in points] == STEPS
  paths = [value for _, _, tag, value in committed if tag == "checkpoint_path"]
  assert [p.decode().rsplit("-", 1)[1] for p in paths] == [str(s)
                                                           for s in STEPS]


def test_testdata_is_small_and_relocatable():
  files = _files(TESTDATA)
  size = sum(os.path.getsize(os.path.join(TESTDATA, f)) for f in files)
  assert len(files) <= 20, files
  assert size < 200 * 1024, size
  assert not [f for f in files if f.endswith(".meta")]
  state = tf.train.get_checkpoint_state(TRAIN)
  with open(os.path.join(TRAIN, "checkpoint"), encoding="utf-8") as f:
    text = f.read()
  assert TESTDATA not in text and "/" not in text, text
  assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
      f"model.ckpt-{s}" for s in STEPS]


def test_last_checkpoint_is_degraded_in_every_metric():
  def values(tag):
    return {p.step: p.value for p in events.read_metric([EVAL], tag)}
  loss, bleu = values("loss"), values(BLEU)
  assert loss[5000] > max(loss[s] for s in (2000, 3000, 4000))
  assert bleu[5000] < min(bleu[s] for s in (2000, 3000, 4000))
  reader = tf.train.load_checkpoint(os.path.join(TRAIN, "model.ckpt-5000"))
  assert reader.get_tensor("global_step") == 5000
  assert reader.get_tensor("train_stats/problem_0_steps") == 5000


# --- The README's commands ---------------------------------------------------

UNIFORM = ["--prefix={train}/", "--num_last_checkpoints=4",
           "--output_path={out}/averaged.ckpt"]
WEIGHTED = UNIFORM + ["--weighting=softmax", "--metrics_from_events={eval}",
                      f"--metric={BLEU}"]


def _readme_command(args, where, tmp_path):
  """Runs a README command from the repo (relative paths) or elsewhere (absolute)."""
  out = tmp_path / "t2t_avg_demo"
  if where == "repo":
    paths = dict(train="testdata/train", eval="testdata/train/eval", out=out)
    result = call_cli(*[a.format(**paths) for a in args])
  else:
    paths = dict(train=TRAIN, eval=EVAL, out=out)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "t2t_avg", *[a.format(**paths) for a in args]],
        capture_output=True, text=True, timeout=300, cwd=cwd, check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "averaged.ckpt-0.t2t_avg.json", encoding="utf-8") as f:
    return str(out / "averaged.ckpt-0"), json.load(f)


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_readme_uniform_command_averages_the_last_four(where, tmp_path):
  before = tree_fingerprint(TESTDATA)
  output, record = _readme_command(UNIFORM, where, tmp_path)

  assert tree_fingerprint(TESTDATA) == before
  assert [r["step"] for r in record["inputs"]] == [2000, 3000, 4000, 5000]
  assert record["effective_count"] == pytest.approx(4.0)
  got = read_checkpoint(output)
  inputs = [read_checkpoint(os.path.join(TRAIN, f"model.ckpt-{s}"))
            for s in (2000, 3000, 4000, 5000)]
  name = "transformer/body/encoder/layer_0/ffn/conv1/kernel"
  total = np.zeros_like(inputs[0][name], np.float64)
  for values in inputs:
    total += values[name]
  assert got[name].tobytes() == (total / 4).astype(np.float32).tobytes()
  assert got["global_step"] == 0


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_readme_weighted_command_gives_the_degraded_checkpoint_least_weight(
    where, tmp_path):
  before = tree_fingerprint(TESTDATA)
  _, record = _readme_command(WEIGHTED, where, tmp_path)

  assert tree_fingerprint(TESTDATA) == before
  weights = {r["step"]: r["weight"] for r in record["inputs"]}
  assert sorted(weights) == [2000, 3000, 4000, 5000]
  assert weights[5000] < min(weights[s] for s in (2000, 3000, 4000))
  assert weights[4000] == max(weights.values())  # the best BLEU
  assert sum(weights.values()) == pytest.approx(1.0)
  assert record["metric"]["tag"] == BLEU
