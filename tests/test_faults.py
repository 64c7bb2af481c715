"""Faults: one line naming the culprit, no output, no changed input; SIGKILL.

Damaged, mismatched or missing inputs and events, contradictory flags and bad
output paths must end with exit status 1 and a single `t2t_avg: error:` line
naming the file, variable, step or flag at fault; the output directory holds
nothing afterwards and the inputs are byte-identical. A run killed with
SIGKILL, at any moment, leaves the old checkpoint, none or the complete new
one under the output name, and the next run cleans up after it.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (REPO, call_cli, error_line, float64_mean,
                      read_checkpoint, tree_fingerprint, write_tf1_series)

STEPS = (10, 20, 30)
_TMP_MARK = ".t2t_avg-tmp"


def _make_vars(step, **changes):
  """Two float32 variables with distinct contents: `w` = step, `b` = -step."""
  values = {"body/w": np.full((2, 3), step, np.float32),
            "body/b": np.full((3,), -step, np.float32)}
  values.update(changes)
  return {k: v for k, v in values.items() if v is not None}


def _with_nan(value):
  def make(step):
    w = np.full((2, 3), step, np.float32)
    w[1, 2] = value
    return _make_vars(step, **{"body/w": w})
  return make


@pytest.fixture(scope="module")
def series(tmp_path_factory):
  """Read-only checkpoints and event files shared by the refusal tests."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("faults")
  variants = {
      "train": _make_vars,
      "shape": lambda s: _make_vars(
          s, **{"body/w": np.full((3, 2), s, np.float32)}),
      "dtype": lambda s: _make_vars(
          s, **{"body/w": np.full((2, 3), s, np.float64)}),
      "missing": lambda s: _make_vars(s, **{"body/b": None}),
      "extra": lambda s: _make_vars(
          s, **{"body/extra": np.zeros((4,), np.float32)}),
      "nan": _with_nan(np.nan),
      "inf": _with_nan(-np.inf),
  }
  paths = {}
  for name, make in variants.items():
    steps = STEPS if name == "train" else (40,)
    paths[name] = write_tf1_series(str(root / name), steps, make)
  paths["sharded"] = write_tf1_series(str(root / "sharded"), STEPS,
                                      _make_vars, shards=2)
  for name, shape in (("tf2_a", (3,)), ("tf2_b", (4,))):
    ckpt = tf.train.Checkpoint(v=tf.Variable(np.ones(shape, np.float32)))
    paths[name] = [ckpt.save(str(root / name / "ckpt"))]

  events = root / "events"
  writer = tf.summary.create_file_writer(str(events / "eval"))
  with writer.as_default():
    for step, loss in ((10, 3.0), (30, 2.0)):  # No eval at step 20.
      tf.summary.scalar("loss", loss, step=step)
      tf.summary.scalar("accuracy", 1 / loss, step=step)
  writer.close()
  (events / "events.out.tfevents.0.empty").write_bytes(b"")
  (events / "events.out.tfevents.0.garbage").write_bytes(
      bytes(range(256)) * 8)
  paths["root"] = root
  paths["events"] = events
  return paths


@pytest.fixture(scope="module")
def cli():
  """Runs `python -m t2t_avg args...` in this process (`call_cli`): what these
  tests check is the error line and the files, not the process. (Whether
  flags are refused before TensorFlow is imported is tested with real
  interpreters, below.)"""
  return call_cli


def _assert_no_output(out_dir):
  """Nothing under the output directory: no checkpoint, record or temp file."""
  if os.path.exists(out_dir):
    assert os.listdir(out_dir) == [], os.listdir(out_dir)


def _refused(cli, tmp_path, guarded, *args, names=()):
  """Runs the CLI expecting a refusal; returns the error line.

  Asserts exit 1, one `t2t_avg: error:` line without traceback that holds
  every one of `names`, an empty output directory, and `guarded` (the
  inputs' directory) byte-identical before and after.
  """
  out = tmp_path / "out"
  before = tree_fingerprint(guarded)
  result = cli(f"--output_path={out}/avg", *args)
  line = error_line(result)
  for name in names:
    assert str(name) in line, (name, line)
  _assert_no_output(out)
  assert tree_fingerprint(guarded) == before
  return line


def _copy_series(src, dst):
  """A copy of a training directory whose state file lists the copies."""
  shutil.copytree(src, dst)
  state = os.path.join(dst, "checkpoint")
  with open(state) as f:
    text = f.read()
  with open(state, "w") as f:
    f.write(text.replace(str(src), str(dst)))
  return [os.path.join(dst, f"model.ckpt-{s}") for s in STEPS]


# --- mismatched inputs -------------------------------------------------------

@pytest.mark.parametrize("variant, words", [
    ("shape", ["body/w", "shape", "[2, 3]", "[3, 2]"]),
    ("dtype", ["body/w", "float32", "float64"]),
    ("missing", ["body/b"]),
    ("extra", ["body/extra"]),
])
def test_mismatched_variables_name_the_variable_and_both_checkpoints(
    cli, series, tmp_path, variant, words):
  first, other = series["train"][0], series[variant][0]
  _refused(cli, tmp_path, series["root"], f"--checkpoints={first},{other}",
           names=[first, other] + words)


def test_tf2_checkpoints_with_different_shapes_are_refused(cli, series,
                                                            tmp_path):
  a, b = series["tf2_a"][0], series["tf2_b"][0]
  _refused(cli, tmp_path, series["root"], f"--checkpoints={a},{b}",
           names=[a, b, "v/.ATTRIBUTES/VARIABLE_VALUE", "[3]", "[4]"])


# --- non-finite values -------------------------------------------------------

@pytest.mark.parametrize("variant", ["nan", "inf"])
def test_nonfinite_tensor_names_variable_and_checkpoint(cli, series, tmp_path,
                                                        variant):
  bad = series[variant][0]
  line = _refused(cli, tmp_path, series["root"],
                  f"--checkpoints={series['train'][0]},{bad}",
                  names=["body/w", bad, "--allow_nonfinite"])
  assert series["train"][0] not in line


def test_allow_nonfinite_averages_nan_anyway(cli, series, tmp_path):
  bad = series["nan"][0]
  result = cli(f"--checkpoints={series['train'][0]},{bad}",
               f"--output_path={tmp_path}/out/avg", "--allow_nonfinite")
  assert result.returncode == 0, result.stderr[-2000:]
  w = read_checkpoint(f"{tmp_path}/out/avg-0")["body/w"]
  assert np.isnan(w[1, 2]) and np.isnan(w).sum() == 1
  assert np.all(w[0] == np.float32(25.0))  # (10 + 40) / 2


def test_nan_in_a_checkpoint_of_weight_zero_is_never_read(cli, series,
                                                          tmp_path):
  bad = series["nan"][0]
  result = cli(f"--checkpoints={series['train'][0]},{bad}",
               f"--output_path={tmp_path}/out/avg", "--weighting=explicit",
               "--weights=1,0")
  assert result.returncode == 0, result.stderr[-2000:]
  out = read_checkpoint(f"{tmp_path}/out/avg-0")
  np.testing.assert_array_equal(out["body/w"], np.full((2, 3), 10, np.float32))


# --- damaged files -----------------------------------------------------------

def _overwrite(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def _truncate_to_half(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _corrupt_index_middle(prefix):
  index = prefix + ".index"
  _overwrite(index, os.path.getsize(index) // 2, b"\xff\x00\xff\x00")


def _truncate_index(prefix):
  _truncate_to_half(prefix + ".index")


def _truncate_data(prefix):
  _truncate_to_half(prefix + ".data-00000-of-00001")


@pytest.mark.parametrize("damage, flags", [
    (_corrupt_index_middle, []),
    (_truncate_index, []),
    (_truncate_data, []),  # Cuts global_step, read for the step.
    (_truncate_data, ["--step_from=name"]),  # Cuts body/w while averaging.
])
def test_damaged_checkpoint_is_named(cli, series, tmp_path, damage, flags):
  prefixes = _copy_series(os.path.dirname(series["train"][0]),
                          tmp_path / "train")
  damage(prefixes[1])
  _refused(cli, tmp_path, tmp_path / "train",
           f"--checkpoints={','.join(prefixes)}", *flags, names=[prefixes[1]])


@pytest.mark.parametrize("value, flags", [
    (7.0, []),  # Still finite: only the crc32c can tell.
    (np.nan, []),  # Must not pass for a NaN in the tensor...
    (np.nan, ["--allow_nonfinite"]),  # ...that could be averaged anyway.
])
def test_flipped_tensor_bytes_fail_the_checksum_naming_variable(
    cli, series, tmp_path, value, flags):
  prefixes = _copy_series(os.path.dirname(series["train"][0]),
                          tmp_path / "train")
  data = prefixes[1] + ".data-00000-of-00001"
  raw = open(data, "rb").read()
  w_bytes = np.full((2, 3), 20, np.float32).tobytes()
  assert raw.count(w_bytes) == 1
  _overwrite(data, raw.index(w_bytes) + 8, np.float32(value).tobytes())
  line = _refused(cli, tmp_path, tmp_path / "train",
                  f"--checkpoints={','.join(prefixes)}", *flags,
                  names=[prefixes[1], "body/w"])
  assert re.search(r"checksum|corrupt", line, re.IGNORECASE), line


def test_missing_data_shard_of_a_sharded_checkpoint_is_named(cli, series,
                                                              tmp_path):
  src = os.path.dirname(series["sharded"][0])
  shutil.copytree(src, tmp_path / "sharded")
  prefixes = [str(tmp_path / "sharded" / os.path.basename(p))
              for p in series["sharded"]]
  shards = sorted(f for f in os.listdir(tmp_path / "sharded")
                  if f.startswith("model.ckpt-20.data-"))
  assert len(shards) >= 2
  os.remove(tmp_path / "sharded" / shards[1])
  _refused(cli, tmp_path, tmp_path / "sharded",
           f"--checkpoints={','.join(prefixes)}",
           names=[prefixes[1], shards[1]])


# --- missing checkpoints -----------------------------------------------------

def test_listed_checkpoint_that_does_not_exist(cli, series, tmp_path):
  missing = os.path.join(os.path.dirname(series["train"][0]), "model.ckpt-15")
  _refused(cli, tmp_path, series["root"],
           f"--checkpoints={series['train'][0]},{missing}", names=[missing])


def test_state_file_entry_that_does_not_exist(cli, series, tmp_path):
  prefixes = _copy_series(os.path.dirname(series["train"][0]),
                          tmp_path / "train")
  for name in os.listdir(tmp_path / "train"):
    if name.startswith("model.ckpt-20."):
      os.remove(tmp_path / "train" / name)
  _refused(cli, tmp_path, tmp_path / "train", f"--prefix={tmp_path}/train/",
           "--num_last_checkpoints=3",
           names=[prefixes[1], os.path.join(tmp_path, "train", "checkpoint")])


def test_num_last_checkpoints_without_state_file(cli, series, tmp_path):
  src = os.path.dirname(series["train"][0])
  shutil.copytree(src, tmp_path / "train")
  os.remove(tmp_path / "train" / "checkpoint")
  _refused(cli, tmp_path, tmp_path / "train", f"--prefix={tmp_path}/train/",
           "--num_last_checkpoints=2",
           names=[os.path.join(tmp_path, "train", "checkpoint")])


def test_directory_without_checkpoints(cli, series, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  _refused(cli, tmp_path, series["root"],
           f"--checkpoints={series['train'][0]},{empty}", names=[empty])


# --- events ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["events.out.tfevents.0.empty",
                                  "events.out.tfevents.0.garbage"])
def test_event_file_without_scalars_is_an_error(cli, series, tmp_path, name):
  path = series["events"] / name
  _refused(cli, tmp_path, series["root"],
           f"--checkpoints={','.join(series['train'])}", "--weighting=softmax",
           f"--metrics_from_events={path}", names=[path, "loss"])


def test_unknown_metric_tag_lists_the_tags_that_exist(cli, series, tmp_path):
  line = _refused(cli, tmp_path, series["root"],
                  f"--checkpoints={','.join(series['train'])}",
                  "--weighting=softmax", "--metric=bleu",
                  f"--metrics_from_events={series['events'] / 'eval'}",
                  names=["'bleu'"])
  assert line.endswith("accuracy, loss")


def test_checkpoint_without_metric_lists_the_steps_that_have_one(cli, series,
                                                                  tmp_path):
  line = _refused(cli, tmp_path, series["root"],
                  f"--checkpoints={','.join(series['train'])}",
                  "--weighting=rank",
                  f"--metrics_from_events={series['events'] / 'eval'}",
                  names=["step 20", series["train"][1], "--missing_metric"])
  assert re.search(r"steps with one: 10, 30\b", line), line


# --- flags: refused before TensorFlow is imported ----------------------------

_FLAG_RUN = """
import sys
from t2t_avg.cli import average
try:
  average.run_main()
finally:
  print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def _flag_refusal(*args):
  result = subprocess.run([sys.executable, "-c", _FLAG_RUN, *args],
                          capture_output=True, text=True, timeout=60,
                          cwd=REPO, check=False)
  line = error_line(result)
  assert result.stdout.strip().splitlines()[-1] == (
      "tensorflow imported: False"), result.stdout
  return line


@pytest.mark.parametrize("args, words", [
    (["--weighting=softmax"], ["--weighting=softmax", "--metrics_from_events"]),
    (["--weights=1,2,3"], ["--weights", "--weighting=explicit"]),
    (["--weighting=explicit"], ["--weighting=explicit", "--weights"]),
    (["--weighting=explicit", "--weights=1,2"], ["--weights", "2", "3"]),
    (["--weighting=explicit", "--weights=1,-1,1"], ["--weights", "1,-1,1"]),
    (["--weighting=explicit", "--weights=0,0,0"], ["--weights", "0,0,0"]),
    (["--weighting=explicit", "--weights=1,nan,1"], ["--weights", "nan"]),
    (["--weighting=explicit", "--weights=1,x,1"], ["--weights", "1,x,1"]),
    (["--top_k=2"], ["--top_k", "--weighting=top_k"]),
    (["--weighting=top_k", "--top_k=0", "--metrics_from_events=ev"],
     ["--top_k"]),
    (["--output_step=banana"], ["--output_step", "banana"]),
    (["--exclude_variables=("], ["--exclude_variables", "'('"]),
    (["--bogus_flag=1"], ["bogus_flag"]),
    (["positional"], ["positional"]),
    (["--model_dir=/tmp/train"], ["--checkpoints", "--model_dir"]),
    (["--weighting=median"], ["--weighting", "median"]),
])
def test_bad_flags_are_refused_before_importing_tensorflow(series, args,
                                                           words):
  listed = ",".join(series["train"])
  line = _flag_refusal(f"--checkpoints={listed}", *args)
  for word in words:
    assert word in line, (word, line)


@pytest.mark.parametrize("args, words", [
    (["--num_last_checkpoints=2"], ["--num_last_checkpoints", "--prefix"]),
    ([], ["--checkpoints", "--num_last_checkpoints"]),
])
def test_missing_input_flags_are_refused_before_importing_tensorflow(
    args, words):
  line = _flag_refusal(*args)
  for word in words:
    assert word in line, (word, line)


# --- output paths ------------------------------------------------------------

def test_output_equal_to_an_input_is_refused(cli, series, tmp_path):
  train = os.path.dirname(series["train"][0])
  line = _refused(cli, tmp_path, series["root"],
                  f"--checkpoints={','.join(series['train'])}",
                  f"--output_path={train}/model.ckpt", "--output_step=20",
                  names=[f"{train}/model.ckpt-20", "--output_path"])
  assert "input" in line


def test_existing_checkpoint_not_written_by_t2t_avg_is_left_alone(cli, series,
                                                                  tmp_path):
  out = tmp_path / "published"
  out.mkdir()
  src = series["train"][2]
  for suffix in (".index", ".data-00000-of-00001"):
    shutil.copy(src + suffix, f"{out}/avg-0{suffix}")
  _refused(cli, tmp_path, out, f"--checkpoints={','.join(series['train'])}",
           f"--output_path={out}/avg", names=[f"{out}/avg-0", "t2t_avg"])
  assert sorted(os.listdir(out)) == ["avg-0.data-00000-of-00001",
                                     "avg-0.index"]


def test_output_equal_to_an_input_through_a_symlink_is_refused(cli, series,
                                                               tmp_path):
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import average_checkpoints
  real = tmp_path / "averages"
  earlier = average_checkpoints(series["train"][:2], f"{real}/avg").output_path
  os.symlink(real, tmp_path / "link")
  _refused(cli, tmp_path, real,
           f"--checkpoints={earlier},{series['train'][2]}",
           f"--output_path={tmp_path}/link/avg",
           names=[f"{tmp_path}/link/avg-0", "input"])


def test_output_directory_that_cannot_be_created(cli, series, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory\n")
  _refused(cli, tmp_path, tmp_path,
           f"--checkpoints={','.join(series['train'])}",
           f"--output_path={blocker}/sub/avg", names=[blocker])
  assert blocker.read_text() == "not a directory\n"


# --- SIGKILL -----------------------------------------------------------------
#
# Two complementary attacks. The harness below forks one child per kill point
# from a process that has imported TensorFlow (so each child costs no import)
# and SIGKILLs the child just before its k-th file-system change (rename,
# remove, rmtree) for k = 1, 2, ... until a run completes: every step of the
# commit is hit exactly. The timed test kills the real command line at
# staggered moments while it streams a large average.

_KILL_HARNESS = r"""
import json, os, shutil, signal, sys, time
import tensorflow as tf
from t2t_avg.engine import averaging

config = json.loads(sys.argv[1])
out_dir = os.path.dirname(config["output_path"])


def arm(kill_at):
  calls = [0]
  def wrap(function):
    def wrapped(*args, **kwargs):
      calls[0] += 1
      if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      return function(*args, **kwargs)
    return wrapped
  for module, names in ((tf.io.gfile, ("rename", "remove", "rmtree")),
                        (os, ("rename", "replace", "remove", "unlink"))):
    for name in names:
      setattr(module, name, wrap(getattr(module, name)))


def run(inputs, kill_at=0):
  pid = os.fork()
  if pid == 0:
    code = 0
    try:
      if kill_at:
        arm(kill_at)
      averaging.average_checkpoints(inputs, config["output_path"])
    except BaseException as e:  # pylint: disable=broad-except
      sys.stderr.write(f"child failed: {e!r}\n")
      code = 3
    sys.stderr.flush()
    os._exit(code)
  deadline = time.monotonic() + 120
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      break
    if time.monotonic() > deadline:
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      return "timeout"
    time.sleep(0.002)
  if os.WIFSIGNALED(status):
    return f"signal {os.WTERMSIG(status)}"
  return f"exit {os.WEXITSTATUS(status)}"


for kill_at in range(1, 40):
  shutil.rmtree(out_dir, ignore_errors=True)
  if config["old_inputs"]:
    assert run(config["old_inputs"]) == "exit 0"
  status = run(config["inputs"], kill_at)
  snapshot = os.path.join(config["snapshots"], str(kill_at))
  os.makedirs(out_dir, exist_ok=True)
  shutil.copytree(out_dir, os.path.join(snapshot, "killed"))
  recovery = None
  if status != "exit 0":
    recovery = run(config["inputs"])
    shutil.copytree(out_dir, os.path.join(snapshot, "recovered"))
  print(json.dumps({"kill_at": kill_at, "status": status,
                    "recovery": recovery}), flush=True)
  if status == "exit 0":
    break
"""


def _float_tensors(values):
  return {k: v for k, v in values.items() if k != "global_step"}


def _mean(prefixes):
  """The uniform average as the contract defines it, from the inputs."""
  inputs = [read_checkpoint(p) for p in prefixes]
  return {name: float64_mean([x[name] for x in inputs], value.dtype)
          for name, value in _float_tensors(inputs[0]).items()}


def _same(values, expected):
  return set(_float_tensors(values)) == set(expected) and all(
      values[k].dtype == v.dtype and values[k].tobytes() == v.tobytes()
      for k, v in expected.items())


def _output_state(out_dir, base, acceptable):
  """Which acceptable average is under `base` in `out_dir`, or None.

  Fails when the index is there but the checkpoint is unreadable or holds
  anything else (a partial or mixed checkpoint).
  """
  prefix = os.path.join(out_dir, base)
  if not os.path.exists(prefix + ".index"):
    return None
  values = read_checkpoint(prefix)
  for label, expected in acceptable.items():
    if _same(values, expected):
      return label
  raise AssertionError(f"{prefix} is readable but holds neither of "
                       f"{sorted(acceptable)}")


def _state_file_targets(out_dir):
  path = os.path.join(out_dir, "checkpoint")
  if not os.path.exists(path):
    return []
  text = open(path).read()
  return [os.path.join(out_dir, p)
          for p in re.findall(r'checkpoint_path: "([^"]+)"', text)]


def _temporaries(out_dir):
  return [n for n in os.listdir(out_dir) if _TMP_MARK in n]


@pytest.mark.parametrize("replacing", [False, True],
                         ids=["new_output", "replacing_earlier_output"])
def test_sigkill_at_every_commit_step_leaves_old_none_or_new(series,
                                                             tmp_path,
                                                             replacing):
  inputs = series["train"]
  old_inputs = inputs[:2] if replacing else []
  config = {"inputs": inputs, "old_inputs": old_inputs,
            "output_path": str(tmp_path / "out" / "avg"),
            "snapshots": str(tmp_path / "snapshots")}
  result = subprocess.run(
      [sys.executable, "-c", _KILL_HARNESS, json.dumps(config)],
      capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  runs = [json.loads(line) for line in result.stdout.splitlines()]
  assert runs[-1]["status"] == "exit 0", runs
  killed = [r for r in runs if r["status"] != "exit 0"]
  # Every change of the commit (data, record, index, state file, clean-up)
  # was a kill point; the old output's removal adds two when replacing.
  assert len(killed) >= (7 if replacing else 5), runs
  sigkill = f"signal {int(signal.SIGKILL)}"
  assert all(r["status"] == sigkill for r in killed), runs

  new = _mean(inputs)
  acceptable = {"new": new}
  if replacing:
    acceptable["old"] = _mean(old_inputs)
  seen = set()
  for r in runs:
    snapshot = tmp_path / "snapshots" / str(r["kill_at"])
    state = _output_state(snapshot / "killed", "avg-0", acceptable)
    seen.add(state)
    targets = _state_file_targets(snapshot / "killed")
    if replacing:
      # The earlier output's state file names the same checkpoint, whose
      # index is removed first: "none" is the documented middle state.
      assert {os.path.basename(t) for t in targets} == {"avg-0"}, r
    else:
      for target in targets:
        assert os.path.exists(target + ".index"), (r, target)
    if r["status"] == "exit 0":
      continue
    assert r["recovery"] == "exit 0", r
    recovered = snapshot / "recovered"
    assert _output_state(recovered, "avg-0", acceptable) == "new", r
    assert _temporaries(recovered) == [], (r, os.listdir(recovered))
    assert set(_state_file_targets(recovered)) == {str(recovered / "avg-0")}
  # The kill points span the whole commit: before, during and after.
  assert seen >= ({None, "new", "old"} if replacing else {None, "new"}), seen


@pytest.fixture(scope="module")
def large_series(tmp_path_factory):
  """Four checkpoints of 32 + 48 MB float32 tensors (SaveV2, as TF1 saves)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp("large")
  rng = np.random.default_rng(5)
  base = {"big/kernel": rng.standard_normal((2000, 4000), np.float32),
          "big/embedding": rng.standard_normal((12_000_000,), np.float32),
          "small/bias": rng.standard_normal((64,), np.float32)}
  prefixes, total = [], None
  for step in (1, 2, 3, 4):
    values = {k: v + np.float32(step) for k, v in base.items()}
    names = sorted(values)
    prefix = str(directory / f"model.ckpt-{step}")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names + ["global_step"],
                      shape_and_slices=[""] * (len(names) + 1),
                      tensors=[values[k] for k in names] + [np.int64(step)])
    prefixes.append(prefix)
    if total is None:
      total = {k: v.astype(np.float64) for k, v in values.items()}
    else:
      for k, v in values.items():
        total[k] += v
  expected = {k: (v / 4).astype(np.float32) for k, v in total.items()}
  return prefixes, expected


def _wait_for(condition, timeout, what):
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.002)


def _start(out, prefixes, *flags):
  """Starts `python -m t2t_avg`; returns it once it writes, or has ended."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "t2t_avg", f"--checkpoints={','.join(prefixes)}",
       f"--output_path={out}/avg", *flags],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _own_temporary(out, proc.pid) or proc.poll() is not None,
            300, "the temporary directory")
  # Whatever a killed run left was removed before this one started writing.
  own = _own_temporary(out, proc.pid)
  assert [n for n in _temporaries(out) if n != own] == []
  return proc


def _own_temporary(out, pid):
  """The temporary directory whose owner file names process `pid`, or None."""
  for name in _temporaries(out) if out.exists() else []:
    try:
      owner = (out / name / "t2t_avg-owner").read_text()
    except OSError:
      continue
    if owner.split()[:1] == [str(pid)]:  # Empty: created, not yet written.
      return name
  return None


def test_sigkill_while_replacing_a_large_average_then_next_run_cleans_up(
    large_series, tmp_path):
  prefixes, expected = large_series
  inputs_before = tree_fingerprint(os.path.dirname(prefixes[0]))
  out = tmp_path / "out"
  # An earlier output under the same name (other weights); its duration
  # places the kills.
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import average_checkpoints
  began = time.monotonic()
  average_checkpoints(prefixes, f"{out}/avg", weights=[1, 1, 1, 2])
  writing = time.monotonic() - began
  old = _float_tensors(read_checkpoint(f"{out}/avg-0"))
  assert not _same(old, expected)

  states, killed_while_writing = [], 0
  for fraction in (0.0, 0.2, 0.5):
    proc = _start(out, prefixes)
    try:
      time.sleep(fraction * writing)
      killed_while_writing += proc.poll() is None
    finally:
      proc.kill()
      proc.communicate()
    states.append(_output_state(out, "avg-0", {"old": old, "new": expected}))
    # The old state file stays; between removing the old index and renaming
    # the new one (state None) it names a missing checkpoint, as documented.
    targets = {os.path.basename(t) for t in _state_file_targets(out)}
    assert targets == {"avg-0"}, targets
  assert killed_while_writing >= 2
  assert states[0] == "old", states  # Killed while streaming: untouched.

  result = call_cli(f"--checkpoints={','.join(prefixes)}",
                    f"--output_path={out}/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert _output_state(out, "avg-0", {"new": expected}) == "new"
  assert _temporaries(out) == [], os.listdir(out)
  assert set(_state_file_targets(out)) == {str(out / "avg-0")}
  assert tree_fingerprint(os.path.dirname(prefixes[0])) == inputs_before
