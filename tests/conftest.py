"""Shared test helpers: real checkpoints from TF's own savers, the legacy T2T oracle, the CLI."""
import hashlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_DIR = os.environ.get("T2T_LEGACY_DIR", os.path.join(REPO, ".legacy"))


def write_tf1_series(directory, steps, make_vars, *, basename="model.ckpt",
                     shards=1):
  """Writes one checkpoint per step with a TF1 `Saver`, as T2T training does.

  Args:
    directory: where the checkpoints and their `checkpoint` state file go.
    steps: the global steps to save at, oldest first.
    make_vars: step -> {variable name: numpy value}; same names, shapes and
      dtypes for every step. A `global_step` (int64) is added.
    basename: the checkpoint basename.
    shards: >1 places variables round-robin on that many CPU devices and
      saves with `Saver(sharded=True)`, giving that many `.data-*` files.

  Returns:
    The checkpoint prefixes, oldest first.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf1 = tf.compat.v1
  os.makedirs(directory, exist_ok=True)
  first = make_vars(steps[0])
  graph = tf.Graph()
  with graph.as_default():
    variables, placeholders, assigns = {}, {}, []
    for i, (name, value) in enumerate(sorted(first.items())):
      with tf.device(f"/cpu:{i % shards}"):
        var = tf1.get_variable(name, shape=value.shape,
                               dtype=tf.as_dtype(value.dtype),
                               initializer=tf1.zeros_initializer())
        ph = tf1.placeholder(var.dtype.base_dtype, shape=value.shape)
      variables[name], placeholders[name] = var, ph
      assigns.append(var.assign(ph))
    global_step = tf1.train.get_or_create_global_step()
    step_ph = tf1.placeholder(tf.int64, shape=())
    assigns.append(global_step.assign(step_ph))
    saver = tf1.train.Saver(max_to_keep=len(steps) + 1, sharded=shards > 1)
    config = tf1.ConfigProto(device_count={"CPU": shards})
    prefixes = []
    with tf1.Session(config=config) as sess:
      sess.run(tf1.global_variables_initializer())
      for step in steps:
        values = make_vars(step)
        feed = {placeholders[n]: values[n] for n in placeholders}
        feed[step_ph] = step
        sess.run(assigns, feed)
        prefixes.append(saver.save(sess, os.path.join(directory, basename),
                                   global_step=step))
  return prefixes


def options_from_flags(**flags):
  """The options dataclasses the CLI would build from flag-named keywords.

  Returns:
    {dataclass: instance}; a dataclass none of whose fields were given is
    built with its defaults (ContinuousOptions only when model_dir is given).
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  from t2t_avg import options  # pylint: disable=import-outside-toplevel
  classes = (options.InputOptions, options.OutputOptions,
             options.AveragingOptions, options.WeightingOptions,
             options.ContinuousOptions)
  tuples = ("checkpoints", "metrics_from_events", "weights")
  built, used = {}, set()
  for cls in classes:
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: tuple(v) if k in tuples and v is not None else v
             for k, v in flags.items() if k in names}
    used |= set(given)
    if cls is not options.ContinuousOptions or "model_dir" in given:
      built[cls] = cls(**given)
  unknown = set(flags) - used
  assert not unknown, f"not a flag: {unknown}"
  return built


def write_tf1_events(directory, tag, values, wall_time=1.7e9, suffix=""):
  """`simple_value`s with a TF1 graph-mode FileWriter, as Estimator/T2T eval."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel
  tf1 = tf.compat.v1
  os.makedirs(directory, exist_ok=True)
  with tf.Graph().as_default():
    # Two writers in one second would share a file name: `suffix` tells.
    writer = tf1.summary.FileWriter(str(directory), filename_suffix=suffix)
    for step, value in sorted(values.items()):
      writer.add_event(event_pb2.Event(
          step=step, wall_time=wall_time + step,
          summary=tf1.Summary(value=[
              tf1.Summary.Value(tag=tag, simple_value=value)])))
    writer.close()
  return str(directory)


def write_tf2_events(directory, tag, values):
  """0-d tensors with TF2 `tf.summary.scalar`, as Keras and TF2 loops."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  writer = tf.summary.create_file_writer(str(directory))
  with writer.as_default():
    for step, value in sorted(values.items()):
      tf.summary.scalar(tag, value, step=step)
  writer.close()
  return str(directory)


def read_checkpoint(prefix):
  """Returns {name: numpy value} of every tensor in a checkpoint."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()}


def load_script(name):
  """A module of scripts/ (not a package), imported from its file."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tree_fingerprint(directory):
  """{relative path: (sha256, mtime_ns)} of every file below a directory."""
  result = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      result[os.path.relpath(path, directory)] = (digest,
                                                  os.stat(path).st_mtime_ns)
  return result


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env


def run_cli(*args, module="t2t_avg", timeout=300):
  """Runs `python -m <module> args...`; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", module, *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=_env(), cwd=REPO, check=False)


_WITHOUT_TF = """
import builtins, sys
import t2t_avg  # (its check that TensorFlow is installed)
sys.modules["tensorflow"] = None  # Any import of TensorFlow fails.
tried = []  # ... and is recorded, even where the failure is caught.
_import = builtins.__import__
def _recording(name, *args, **kwargs):
  if name.split(".")[0] == "tensorflow":
    tried.append(name)
  return _import(name, *args, **kwargs)
builtins.__import__ = _recording
{setup}
sys.argv = ["t2t_avg"] + sys.argv[1:]
from t2t_avg.cli import average
try:
  average.run_main()
finally:
  loaded = [m for m in sys.modules if m.startswith("tensorflow.")]
  if tried or loaded:
    print("tensorflow imported:", tried, loaded)
  else:
    print("tensorflow never imported")
"""


def run_cli_without_tensorflow(*args, setup=""):
  """Runs the CLI where any import of TensorFlow fails (after `setup`, Python
  run first); it prints "tensorflow never imported" if none was tried."""
  return subprocess.run(
      [sys.executable, "-c", _WITHOUT_TF.format(setup=setup), *args],
      capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO,
      check=False)


_LEGACY_MAIN = """
import sys
import tensorflow.compat.v1 as tf
tf.disable_v2_behavior()
from absl import app
from tensor2tensor.{module} import {name}
app.run({name}.main)
"""


def _require_legacy():
  if not os.path.isdir(os.path.join(LEGACY_DIR, "tensor2tensor")):
    message = (f"tensor2tensor==1.15.7 is not installed in {LEGACY_DIR} "
               "(.ci/run installs it)")
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)


def run_legacy(script, *args, timeout=300):
  """Runs the real T2T 1.15.7 script ('avg_checkpoints' or 't2t_avg_all').

  tensor2tensor lives in its own --target directory, put on PYTHONPATH for
  this child only, so its own `t2t-avg-all` console script never shadows ours.
  """
  _require_legacy()
  module = {"avg_checkpoints": "utils", "t2t_avg_all": "bin"}[script]
  code = _LEGACY_MAIN.format(module=module, name=script)
  result = subprocess.run([sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=_env(PYTHONPATH=LEGACY_DIR), check=False)
  if result.returncode:
    raise AssertionError(f"legacy {script} failed:\n{result.stderr[-3000:]}")
  return result


def error_line(result):
  """The last stderr line of a failed run, asserting the error contract."""
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("t2t_avg: error: "), result.stderr[-2000:]
  return last


def step_valued(names_shapes, dtype=np.float32):
  """make_vars for write_tf1_series: every element of every variable = step."""
  def make(step):
    return {name: np.full(shape, step, dtype=dtype)
            for name, shape in names_shapes.items()}
  return make


def mixed_series(directory, steps, *, seed=7, shards=1):
  """TF1 checkpoints of random float32/float16/bfloat16/float64 variables with
  T2T-like names, and an int32 counter `train_stats/problem_0_steps` equal to
  step * 5 + 1; different values at every step."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  cache = {}

  def make(step):
    if step not in cache:
      cache[step] = {
          "transformer/body/encoder/layer_0/self_attention/q/kernel":
              rng.standard_normal((24, 24)).astype(np.float32),
          "transformer/body/encoder/layer_0/ffn/conv1/bias":
              rng.standard_normal((48,)).astype(np.float32),
          "transformer/body/decoder/layer_0/layer_prepostprocess/scale":
              rng.standard_normal((24,)).astype(np.float16),
          "transformer/symbol_modality/shared/weights_0":
              rng.standard_normal((40, 24)).astype(ml_dtypes.bfloat16),
          "transformer/body/scale64": rng.standard_normal((7,)),
          "train_stats/problem_0_steps": np.int32(step * 5 + 1),
      }
    return cache[step]
  return write_tf1_series(directory, steps, make, shards=shards)


@pytest.fixture
def mixed_checkpoints(tmp_path):
  """Four TF1 checkpoints of `mixed_series`, at steps 100 to 400."""
  return mixed_series(str(tmp_path / "train"), [100, 200, 300, 400])
