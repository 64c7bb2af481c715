"""Benchmarks t2t_avg against T2T 1.15.7's avg_checkpoints: time, peak RSS.

Usage (from the repository root, in its virtualenv):

  python scripts/bench.py                # sizes default,large; 3 runs each
  python scripts/bench.py --sizes=default --runs=1 --tools=legacy
  python scripts/bench.py --size=tiny --runs=1   # seconds: try the harness

For each model size it generates (once; cached under `.bench/`) a T2T-shaped
series of checkpoints with TF's own `tf.compat.v1.train.Saver`, then runs the
legacy script and `python -m t2t_avg` alternately, each in its own child
process. Every child's wall time and peak RSS come from the OS through
`os.wait4` on that child alone (`RUSAGE_CHILDREN` would keep the largest peak
of all children so far). Floors measured in the same session: a bare
`import tensorflow` and reading every input byte once. The outputs of the two
tools are compared bit for bit once per size; the numbers mean nothing if they
differ.

On Linux a child's `ru_maxrss` can never be below the peak RSS of the process
that spawned it (exec keeps the high-water mark of the memory it replaces, and
Python spawns with vfork), so this parent imports neither numpy nor TensorFlow:
generating and comparing checkpoints run in children too.
"""
import dataclasses
import glob
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional
from collections.abc import Sequence

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")

# Bump when the generated series changes, so stale caches are regenerated.
SERIES_FORMAT = 2
FIRST_STEP = 1000
STEP_INTERVAL = 1000
READ_CHUNK = 1 << 20
GENERATE_CHUNK_ELEMENTS = 4 << 20
GENERATE_RSS_BUDGET_MIB = 2048
STDERR_TAIL_LINES = 40

# The acceptance targets of the issue.
WALL_TARGET = 0.5
EXCESS_RSS_TARGET = 0.3

TOOLS = ("legacy", "t2t_avg")
FLOORS = ("import_tf", "read_inputs")
ROW_LABELS = {
    "legacy": "legacy avg_checkpoints (T2T 1.15.7)",
    "t2t_avg": "t2t_avg",
    "import_tf": "floor: `import tensorflow`",
    "read_inputs": "floor: read inputs once (1 MiB reads)",
}

LEGACY_MAIN = ("import tensorflow.compat.v1 as tf; tf.disable_v2_behavior(); "
               "from absl import app; "
               "from tensor2tensor.utils import avg_checkpoints; "
               "app.run(avg_checkpoints.main)")
IMPORT_TF_MAIN = "import tensorflow"
READ_INPUTS_MAIN = f"""
import sys
view = memoryview(bytearray({READ_CHUNK}))
total = 0
for path in sys.argv[1:]:
  with open(path, "rb", buffering=0) as f:
    while True:
      n = f.readinto(view)
      if not n:
        break
      total += n
print(total)
"""
# Runs `bench.<function>(**json_kwargs)`; argv: scripts dir, function, kwargs.
WORKER_MAIN = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
               "import bench; "
               "getattr(bench, sys.argv[2])(**json.loads(sys.argv[3]))")

_SIZES = flags.DEFINE_list(
    "sizes", ["default", "large"],
    "Model presets to benchmark, in order (smaller first shows how memory "
    "grows with model size). Presets: default (~108M params), large "
    "(~2.2x), tiny (for trying the harness).")
_SIZE = flags.DEFINE_string(
    "size", None, "One preset to benchmark; shorthand for --sizes=<size>.")
_RUNS = flags.DEFINE_integer("runs", 3, "Runs per tool (and floor) per size.",
                             lower_bound=1)
_CHECKPOINTS = flags.DEFINE_integer(
    "checkpoints", 8, "Checkpoints in each series.", lower_bound=1)
_TOOLS = flags.DEFINE_list(
    "tools", list(TOOLS), "Tools to run: legacy, t2t_avg, or both.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", os.path.join(REPO, ".bench"),
    "Where generated series (and run outputs, removed after each run) live.")
_KEEP_CACHE = flags.DEFINE_boolean(
    "keep_cache", True,
    "Keep generated series for the next run (--nokeep_cache deletes each "
    "series once its size is done).")
_PYTHON = flags.DEFINE_string(
    "python", sys.executable,
    "Interpreter for every child (it needs TensorFlow, numpy and t2t_avg).")
_LEGACY_PATH = flags.DEFINE_string(
    "legacy_path", os.path.join(REPO, ".legacy"),
    "`pip --target` directory holding tensor2tensor==1.15.7 (and six); put on "
    "PYTHONPATH for the legacy children only.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated values.")


@dataclasses.dataclass(frozen=True)
class Preset:
  """Dimensions of a T2T transformer whose variables make a series."""
  name: str
  vocab_size: int
  hidden_size: int
  filter_size: int
  encoder_layers: int
  decoder_layers: int


PRESETS = {
    preset.name: preset for preset in (
        # 2 encoder + 3 decoder layers at hidden 1024 with a 32k vocabulary:
        # 108.3M float32 parameters, 433 MB per checkpoint.
        Preset("default", 32000, 1024, 4096, 2, 3),
        # transformer_big's 6 + 6 layers with a 64k vocabulary: 241.8M
        # parameters (2.2x), and a largest tensor twice as big (262 MB).
        Preset("large", 64000, 1024, 4096, 6, 6),
        # Seconds per run, for trying the harness; its ratios mean nothing
        # (importing TensorFlow dominates).
        Preset("tiny", 1000, 64, 256, 1, 1),
    )
}


@dataclasses.dataclass(frozen=True)
class VariableInfo:
  """One model variable: its T2T name, shape and initial value range."""
  name: str
  shape: tuple[int, ...]
  center: float
  limit: float  # values are uniform in center +- limit

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def model_variables(preset: Preset) -> list[VariableInfo]:
  """The float32 variables of a T2T transformer, named as T2T names them.

  Args:
    preset: the model dimensions.

  Returns:
    The variables, `global_step` not included.
  """
  hidden, filt = preset.hidden_size, preset.filter_size
  kernel_limit = math.sqrt(3.0 / hidden)  # T2T's uniform_unit_scaling
  variables = [
      VariableInfo(
          f"transformer/symbol_modality_{preset.vocab_size}_{hidden}/shared/"
          "weights_0", (preset.vocab_size, hidden), 0.0,
          math.sqrt(3.0) * hidden**-0.5)
  ]

  def layer_norm(scope: str) -> None:
    base = f"{scope}/layer_prepostprocess/layer_norm/layer_norm_"
    variables.append(VariableInfo(base + "scale", (hidden,), 1.0, 0.05))
    variables.append(VariableInfo(base + "bias", (hidden,), 0.0, 0.05))

  def attention(scope: str) -> None:
    for part in ("q", "k", "v", "output_transform"):
      variables.append(
          VariableInfo(f"{scope}/multihead_attention/{part}/kernel",
                       (hidden, hidden), 0.0, kernel_limit))
    layer_norm(scope)

  def ffn(scope: str) -> None:
    variables.extend([
        VariableInfo(f"{scope}/conv1/kernel", (hidden, filt), 0.0,
                     kernel_limit),
        VariableInfo(f"{scope}/conv1/bias", (filt,), 0.0, 0.01),
        VariableInfo(f"{scope}/conv2/kernel", (filt, hidden), 0.0,
                     math.sqrt(3.0 / filt)),
        VariableInfo(f"{scope}/conv2/bias", (hidden,), 0.0, 0.01),
    ])
    layer_norm(scope)

  for stack, layers in (("encoder", preset.encoder_layers),
                        ("decoder", preset.decoder_layers)):
    body = f"transformer/body/{stack}"
    for i in range(layers):
      attention(f"{body}/layer_{i}/self_attention")
      if stack == "decoder":
        attention(f"{body}/layer_{i}/encdec_attention")
      ffn(f"{body}/layer_{i}/ffn")
    layer_norm(body)
  return variables


# ----------------------------------------------------------------------------
# Workers: run in child processes (`_run_worker`), so this parent stays small.


def generate_series(*, directory: str, preset: str, checkpoints: int,
                    seed: int) -> None:
  """Saves a series with a TF1 `Saver` in graph mode, one checkpoint at a time.

  Each variable has one random base (the same in every checkpoint) plus a small
  perturbation that differs per step. Values are made and assigned in slices
  of whole rows (at most GENERATE_CHUNK_ELEMENTS), so memory holds the TF
  variables (one model) plus one slice.

  Args:
    directory: receives `model.ckpt-<step>` files and the `checkpoint` state.
    preset: a key of PRESETS.
    checkpoints: how many checkpoints to save.
    seed: seed of the values.
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  tf1 = tf.compat.v1
  tf1.disable_v2_behavior()

  variables = model_variables(PRESETS[preset])
  os.makedirs(directory, exist_ok=True)
  graph = tf.Graph()
  with graph.as_default():
    # Per variable: (placeholder, assign op) for each slice of rows.
    slices, sliced_variables = [], []
    for info in variables:
      var = tf1.get_variable(info.name, shape=info.shape, dtype=tf.float32,
                             initializer=tf1.zeros_initializer())
      rows = max(1, GENERATE_CHUNK_ELEMENTS // (info.size // info.shape[0]))
      ops = []
      for begin in range(0, info.shape[0], rows):
        end = min(begin + rows, info.shape[0])
        placeholder = tf1.placeholder(tf.float32,
                                      shape=(end - begin,) + info.shape[1:])
        # `.op`: fetching an assignment's output would copy the variable.
        if end - begin == info.shape[0]:
          ops.append((placeholder, tf1.assign(var, placeholder).op))
        else:
          ops.append((placeholder, var[begin:end].assign(placeholder).op))
      if len(ops) > 1:
        sliced_variables.append(var)
      slices.append(ops)
    global_step = tf1.train.get_or_create_global_step()
    step_placeholder = tf1.placeholder(tf.int64, shape=())
    assign_step = tf1.assign(global_step, step_placeholder).op
    # Only slice assignment needs an initialized variable; initializing the
    # others would hold each one twice for a moment.
    init = tf1.variables_initializer(sliced_variables)
    saver = tf1.train.Saver(max_to_keep=checkpoints, sharded=False)
    graph.finalize()
    config = tf1.ConfigProto()
    # Grappler would fold the zeros initializers into graph constants as big
    # as the variables and keep them.
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    with tf1.Session(graph=graph, config=config) as sess:
      sess.run(init)
      for index in range(checkpoints):
        step = FIRST_STEP + index * STEP_INTERVAL
        for number, (info, ops) in enumerate(zip(variables, slices)):
          base_rng = np.random.default_rng([seed, number])
          noise_rng = np.random.default_rng([seed, number, step])
          for placeholder, assign in ops:
            # A fresh array per assignment: TF may keep the fed buffer.
            value = np.empty(placeholder.shape.as_list(), np.float32)
            noise = np.empty(value.shape, np.float32)
            base_rng.random(out=value, dtype=np.float32)
            noise_rng.random(out=noise, dtype=np.float32)
            noise -= 0.5
            noise *= 1e-3
            value -= 0.5
            value += noise
            value *= 2.0 * info.limit
            value += info.center
            sess.run(assign, {placeholder: value})
            del value, noise
        sess.run(assign_step, {step_placeholder: step})
        saver.save(sess, os.path.join(directory, "model.ckpt"),
                   global_step=step, write_meta_graph=False)


def compare_outputs(*, legacy: str, candidate: str) -> None:
  """Prints (JSON) whether two checkpoints hold bit-identical float tensors.

  Reads one variable at a time from each; `global_step` is skipped.

  Args:
    legacy: prefix of the legacy output.
    candidate: prefix of the t2t_avg output.
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  legacy_reader = tf.train.load_checkpoint(legacy)
  candidate_reader = tf.train.load_checkpoint(candidate)
  legacy_keys = set(legacy_reader.get_variable_to_shape_map())
  candidate_keys = set(candidate_reader.get_variable_to_shape_map())
  report = {
      "compared": 0, "identical": 0, "differences": [], "skipped": [],
      "only_in_legacy": sorted(legacy_keys - candidate_keys - {"global_step"}),
      "only_in_t2t_avg": sorted(candidate_keys - legacy_keys -
                                {"global_step"}),
  }
  for name in sorted(legacy_keys & candidate_keys):
    if name == "global_step":
      continue
    a = legacy_reader.get_tensor(name)
    b = candidate_reader.get_tensor(name)
    if not np.issubdtype(a.dtype, np.floating):
      report["skipped"].append(name)
      continue
    report["compared"] += 1
    same = (a.dtype == b.dtype and a.shape == b.shape and
            np.array_equal(a.reshape(-1).view(np.uint8),
                           b.reshape(-1).view(np.uint8)))
    if same:
      report["identical"] += 1
      continue
    difference = {"name": name, "legacy": f"{a.dtype}{list(a.shape)}",
                  "t2t_avg": f"{b.dtype}{list(b.shape)}"}
    if a.shape == b.shape:
      a64, b64 = a.astype(np.float64), b.astype(np.float64)
      difference["elements_differing"] = int(np.count_nonzero(a64 != b64))
      difference["max_abs_difference"] = float(np.max(np.abs(a64 - b64)))
    report["differences"].append(difference)
  print(json.dumps(report))


# ----------------------------------------------------------------------------
# Children, measured one at a time.


@dataclasses.dataclass(frozen=True)
class ChildRun:
  """What the OS says about one finished child process."""
  wall_s: float
  cpu_s: float  # user + system
  peak_rss_mib: float
  exit_code: int
  stdout: str
  stderr: str


class ChildFailed(Exception):
  """A measured child exited non-zero."""


def _child_env(*, legacy: bool) -> dict[str, str]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  legacy_path = os.path.abspath(_LEGACY_PATH.value)
  paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
           if p and os.path.abspath(p) != legacy_path]
  if legacy:
    paths.insert(0, legacy_path)
  if paths:
    env["PYTHONPATH"] = os.pathsep.join(paths)
  else:
    env.pop("PYTHONPATH", None)
  return env


def run_child(argv: Sequence[str], *, legacy: bool = False,
              what: str) -> ChildRun:
  """Runs one child to completion; wall time and peak RSS of it alone.

  Args:
    argv: the command.
    legacy: put the legacy T2T directory on the child's PYTHONPATH.
    what: names the child in an error.

  Returns:
    The measurements and the child's output.

  Raises:
    ChildFailed: the child exited non-zero (the message holds its stderr tail).
  """
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=out, stderr=err,
                            env=_child_env(legacy=legacy), cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    result = ChildRun(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                      peak_rss_mib=usage.ru_maxrss / 1024.0,
                      exit_code=proc.returncode,
                      stdout=out.read().decode("utf-8", "replace"),
                      stderr=err.read().decode("utf-8", "replace"))
  if result.exit_code != 0:
    tail = "\n".join(result.stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:])
    raise ChildFailed(
        f"FAILED: {what} exited with status {result.exit_code} after "
        f"{result.wall_s:.1f} s.\nCommand: {_shorten(argv)}\n"
        f"--- last {STDERR_TAIL_LINES} lines of its stderr ---\n{tail}")
  return result


def _shorten(argv: Sequence[str], limit: int = 400) -> str:
  text = " ".join(argv)
  return text if len(text) <= limit else text[:limit] + " ..."


def _run_worker(function: str, what: str, **kwargs) -> ChildRun:
  return run_child(
      [_PYTHON.value, "-c", WORKER_MAIN, SCRIPTS, function, json.dumps(kwargs)],
      what=what)


# ----------------------------------------------------------------------------
# Series on disk.


@dataclasses.dataclass(frozen=True)
class Series:
  """A generated series: checkpoint prefixes (oldest first) and their files."""
  preset: Preset
  prefixes: list[str]
  files: list[str]

  @property
  def total_bytes(self) -> int:
    return sum(os.path.getsize(f) for f in self.files)


def _checkpoint_files(prefix: str) -> list[str]:
  return sorted(glob.glob(glob.escape(prefix) + ".data-*")) + [
      prefix + ".index"]


def _manifest(preset: Preset, checkpoints: int, seed: int) -> dict:
  return {"format": SERIES_FORMAT, "preset": dataclasses.asdict(preset),
          "checkpoints": checkpoints, "seed": seed}


def _load_cached(directory: str, manifest: dict) -> Optional[Series]:
  path = os.path.join(directory, "series.json")
  try:
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return None
  if cached.get("manifest") != manifest:
    return None
  for name, size in cached["files"].items():
    file_path = os.path.join(directory, name)
    if not os.path.isfile(file_path) or os.path.getsize(file_path) != size:
      return None
  prefixes = [os.path.join(directory, p) for p in cached["prefixes"]]
  return Series(PRESETS[manifest["preset"]["name"]], prefixes,
                [os.path.join(directory, f) for f in cached["files"]])


def _relativize_state_file(directory: str, partial: str) -> None:
  # The Saver wrote absolute paths into the temporary directory; relative
  # paths resolve against the state file's directory wherever the cache is.
  path = os.path.join(directory, "checkpoint")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(f'"{partial}{os.sep}', '"'))


def ensure_series(preset: Preset, checkpoints: int, seed: int) -> Series:
  """The cached series for these settings, generated first if needed.

  Generation writes into a temporary directory that is renamed when complete,
  so an interrupted generation is never taken for a series.
  """
  directory = os.path.join(_CACHE_DIR.value, f"{preset.name}-{checkpoints}x")
  manifest = _manifest(preset, checkpoints, seed)
  series = _load_cached(directory, manifest)
  if series is not None:
    print(f"Using cached series {directory}")
    return series
  print(f"Generating {checkpoints} checkpoints of preset '{preset.name}' in "
        f"{directory} ...", flush=True)
  partial = directory + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  shutil.rmtree(directory, ignore_errors=True)
  run = _run_worker("generate_series", f"generating series {preset.name}",
                    directory=partial, preset=preset.name,
                    checkpoints=checkpoints, seed=seed)
  prefixes = [f"model.ckpt-{FIRST_STEP + i * STEP_INTERVAL}"
              for i in range(checkpoints)]
  files = [os.path.relpath(f, partial) for p in prefixes
           for f in _checkpoint_files(os.path.join(partial, p))]
  with open(os.path.join(partial, "series.json"), "w",
            encoding="utf-8") as f:
    json.dump({"manifest": manifest, "prefixes": prefixes,
               "files": {name: os.path.getsize(os.path.join(partial, name))
                         for name in files}}, f, indent=1)
  os.rename(partial, directory)
  _relativize_state_file(directory, partial)
  budget = ("" if run.peak_rss_mib <= GENERATE_RSS_BUDGET_MIB else
            f" -- WARNING: above the {GENERATE_RSS_BUDGET_MIB} MiB budget")
  print(f"Generated in {run.wall_s:.1f} s (generator peak RSS "
        f"{run.peak_rss_mib:.0f} MiB{budget})")
  series = _load_cached(directory, manifest)
  if series is None:
    raise RuntimeError(f"generated series in {directory} does not check out")
  return series


# ----------------------------------------------------------------------------
# One size.


@dataclasses.dataclass
class SizeResult:
  """Everything measured for one preset."""
  preset: Preset
  params: int
  checkpoint_bytes: int
  largest: VariableInfo
  input_bytes: int
  checkpoints: int
  warm_s: float = 0.0
  load_before: str = ""
  load_after: str = ""
  runs: dict[str, list[ChildRun]] = dataclasses.field(default_factory=dict)
  # tool -> (.data + .index bytes, bytes of its other output files)
  output_bytes: dict[str, tuple[int, int]] = dataclasses.field(
      default_factory=dict)
  verdict: Optional[str] = None  # None: not compared (one tool only)
  identical: Optional[bool] = None

  def median(self, row: str, field: str) -> Optional[float]:
    values = [getattr(r, field) for r in self.runs.get(row, [])]
    return statistics.median(values) if values else None


def _output_prefix(out_dir: str, tool: str) -> str:
  return os.path.join(out_dir, f"{tool}.ckpt")


def _tool_argv(tool: str, series: Series, out_dir: str) -> list[str]:
  tool_flags = [f"--checkpoints={','.join(series.prefixes)}",
                f"--output_path={_output_prefix(out_dir, tool)}"]
  if tool == "legacy":
    return [_PYTHON.value, "-c", LEGACY_MAIN] + tool_flags
  return [_PYTHON.value, "-m", "t2t_avg"] + tool_flags


def _output_bytes(out_dir: str, tool: str) -> tuple[int, int]:
  """(data + index bytes, other bytes) of a tool's output `<output_path>-0`.

  Other files: legacy's `.meta` graph, t2t_avg's JSON record.
  """
  prefix = _output_prefix(out_dir, tool) + "-0"
  checkpoint = set(_checkpoint_files(prefix))
  other = set(glob.glob(glob.escape(prefix) + ".*")) - checkpoint
  if not os.path.isfile(prefix + ".index"):
    raise ChildFailed(f"{tool} exited 0 but wrote no {prefix}.index")
  return (sum(os.path.getsize(f) for f in checkpoint),
          sum(os.path.getsize(f) for f in other))


def _clear(out_dir: str) -> None:
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)


def _record(result: SizeResult, row: str, run: ChildRun, index: int,
            runs: int) -> None:
  result.runs.setdefault(row, []).append(run)
  print(f"  [{result.preset.name}] run {index + 1}/{runs} "
        f"{row:<11} wall {run.wall_s:7.2f} s   CPU {run.cpu_s:7.2f} s   "
        f"peak RSS {run.peak_rss_mib:8.1f} MiB", flush=True)


def _verify(result: SizeResult, out_dir: str) -> None:
  run = _run_worker("compare_outputs", "comparing the two outputs",
                    legacy=_output_prefix(out_dir, "legacy") + "-0",
                    candidate=_output_prefix(out_dir, "t2t_avg") + "-0")
  report = json.loads(run.stdout.strip().splitlines()[-1])
  problems = []
  if report["only_in_legacy"]:
    problems.append(f"missing from t2t_avg: {report['only_in_legacy'][:5]}")
  if report["only_in_t2t_avg"]:
    problems.append(f"extra in t2t_avg: {report['only_in_t2t_avg'][:5]}")
  for difference in report["differences"][:5]:
    problems.append(json.dumps(difference))
  result.identical = not problems and report["compared"] > 0
  if result.identical:
    result.verdict = (f"IDENTICAL: all {report['compared']} float tensors are "
                      "bit-identical (global_step not compared)")
  else:
    result.verdict = (
        f"OUTPUTS DIFFER ({len(report['differences'])} of "
        f"{report['compared']} float tensors differ) -- the benchmark means "
        "nothing until they match: " + "; ".join(problems))
  print(f"  [{result.preset.name}] outputs compared: {result.verdict}",
        flush=True)


def bench_size(preset: Preset, tools: Sequence[str], runs: int,
               checkpoints: int, seed: int) -> SizeResult:
  """Generates (or reuses) a series and measures tools and floors on it."""
  print(f"\n=== {preset.name} ===", flush=True)
  series = ensure_series(preset, checkpoints, seed)
  variables = model_variables(preset)
  result = SizeResult(
      preset=preset, params=sum(v.size for v in variables),
      checkpoint_bytes=sum(os.path.getsize(f)
                           for f in _checkpoint_files(series.prefixes[0])),
      largest=max(variables, key=lambda v: v.size),
      input_bytes=series.total_bytes, checkpoints=checkpoints,
      load_before=_load())
  read_argv = [_PYTHON.value, "-c", READ_INPUTS_MAIN] + series.files

  warm = run_child(read_argv, what="warming the page cache")
  result.warm_s = warm.wall_s
  print(f"Page cache warmed: read all {len(series.files)} input files "
        f"({_gb(result.input_bytes)}) once in {warm.wall_s:.1f} s before "
        "timing (not counted); every run below sees a warm cache.",
        flush=True)

  out_dir = os.path.join(_CACHE_DIR.value, f"out-{preset.name}")
  _clear(out_dir)
  try:
    for index in range(runs):
      for tool in tools:
        run = run_child(_tool_argv(tool, series, out_dir),
                        legacy=tool == "legacy",
                        what=f"{tool} (size {preset.name}, run {index + 1})")
        _record(result, tool, run, index, runs)
        if index == 0:
          result.output_bytes[tool] = _output_bytes(out_dir, tool)
      if index == 0 and set(TOOLS) <= set(tools):
        _verify(result, out_dir)
      _clear(out_dir)
      _record(result, "import_tf",
              run_child([_PYTHON.value, "-c", IMPORT_TF_MAIN],
                        what="import tensorflow"), index, runs)
      read = run_child(read_argv, what="reading the inputs")
      if int(read.stdout.split()[-1]) != result.input_bytes:
        raise ChildFailed(f"the read floor read {read.stdout.strip()} bytes, "
                          f"expected {result.input_bytes}")
      _record(result, "read_inputs", read, index, runs)
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  result.load_after = _load()
  return result


# ----------------------------------------------------------------------------
# Report.


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB"


def _mb(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _fmt(value: Optional[float], spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def ratios(result: SizeResult) -> tuple[Optional[float], Optional[float]]:
  """(t2t_avg/legacy wall, excess peak RSS ratio), None where not measured."""
  legacy_wall = result.median("legacy", "wall_s")
  ours_wall = result.median("t2t_avg", "wall_s")
  legacy_rss = result.median("legacy", "peak_rss_mib")
  ours_rss = result.median("t2t_avg", "peak_rss_mib")
  tf_rss = result.median("import_tf", "peak_rss_mib")
  wall = excess = None
  if None not in (legacy_wall, ours_wall):
    wall = ours_wall / legacy_wall
  if None not in (legacy_rss, ours_rss, tf_rss) and legacy_rss > tf_rss:
    excess = (ours_rss - tf_rss) / (legacy_rss - tf_rss)
  return wall, excess


def _verdict(value: Optional[float], target: float) -> str:
  if value is None:
    return "n/a"
  return "PASS" if value <= target else "FAIL"


def print_size_report(result: SizeResult) -> None:
  """Markdown tables for one size: medians, ratios, then raw runs."""
  preset = result.preset
  largest = result.largest
  print(f"\n### Size `{preset.name}`: {result.params / 1e6:.1f}M parameters, "
        f"{result.checkpoints} checkpoints x {_mb(result.checkpoint_bytes)} "
        f"({_gb(result.input_bytes)} of input)\n")
  print(f"- model: vocab {preset.vocab_size}, hidden {preset.hidden_size}, "
        f"filter {preset.filter_size}, {preset.encoder_layers} encoder + "
        f"{preset.decoder_layers} decoder layers; float32 + int64 global_step")
  print(f"- largest tensor: `{largest.name}` {list(largest.shape)}, "
        f"{_mb(largest.size * 4)}")
  for tool, (checkpoint, other) in result.output_bytes.items():
    print(f"- output size, {tool}: {_mb(checkpoint)} (.data + .index)"
          + (f", plus {_mb(other)} in other files" if other else ""))
  print(f"- page cache warmed before timing (all inputs read once, "
        f"{result.warm_s:.1f} s)")
  print("- outputs compared: " + (
      result.verdict or "not compared (needs both tools)"))
  busy = max(float(result.load_before.split("/")[0]),
             float(result.load_after.split("/")[0])) >= os.cpu_count()
  print(f"- load average (1/5/15 min) before / after: {result.load_before} / "
        f"{result.load_after} on {os.cpu_count()} CPUs"
        + ("; BUSY MACHINE: wall times are inflated and noisy, compare the "
           "CPU column too" if busy else ""))
  print()
  print("| run | median wall (s) | median CPU (s) | median peak RSS (MiB) "
        "| runs |")
  print("|---|---:|---:|---:|---:|")
  for row in TOOLS + FLOORS:
    if row in result.runs:
      print(f"| {ROW_LABELS[row]} | {result.median(row, 'wall_s'):.2f} | "
            f"{result.median(row, 'cpu_s'):.2f} | "
            f"{result.median(row, 'peak_rss_mib'):.0f} | "
            f"{len(result.runs[row])} |")
  wall, excess = ratios(result)
  print()
  print("| ratio | value | target | verdict |")
  print("|---|---:|---:|---|")
  print(f"| wall: t2t_avg / legacy | {_fmt(wall, '.2f')} | <= {WALL_TARGET} | "
        f"{_verdict(wall, WALL_TARGET)} |")
  print("| excess peak RSS: (t2t_avg - import tf) / (legacy - import tf) | "
        f"{_fmt(excess, '.2f')} | <= {EXCESS_RSS_TARGET} | "
        f"{_verdict(excess, EXCESS_RSS_TARGET)} |")
  legacy_cpu = result.median("legacy", "cpu_s")
  ours_cpu = result.median("t2t_avg", "cpu_s")
  if None not in (legacy_cpu, ours_cpu):
    print(f"| CPU (user + sys): t2t_avg / legacy, for information | "
          f"{ours_cpu / legacy_cpu:.2f} | | |")
  print(f"\nRaw runs, size `{preset.name}` (in the order they ran within "
        "each round):\n")
  print("| run | " + " | ".join(
      f"#{i + 1} wall s / CPU s / RSS MiB" for i in range(
          max(len(r) for r in result.runs.values()))) + " |")
  print("|---|" + "---:|" * max(len(r) for r in result.runs.values()))
  for row in TOOLS + FLOORS:
    if row in result.runs:
      cells = [f"{r.wall_s:.2f} / {r.cpu_s:.2f} / {r.peak_rss_mib:.0f}"
               for r in result.runs[row]]
      print(f"| {row} | " + " | ".join(cells) + " |")


def _excess_mib(result: SizeResult, tool: str) -> str:
  rss = result.median(tool, "peak_rss_mib")
  tf_rss = result.median("import_tf", "peak_rss_mib")
  return "n/a" if rss is None else f"{rss - tf_rss:.0f}"


def print_summary(results: Sequence[SizeResult]) -> None:
  """One table across sizes: does peak memory follow the model size?"""
  print("\n### Across sizes (medians; excess = peak RSS - `import tensorflow` "
        "peak)\n")
  print("| size | params | input | largest tensor | legacy wall s | "
        "t2t_avg wall s | read floor s | legacy excess MiB | "
        "t2t_avg excess MiB | wall ratio | excess ratio |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for result in results:
    wall, excess_ratio = ratios(result)
    print(f"| {result.preset.name} | {result.params / 1e6:.1f}M | "
          f"{_gb(result.input_bytes)} | {_mb(result.largest.size * 4)} | "
          f"{_fmt(result.median('legacy', 'wall_s'), '.2f')} | "
          f"{_fmt(result.median('t2t_avg', 'wall_s'), '.2f')} | "
          f"{result.median('read_inputs', 'wall_s'):.2f} | "
          f"{_excess_mib(result, 'legacy')} | "
          f"{_excess_mib(result, 't2t_avg')} | "
          f"{_fmt(wall, '.2f')} {_verdict(wall, WALL_TARGET)} | "
          f"{_fmt(excess_ratio, '.2f')} "
          f"{_verdict(excess_ratio, EXCESS_RSS_TARGET)} |")


def _describe_machine() -> str:
  mem_total = "?"
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          mem_total = f"{int(line.split()[1]) / 2**20:.1f} GiB"
  except OSError:
    pass
  return f"{os.cpu_count()} CPUs, {mem_total} RAM"


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sizes = [_SIZE.value] if _SIZE.value else _SIZES.value
  unknown = [s for s in sizes if s not in PRESETS]
  if unknown:
    raise app.UsageError(f"unknown size(s) {unknown}; presets: "
                         f"{sorted(PRESETS)}")
  tools = [t for t in TOOLS if t in _TOOLS.value]
  if not tools or set(_TOOLS.value) - set(TOOLS):
    raise app.UsageError(f"--tools takes a subset of {list(TOOLS)}")
  if "legacy" in tools and not os.path.isdir(
      os.path.join(_LEGACY_PATH.value, "tensor2tensor")):
    raise app.UsageError(f"no tensor2tensor in --legacy_path="
                         f"{_LEGACY_PATH.value}")
  os.makedirs(_CACHE_DIR.value, exist_ok=True)

  print(f"Machine: {_describe_machine()}; interpreter {_PYTHON.value}")
  print(f"Tools: {', '.join(tools)}; {_RUNS.value} run(s) each per size, "
        "alternating; peak RSS per child from os.wait4 (ru_maxrss).")
  results = []
  try:
    for size in sizes:
      result = bench_size(PRESETS[size], tools, _RUNS.value,
                          _CHECKPOINTS.value, _SEED.value)
      results.append(result)
      print_size_report(result)
      if not _KEEP_CACHE.value:
        shutil.rmtree(os.path.join(_CACHE_DIR.value,
                                   f"{size}-{_CHECKPOINTS.value}x"),
                      ignore_errors=True)
  except ChildFailed as e:
    print(f"\n{e}", file=sys.stderr)
    print("\nStopped: a child process failed; the numbers above are "
          "incomplete.", file=sys.stderr)
    return 1
  if len(results) > 1:
    print_summary(results)
  parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  print(f"\nNote: this parent's peak RSS was {parent_rss:.0f} MiB; on Linux "
        "no child can report less (exec keeps the spawning process's "
        "high-water mark).")
  if any(r.identical is False for r in results):
    print("\nOUTPUTS DIFFER for at least one size: see above.",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
