"""Shared test helpers: real checkpoints from TF's own savers, the legacy T2T oracle, the CLI."""
import contextlib
import gc
import glob
import hashlib
import importlib.util
import json
import logging as std_logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

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


def read_record(output_prefix):
  """The `.t2t_avg.json` record written beside an output."""
  with open(output_prefix + ".t2t_avg.json", encoding="utf-8") as f:
    return json.load(f)


def assert_same_values(found, expected):
  """The same names, and each the same dtype and bytes."""
  assert sorted(found) == sorted(expected)
  for name, value in expected.items():
    got = np.asarray(found[name])
    assert got.dtype == np.asarray(value).dtype, name
    assert got.tobytes() == np.asarray(value).tobytes(), name


def float64_mean(values, dtype, weights=None):
  """The contract's average of same-shaped values: the float64 sum in input
  order (each times its weight, or the sum / n), cast once to `dtype`.
  Complex values are summed in complex128."""
  wide = np.complex128 if np.dtype(dtype).kind == "c" else np.float64
  total = np.zeros(np.shape(values[0]), wide)
  for i, value in enumerate(values):
    wide_value = np.asarray(value).astype(wide)
    total += wide_value if weights is None else wide_value * weights[i]
  if weights is None:
    total /= len(values)
  return total.astype(dtype)


def one_shot(**flags):
  """`oneshot.run` from flag-named keywords with the CLI's defaults, as
  `python -m t2t_avg` calls it."""
  # pylint: disable=import-outside-toplevel
  from t2t_avg import options
  from t2t_avg.jobs import oneshot
  built = options_from_flags(**flags)
  return oneshot.run(options.OneShotSettings(
      built[options.InputOptions], built[options.OutputOptions],
      built[options.AveragingOptions], built[options.WeightingOptions]))


def average_all(model_dir, output_dir="avg/", *, clock=None, sleep=None,
                **flags):
  """`continuous.average_all` with flag-named keyword arguments, as the CLI builds.

  Each keyword goes to the options dataclass that has a field of its name.
  """
  # pylint: disable=import-outside-toplevel
  import dataclasses
  from t2t_avg import options
  from t2t_avg.jobs import continuous
  groups = {}
  for cls in (options.ContinuousOptions, options.WeightingOptions,
              options.AveragingOptions):
    names = {f.name for f in dataclasses.fields(cls)}
    groups[cls] = {k: v for k, v in flags.items() if k in names}
  unknown = set(flags) - {k for g in groups.values() for k in g}
  assert not unknown, unknown
  for key in ("metrics_from_events", "weights"):
    if key in groups[options.WeightingOptions]:
      groups[options.WeightingOptions][key] = tuple(
          groups[options.WeightingOptions][key])
  timing = {k: v for k, v in (("clock", clock), ("sleep", sleep)) if v}
  return continuous.average_all(
      options.ContinuousOptions(model_dir, output_dir,
                                **groups[options.ContinuousOptions]),
      weighting_options=options.WeightingOptions(
          **groups[options.WeightingOptions]),
      averaging_options=options.AveragingOptions(
          **groups[options.AveragingOptions]), **timing)


def wait_for_first_save(trainer, pattern, timeout=120):
  """Waits until a file matching the glob `pattern` exists; fails if the
  trainer process exits first or saves nothing in `timeout` seconds."""
  deadline = time.time() + timeout
  while not glob.glob(pattern):
    assert trainer.poll() is None, trainer.stderr.read()[-2000:]
    assert time.time() < deadline, "the trainer saved nothing"
    time.sleep(0.05)


def logged(caplog, level=std_logging.WARNING):
  """The messages of the records caplog caught at `level` or above."""
  return [r.getMessage() for r in caplog.records if r.levelno >= level]


def absl_messages(stderr, levels="IWEF"):
  """The messages of absl's log lines (`I1130 01:02:03.4 1 file.py:9] ...`)
  of those levels in a run's stderr."""
  return [line.split("] ", 1)[1] for line in stderr.splitlines()
          if re.match(rf"[{levels}]\d{{4}} ", line) and "] " in line]


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env


def run_cli(*args, module="t2t_avg", timeout=300):
  """Runs `python -m <module> args...`; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", module, *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=_env(), cwd=REPO, check=False)


@contextlib.contextmanager
def _fds_to_files(directory):
  """fd 1 and 2 (and sys.stdout, sys.stderr, absl's log handler) go to two
  files for the duration, as a child process's would; yields their paths."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  handler = absl_logging.get_absl_handler()
  root = std_logging.getLogger()
  saved = (sys.stdout, sys.stderr, handler.python_handler.stream,
           root.handlers[:])
  paths = [os.path.join(directory, name) for name in ("stdout", "stderr")]
  sys.stdout.flush()
  sys.stderr.flush()
  kept = [os.dup(1), os.dup(2)]
  streams = []
  try:
    for fd, path in zip((1, 2), paths):
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(target, fd)
      os.close(target)
      streams.append(open(os.dup(fd), "w", encoding="utf-8",
                          buffering=1, closefd=True))
    sys.stdout, sys.stderr = streams
    handler.python_handler.stream = sys.stderr
    if handler not in root.handlers:
      root.addHandler(handler)  # As absl's app.run does.
    yield paths
  finally:
    for stream in streams:
      stream.flush()
    sys.stdout, sys.stderr, handler.python_handler.stream, handlers = saved
    root.handlers[:] = handlers
    for fd, old in zip((1, 2), kept):
      os.dup2(old, fd)
      os.close(old)
    for stream in streams:
      stream.close()


def _absl_main(module):
  """(flags parser, main) of a command line module, as its `app.run` uses."""
  # pylint: disable=import-outside-toplevel,protected-access
  if module == "t2t_avg":
    from t2t_avg.cli import average
    return average._parse_flags, average.main
  assert module == "t2t_avg.compare", module
  from t2t_avg.cli import compare
  return compare._parse_flags, compare.main


def _exit_status(parse, main, argv):
  """What `app.run(main, flags_parser=parse)` exits with, as a number."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    args = parse(argv)
    if flags.FLAGS["verbosity"].using_default_value:
      flags.FLAGS.verbosity = 0  # app.run's default: INFO lines are shown.
    status = main(args)
  except SystemExit as e:
    status = e.code
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()  # As the interpreter would, exit status 1.
    return 1
  if status is None or isinstance(status, int):
    return status or 0
  sys.stderr.write(f"{status}\n")
  return 1


def call_cli(*args, module="t2t_avg", cwd=REPO):
  """`python -m <module> args...` in this process, as `run_cli` runs it in a
  child: the exit status, stdout and stderr (absl's log lines included) of
  one call, with absl's flags, logging, the cycle collector and the working
  directory as they were before. For what a test checks of a command's
  output; process behaviour (TensorFlow's start-up, signals, imports,
  `--help`) is `run_cli`'s.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  parse, main = _absl_main(module)
  own_flags = set(flags.FLAGS)
  argv = [module, *(str(a) for a in args)]
  collecting, here = gc.isenabled(), os.getcwd()
  levels = (std_logging.getLogger().level,
            absl_logging.get_absl_logger().level)
  flags.FLAGS.unparse_flags()
  with tempfile.TemporaryDirectory() as directory:
    try:
      os.chdir(cwd)
      with _fds_to_files(directory) as (out, err):
        status = _exit_status(parse, main, argv)
    finally:
      os.chdir(here)
      flags.FLAGS.unparse_flags()
      for name in set(flags.FLAGS) - own_flags:
        delattr(flags.FLAGS, name)  # The compare tool's, added per run.
      std_logging.getLogger().setLevel(levels[0])  # (--verbosity sets them)
      absl_logging.get_absl_logger().setLevel(levels[1])
      gc.unfreeze()  # The CLI freezes and stops the collector for its run.
      if collecting:
        gc.enable()
    with open(out, encoding="utf-8") as f_out, open(err,
                                                   encoding="utf-8") as f_err:
      return subprocess.CompletedProcess(argv, status, f_out.read(),
                                         f_err.read())


_WITHOUT_TF = """
import builtins, sys
import t2t_avg
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
