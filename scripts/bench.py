"""Benchmarks t2t_avg against T2T 1.15.7's avg_checkpoints: time, peak RSS.

Usage (from the repository root, in its virtualenv):

  python scripts/bench.py                # sizes default,large; 3 runs each
  python scripts/bench.py --sizes=default --runs=1 --tools=legacy
  python scripts/bench.py --size=tiny --runs=1   # seconds: try the harness
  python scripts/bench.py --cold                 # cold page cache (default size)
  python scripts/bench.py --memory_limit_mb=400  # little RAM (default size)
  python scripts/bench.py --case=small_tensors   # 8 x 20,000 tensors of 1 KB
  python scripts/bench.py --case=max_shard       # TF2 checkpoints, sliced
  python scripts/bench.py --case=import_limit --runs=1  # least RAM for TF

For each model size it generates (once; cached under `.bench/`) a T2T-shaped
series of checkpoints with TF's own `tf.compat.v1.train.Saver`, then runs the
legacy script and `python -m t2t_avg` alternately, each in its own child
process. Every child's wall time and peak RSS come from the OS through
`os.wait4` on that child alone (`RUSAGE_CHILDREN` would keep the largest peak
of all children so far). Floors measured in the same session: a bare
`import tensorflow`, reading every input byte once, and writing the output's
byte count once without and with fsync (what durability would cost). The
outputs of the two tools are compared bit for bit once per size; the numbers
mean nothing if they differ.

Cases (`--case`), each run beside legacy and the floors, alternating:

- `sizes` (default): the model presets of `--sizes`.
- `small_tensors`: 8 checkpoints of 20,000 float32 tensors of 1 KB, written
  with `tf.raw_ops.SaveV2`; legacy gets `--timeout_s`, and the output is
  checked against numpy's float64 mean.
- `max_shard`: the default model saved by TF2 `tf.train.Checkpoint.write`
  with a `MaxShardSizePolicy` that slices the embedding over several shards,
  against the same values saved unsliced; both averages must be identical.
- `import_limit`: the least memory limit a bare `import tensorflow` survives.

Conditions, for any case: `--cold` drops the page cache before every child;
`--memory_limit_mb` runs every child in a memory cgroup of its own (and
implies `--cold`: see bench_children.py for what peak RSS means there).

On Linux a child's `ru_maxrss` can never be below the peak RSS of the process
that spawned it (exec keeps the high-water mark of the memory it replaces, and
Python spawns with vfork), so this parent imports neither numpy nor TensorFlow:
generating and comparing checkpoints run in children too.
"""
import dataclasses
import glob
import json
import os
import resource
import shutil
import statistics
import sys
from typing import Optional
from collections.abc import Sequence

from absl import app
from absl import flags

import bench_children as children
from bench_children import ChildFailed, ChildRun
import bench_series as series_lib
from bench_series import PRESETS, Preset, Series, VariableInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")

READ_CHUNK = 1 << 20
WRITE_CHUNK = 8 << 20
VERIFY_SAMPLE = 200  # Tensors checked against numpy's mean.
SMALL_TENSORS_FORMAT = 1
MAX_SHARD_FORMAT = 1

# The acceptance targets of the issues.
WALL_TARGET = 0.5
EXCESS_RSS_TARGET = 0.3
COLD_WALL_TARGET = 0.75  # t2t_avg cold / (cold import + cold cat)
SMALL_TENSORS_TARGET = 0.6  # (t2t_avg - import) / import, wall
LIMITED_EXCESS_TARGET_MB = 150  # t2t_avg - import peak RSS under a limit
MAX_SHARD_TARGET = 1.5  # sliced / unsliced peak RSS above an import

# The little-RAM case: below one default checkpoint (433 MB). A bare
# `import tensorflow` (cold cache, no swap; `--case=import_limit`) peaks at
# ~350 MiB of cgroup charge unlimited, survives down to 190 MiB and is
# OOM-killed at 180 (alone on the machine it thrashed on its libraries below
# ~300 MiB: 11 s at 190 instead of 4); 400 leaves room for t2t_avg's own
# ~100 MiB without squeezing the import.
LITTLE_RAM_MB = 400
IMPORT_LIMITS_MB = ("500", "400", "300", "250", "200", "190", "180", "170")

TOOLS = ("legacy", "t2t_avg")
FLOORS = ("import_tf", "read_inputs", "cat_inputs", "write_output",
          "write_output_fsync")
ROW_LABELS = {
    "legacy": "legacy avg_checkpoints (T2T 1.15.7)",
    "t2t_avg": "t2t_avg",
    "import_tf": "floor: `import tensorflow`",
    "read_inputs": "floor: read inputs once (1 MiB reads)",
    "cat_inputs": "floor: `cat` inputs > /dev/null",
    "write_output": "floor: write the output's bytes once, no fsync",
    "write_output_fsync": "floor: write them, fsync file + directory",
    "uniform": "t2t_avg, uniform",
    "softmax_tf1": "t2t_avg, softmax from TF1 events (simple_value)",
    "softmax_tf2": "t2t_avg, softmax from TF2 events (tensors)",
    "continuous": "t2t-avg-all, one pass (one window of all)",
}
MODES_TARGET = 1.25  # weighted / uniform wall (issue: "as light as uniform")

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
# argv: path, bytes, 'fsync' or 'nofsync'. Non-zero bytes in WRITE_CHUNK
# writes; with fsync, the file and then its directory (the rename of a
# durable output needs both). Prints: bytes, seconds writing, seconds in
# fsync (timed inside, so the fsync share is clear of process start-up and
# of the varying cost of filling fresh page cache).
WRITE_OUTPUT_MAIN = f"""
import os, sys, time
path, total, durable = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fsync"
chunk = memoryview(bytes(range(256)) * ({WRITE_CHUNK} // 256))
start = time.perf_counter()
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = total
while left:
  left -= os.write(fd, chunk[:min(left, len(chunk))])
written = time.perf_counter()
if durable:
  os.fsync(fd)
os.close(fd)
if durable:
  fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
  os.fsync(fd)
  os.close(fd)
print(total, written - start, time.perf_counter() - written)
"""
# `sh` execs `cat` with its output on /dev/null (run_child keeps stdout).
CAT_ARGV = ("sh", "-c", 'exec cat -- "$@" > /dev/null', "cat")
# Runs `bench_series.<function>(**json_kwargs)`; argv: scripts dir, function,
# kwargs.
WORKER_MAIN = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
               "import bench_series; "
               "getattr(bench_series, sys.argv[2])(**json.loads(sys.argv[3]))")

_CASE = flags.DEFINE_enum(
    "case", "sizes",
    ["sizes", "small_tensors", "max_shard", "import_limit", "modes"],
    "What to benchmark: sizes (the --sizes presets), modes (t2t_avg uniform, "
    "softmax-weighted from TF1 and from TF2 event files, and one continuous "
    "pass, on the same default series), small_tensors (8 x "
    "--small_tensors tensors of 1 KB), max_shard (TF2 checkpoints sliced by "
    "MaxShardSizePolicy vs unsliced), import_limit (the least memory limit a "
    "bare `import tensorflow` survives, for choosing --memory_limit_mb).")
_SIZES = flags.DEFINE_list(
    "sizes", ["default", "large"],
    "Model presets to benchmark, in order (smaller first shows how memory "
    "grows with model size). Presets: default (~108M params), large "
    "(~2.2x), tiny (for trying the harness). With --cold or "
    "--memory_limit_mb and no --sizes/--size: default only.")
_SIZE = flags.DEFINE_string(
    "size", None, "One preset to benchmark; shorthand for --sizes=<size>.")
_RUNS = flags.DEFINE_integer("runs", 3, "Runs per tool (and floor) per size.",
                             lower_bound=1)
_CHECKPOINTS = flags.DEFINE_integer(
    "checkpoints", 8, "Checkpoints in each series.", lower_bound=1)
_TOOLS = flags.DEFINE_list(
    "tools", list(TOOLS), "Tools to run: legacy, t2t_avg, or both.")
_COLD = flags.DEFINE_boolean(
    "cold", False,
    "Before every measured child (tools and floors alike): sync, then echo 3 "
    "> /proc/sys/vm/drop_caches (not timed), so every child reads its inputs "
    "and TensorFlow's libraries from disk. Adds a cold `cat` floor. Where "
    "caches cannot be dropped, says so and runs warm. Default: on with "
    "--memory_limit_mb (a warm page cache is charged to no one), else off.")
_MEMORY_LIMIT_MB = flags.DEFINE_integer(
    "memory_limit_mb", None,
    "Run every measured child in a fresh memory cgroup limited to this many "
    f"MiB, without swap (cgroup v1, or systemd-run on cgroup v2). "
    f"{LITTLE_RAM_MB} is the little-RAM case: below one default checkpoint "
    "(433 MB), above what a bare import of TensorFlow needs "
    "(--case=import_limit).", lower_bound=1)
_TIMEOUT_S = flags.DEFINE_float(
    "timeout_s", 180.0,
    "A measured child still running after this long is killed and reported "
    "as 'did not finish' with its peak RSS so far (legacy on small_tensors "
    "takes more than 13 minutes). A tool that did not finish is not run "
    "again in later rounds.", lower_bound=1.0)
_SMALL_TENSORS = flags.DEFINE_integer(
    "small_tensors", 20000, "Tensors per checkpoint for --case=small_tensors.",
    lower_bound=1)
_MAX_SHARD_MB = flags.DEFINE_float(
    "max_shard_mb", 64,
    "max_shard_size (MiB) of the MaxShardSizePolicy for --case=max_shard; "
    "below the default embedding's 125 MiB, so it is sliced.",
    lower_bound=0.01)
_MAX_SHARD_PRESET = flags.DEFINE_string(
    "max_shard_preset", "default", "Model preset for --case=max_shard.")
_IMPORT_LIMITS_MB = flags.DEFINE_list(
    "import_limits_mb", list(IMPORT_LIMITS_MB),
    "Memory limits (MiB) tried by --case=import_limit, largest first.")
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
    "legacy_path",
    os.environ.get("T2T_LEGACY_DIR", os.path.join(REPO, ".legacy")),
    "`pip --target` directory holding tensor2tensor==1.15.7 (and six); put on "
    "PYTHONPATH for the legacy children only. Default: $T2T_LEGACY_DIR, else "
    ".legacy in the repository.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated values.")


# ----------------------------------------------------------------------------
# Children.


def _child_env(*, legacy: bool) -> dict[str, str]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
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
  """Runs a helper child (not measured: no cold cache, no limit); checked."""
  return children.run_child(argv, env=_child_env(legacy=legacy), cwd=REPO,
                            what=what)


def _run_worker(function: str, what: str, **kwargs: object) -> ChildRun:
  return run_child(
      [_PYTHON.value, "-c", WORKER_MAIN, SCRIPTS, function, json.dumps(kwargs)],
      what=what)


def _worker_json(function: str, what: str, **kwargs: object) -> dict:
  run = _run_worker(function, what, **kwargs)
  return json.loads(run.stdout.strip().splitlines()[-1])


@dataclasses.dataclass(frozen=True)
class Session:
  """How measured children run: cold cache, memory limit, timeout."""
  isolation: children.Isolation

  @property
  def cold(self) -> bool:
    return self.isolation.cold

  @property
  def limited(self) -> bool:
    return self.isolation.memory is not None

  def measure(self, argv: Sequence[str], *, what: str, legacy: bool = False,
              may_fail: bool = False) -> ChildRun:
    """Runs one measured child.

    Under a memory limit any child may fail (OOM), and that is a result;
    elsewhere only `may_fail` children may, and any other failure stops the
    benchmark.
    """
    return children.run_child(
        argv, env=_child_env(legacy=legacy), cwd=REPO, what=what,
        isolation=self.isolation, check=not (may_fail or self.limited))

  def describe(self) -> list[str]:
    lines = []
    if self.cold:
      lines.append("page cache dropped before every measured child (sync; "
                   "echo 3 > /proc/sys/vm/drop_caches; not timed): cold "
                   "reads of the inputs and of TensorFlow's libraries")
    memory = self.isolation.memory
    if memory is not None:  # self.limited
      lines.append(f"memory limit: {memory.describe()}")
    return lines


# ----------------------------------------------------------------------------
# Runs of one case.


@dataclasses.dataclass
class Runs:
  """Every measured run of one case, by row, in the order they ran."""
  label: str  # Shown in the progress lines: a size or a case.
  rounds: int
  by_row: dict[str, list[ChildRun]] = dataclasses.field(default_factory=dict)

  def add(self, row: str, run: ChildRun, index: int) -> None:
    self.by_row.setdefault(row, []).append(run)
    extra = ("" if run.cgroup_peak_mib is None else
             f"   cgroup peak {run.cgroup_peak_mib:6.0f} MiB")
    if not run.ok:
      extra += f"   {run.outcome}"
    print(f"  [{self.label}] run {index + 1}/{self.rounds} "
          f"{row:<18} wall {run.wall_s:7.2f} s   CPU {run.cpu_s:7.2f} s   "
          f"peak RSS {run.peak_rss_mib:8.1f} MiB{extra}", flush=True)

  def median(self, row: str, field: str) -> Optional[float]:
    """Median over the row's successful runs; None if it has none."""
    return _median_of([r for r in self.by_row.get(row, []) if r.ok], field)

  def shown_median(self, row: str, field: str) -> Optional[float]:
    """Over the successful runs, else over all (time to the kill, etc.)."""
    value = self.median(row, field)
    if value is None:
      value = _median_of(self.by_row.get(row, []), field)
    return value

  def outcome(self, row: str) -> str:
    """'ok', or how the runs that failed ended, e.g. 'OOM-killed (3 of 3)'."""
    runs = self.by_row.get(row, [])
    failed = [r.outcome for r in runs if not r.ok]
    if not failed:
      return "ok"
    kinds = sorted(set(failed), key=failed.index)
    return "; ".join(f"{k} ({failed.count(k)} of {len(runs)})" for k in kinds)

  def all_ok(self) -> bool:
    return all(r.ok for rs in self.by_row.values() for r in rs)

  def has_cgroup_peaks(self) -> bool:
    return any(r.cgroup_peak_mib is not None
               for rs in self.by_row.values() for r in rs)


def _median_of(runs: Sequence[ChildRun], field: str) -> Optional[float]:
  """The median of a field over runs, None values left out."""
  values = [v for v in (getattr(r, field) for r in runs) if v is not None]
  return statistics.median(values) if values else None


def _stopped(run: ChildRun) -> bool:
  """A run killed by the timeout: running it again costs as much again."""
  return run.outcome.startswith("did not finish")


def _failure_line(run: ChildRun) -> str:
  """How a failed run ended: its peak RSS, for an error its last stderr line."""
  if _stopped(run):
    return (f"{run.outcome} (killed; peak RSS at the kill "
            f"{run.peak_rss_mib:.0f} MiB)")
  text = (f"{run.outcome} after {run.wall_s:.1f} s (peak RSS "
          f"{run.peak_rss_mib:.0f} MiB)")
  if run.outcome.startswith("OOM"):
    return text
  lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
  last = lines[-1] if lines else ""
  if len(last) > 200:
    last = last[:200] + " ..."
  return text + (f": {last}" if last else "")


# ----------------------------------------------------------------------------
# Floors.


def _read_argv(files: Sequence[str]) -> list[str]:
  return [_PYTHON.value, "-c", READ_INPUTS_MAIN] + list(files)


def warm_page_cache(files: Sequence[str], input_bytes: int) -> float:
  """Reads every input once (not timed); returns how long that took."""
  warm = run_child(_read_argv(files), what="warming the page cache")
  print(f"Page cache warmed: read all {len(files)} input files "
        f"({_gb(input_bytes)}) once in {warm.wall_s:.1f} s before "
        "timing (not counted); every run below sees a warm cache.",
        flush=True)
  return warm.wall_s


def measure_floors(session: Session, runs: Runs, index: int, *,
                   files: Sequence[str], input_bytes: int, out_dir: str,
                   output_bytes: Optional[int]) -> None:
  """One round of floors: import, read (and cat when cold), write the output.

  The write floors write `output_bytes` into `out_dir` (the tools' output
  directory, so the same file system) once without fsync and once with
  fsync of the file and its directory; dirty pages of earlier children are
  written back first (`sync`, not timed), so each floor writes its own.
  The fsync floor also times its fsync calls inside: in a VM the cost of
  filling fresh page cache varies by a second or more per 433 MB from run
  to run (with where the pages come from), while the fsync calls do not.
  """
  runs.add("import_tf", session.measure([_PYTHON.value, "-c", IMPORT_TF_MAIN],
                                        what="import tensorflow"), index)
  read = session.measure(_read_argv(files), what="reading the inputs")
  if read.ok and int(read.stdout.split()[-1]) != input_bytes:
    raise ChildFailed(f"the read floor read {read.stdout.strip()} bytes, "
                      f"expected {input_bytes}")
  runs.add("read_inputs", read, index)
  if session.cold:
    runs.add("cat_inputs", session.measure(list(CAT_ARGV) + list(files),
                                           what="cat of the inputs"), index)
  if not output_bytes:
    return
  path = os.path.join(out_dir, "write_floor.bin")
  for row, mode in (("write_output", "nofsync"),
                    ("write_output_fsync", "fsync")):
    os.sync()
    runs.add(row, session.measure(
        [_PYTHON.value, "-c", WRITE_OUTPUT_MAIN, path, str(output_bytes),
         mode], what=f"writing {output_bytes} bytes ({mode})"), index)
    if os.path.exists(path):
      os.remove(path)


# ----------------------------------------------------------------------------
# Tools and their outputs.


def _tool_argv(tool: str, prefixes: Sequence[str],
               output_path: str) -> list[str]:
  tool_flags = [f"--checkpoints={','.join(prefixes)}",
                f"--output_path={output_path}"]
  if tool == "legacy":
    return [_PYTHON.value, "-c", LEGACY_MAIN] + tool_flags
  return [_PYTHON.value, "-m", "t2t_avg"] + tool_flags


def _output_bytes(output: str) -> tuple[int, int]:
  """(data + index bytes, other bytes) of an output checkpoint `output`.

  Other files: legacy's `.meta` graph, t2t_avg's JSON record.
  """
  checkpoint = set(series_lib.checkpoint_files(output))
  other = set(glob.glob(glob.escape(output) + ".*")) - checkpoint
  if not os.path.isfile(output + ".index"):
    raise ChildFailed(f"a tool exited 0 but wrote no {output}.index")
  return (sum(os.path.getsize(f) for f in checkpoint),
          sum(os.path.getsize(f) for f in other))


def _clear(out_dir: str) -> None:
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)


def _compare(reference: str, candidate: str, names: tuple[str, str]) -> tuple[
    bool, str]:
  """(identical, verdict) of two outputs' float tensors, in a child."""
  report = _worker_json("compare_outputs", "comparing two outputs",
                        reference=reference, candidate=candidate)
  problems = []
  if report["only_in_reference"]:
    problems.append(f"missing from {names[1]}: "
                    f"{report['only_in_reference'][:5]}")
  if report["only_in_candidate"]:
    problems.append(f"extra in {names[1]}: {report['only_in_candidate'][:5]}")
  for difference in report["differences"][:5]:
    problems.append(json.dumps(difference))
  identical = not problems and report["compared"] > 0
  if identical:
    return True, (f"IDENTICAL: all {report['compared']} float tensors are "
                  "bit-identical (global_step not compared)")
  return False, (
      f"OUTPUTS DIFFER ({len(report['differences'])} of "
      f"{report['compared']} float tensors differ) -- the benchmark means "
      "nothing until they match: " + "; ".join(problems))


def _check_mean(inputs: Sequence[str], output: str) -> tuple[bool, str]:
  """(correct, verdict): sampled output tensors vs numpy's float64 mean."""
  report = _worker_json("check_mean", "checking the output against numpy",
                        inputs=list(inputs), output=output,
                        sample=VERIFY_SAMPLE)
  problems = ([f"missing keys {report['missing']}"] if report["missing"]
              else []) + ([f"extra keys {report['extra']}"] if report["extra"]
                          else [])
  problems += [json.dumps(d) for d in report["differences"][:5]]
  if not problems and report["checked"] > 0:
    return True, (f"CHECKED: {report['checked']} sampled float tensors are "
                  "bit-identical to numpy's float64 mean of the inputs cast "
                  f"once to float32; the output holds all {report['keys']} "
                  "keys")
  return False, (f"WRONG OUTPUT ({len(report['differences'])} of "
                 f"{report['checked']} sampled tensors differ from numpy's "
                 "mean): " + "; ".join(problems))


# ----------------------------------------------------------------------------
# Case `sizes`: one model preset.


@dataclasses.dataclass
class SizeResult:
  """Everything measured for one preset."""
  preset: Preset
  params: int
  checkpoint_bytes: int
  largest: VariableInfo
  input_bytes: int
  checkpoints: int
  runs: Runs
  warm_s: Optional[float] = None  # None: cold runs, no warming
  load_before: str = ""
  load_after: str = ""
  # tool -> (.data + .index bytes, bytes of its other output files)
  output_bytes: dict[str, tuple[int, int]] = dataclasses.field(
      default_factory=dict)
  verdict: Optional[str] = None  # None: not compared (one tool only)
  identical: Optional[bool] = None

  def median(self, row: str, field: str) -> Optional[float]:
    return self.runs.median(row, field)


def _manifest(preset: Preset, checkpoints: int, seed: int) -> dict:
  return {"format": series_lib.SERIES_FORMAT,
          "preset": dataclasses.asdict(preset),
          "checkpoints": checkpoints, "seed": seed}


def _series_dir(name: str) -> str:
  return os.path.join(_CACHE_DIR.value, name)


def ensure_series(preset: Preset, checkpoints: int, seed: int) -> Series:
  """The cached T2T series for these settings, generated first if needed."""
  return series_lib.ensure(
      _series_dir(f"{preset.name}-{checkpoints}x"),
      _manifest(preset, checkpoints, seed),
      [series_lib.checkpoint_name(i) for i in range(checkpoints)],
      lambda partial: _run_worker(
          "generate_series", f"generating series {preset.name}",
          directory=partial, preset=preset.name, checkpoints=checkpoints,
          seed=seed),
      f"{checkpoints} checkpoints of preset '{preset.name}'")


def _output_prefix(out_dir: str, tool: str) -> str:
  return os.path.join(out_dir, f"{tool}.ckpt")


def _verify(result: SizeResult, series: Series, out_dir: str) -> None:
  """Compares the two tools' outputs, or checks t2t_avg's against numpy."""
  outputs = {tool: _output_prefix(out_dir, tool) + "-0"
             for tool in result.output_bytes}
  if set(outputs) == set(TOOLS):
    result.identical, result.verdict = _compare(
        outputs["legacy"], outputs["t2t_avg"], ("legacy", "t2t_avg"))
  elif "t2t_avg" in outputs:
    result.identical, result.verdict = _check_mean(series.prefixes,
                                                   outputs["t2t_avg"])
    result.verdict += " (legacy wrote no output to compare with)"
  else:
    return
  print(f"  [{result.preset.name}] outputs compared: {result.verdict}",
        flush=True)


def _floor_output_bytes(output_bytes: dict[str, tuple[int, int]]
                        ) -> Optional[int]:
  """The output size the write floors write: t2t_avg's, else legacy's."""
  for tool in ("t2t_avg", "legacy"):
    if tool in output_bytes:
      return output_bytes[tool][0]
  return None


def bench_size(session: Session, preset: Preset, tools: Sequence[str],
               runs: int, checkpoints: int, seed: int) -> SizeResult:
  """Generates (or reuses) a series and measures tools and floors on it."""
  print(f"\n=== {preset.name} ===", flush=True)
  series = ensure_series(preset, checkpoints, seed)
  variables = series_lib.model_variables(preset)
  result = SizeResult(
      preset=preset, params=sum(v.size for v in variables),
      checkpoint_bytes=sum(
          os.path.getsize(f)
          for f in series_lib.checkpoint_files(series.prefixes[0])),
      largest=max(variables, key=lambda v: v.size),
      input_bytes=series.total_bytes, checkpoints=checkpoints,
      runs=Runs(preset.name, runs), load_before=_load())
  if not session.cold:
    result.warm_s = warm_page_cache(series.files, result.input_bytes)

  out_dir = os.path.join(_CACHE_DIR.value, f"out-{preset.name}")
  _clear(out_dir)
  stopped: set[str] = set()
  try:
    for index in range(runs):
      for tool in tools:
        if tool in stopped:
          continue
        run = session.measure(
            _tool_argv(tool, series.prefixes, _output_prefix(out_dir, tool)),
            legacy=tool == "legacy",
            what=f"{tool} (size {preset.name}, run {index + 1})")
        result.runs.add(tool, run, index)
        if _stopped(run):
          stopped.add(tool)
        if index == 0 and run.ok:
          result.output_bytes[tool] = _output_bytes(
              _output_prefix(out_dir, tool) + "-0")
      if index == 0 and "legacy" in tools:
        _verify(result, series, out_dir)
      _clear(out_dir)
      measure_floors(session, result.runs, index, files=series.files,
                     input_bytes=result.input_bytes, out_dir=out_dir,
                     output_bytes=_floor_output_bytes(result.output_bytes))
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  result.load_after = _load()
  return result


def ratios(result: SizeResult) -> tuple[Optional[float], Optional[float]]:
  """(t2t_avg/legacy wall, excess peak RSS ratio), None where not measured."""
  legacy_wall = result.median("legacy", "wall_s")
  ours_wall = result.median("t2t_avg", "wall_s")
  legacy_rss = result.median("legacy", "peak_rss_mib")
  ours_rss = result.median("t2t_avg", "peak_rss_mib")
  tf_rss = result.median("import_tf", "peak_rss_mib")
  wall: Optional[float] = None
  excess: Optional[float] = None
  if legacy_wall is not None and ours_wall is not None:
    wall = ours_wall / legacy_wall
  if (legacy_rss is not None and ours_rss is not None and tf_rss is not None
      and legacy_rss > tf_rss):
    excess = (ours_rss - tf_rss) / (legacy_rss - tf_rss)
  return wall, excess


def _print_condition_lines(session: Session, warm_s: Optional[float]) -> None:
  if warm_s is not None:
    print(f"- page cache warmed before timing (all inputs read once, "
          f"{warm_s:.1f} s)")
  for line in session.describe():
    print(f"- {line}")


def _print_load(load_before: str, load_after: str) -> None:
  cpus = os.cpu_count()
  busy = cpus is not None and max(float(load_before.split("/")[0]),
                                  float(load_after.split("/")[0])) >= cpus
  print(f"- load average (1/5/15 min) before / after: {load_before} / "
        f"{load_after} on {cpus} CPUs"
        + ("; BUSY MACHINE: wall times are inflated and noisy, compare the "
           "CPU column too" if busy else ""))


def print_size_report(session: Session, result: SizeResult) -> None:
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
  _print_condition_lines(session, result.warm_s)
  print("- outputs compared: " + (
      result.verdict or "not compared (needs both tools)"))
  _print_load(result.load_before, result.load_after)
  print()
  rows = [r for r in TOOLS + FLOORS if r in result.runs.by_row]
  print_runs_table(result.runs, rows, session)
  wall, excess = ratios(result)
  _print_ratio_header()
  _print_target_row("wall: t2t_avg / legacy", wall, WALL_TARGET)
  _print_target_row("excess peak RSS: (t2t_avg - import tf) / (legacy - "
                    "import tf)", excess, EXCESS_RSS_TARGET)
  legacy_cpu = result.median("legacy", "cpu_s")
  ours_cpu = result.median("t2t_avg", "cpu_s")
  if legacy_cpu is not None and ours_cpu is not None:
    print(f"| CPU (user + sys): t2t_avg / legacy, for information | "
          f"{ours_cpu / legacy_cpu:.2f} | | |")
  if session.cold:
    print_cold_ratios(result.runs)
  if session.limited:
    print_limited_ratios(result.runs, session)
  print_durability_rows(result.runs)
  print_raw_runs(result.runs, rows, f"size `{preset.name}`")


def _excess_mib(result: SizeResult, tool: str) -> str:
  rss = result.median(tool, "peak_rss_mib")
  tf_rss = result.median("import_tf", "peak_rss_mib")
  return "n/a" if rss is None or tf_rss is None else f"{rss - tf_rss:.0f}"


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
          f"{_fmt(result.median('read_inputs', 'wall_s'), '.2f')} | "
          f"{_excess_mib(result, 'legacy')} | "
          f"{_excess_mib(result, 't2t_avg')} | "
          f"{_fmt(wall, '.2f')} {_verdict(wall, WALL_TARGET)} | "
          f"{_fmt(excess_ratio, '.2f')} "
          f"{_verdict(excess_ratio, EXCESS_RSS_TARGET)} |")


# ----------------------------------------------------------------------------
# Case `small_tensors`.


@dataclasses.dataclass
class CaseResult:
  """What one of the extra cases measured."""
  name: str
  runs: Runs
  input_bytes: int
  warm_s: Optional[float] = None
  load_before: str = ""
  load_after: str = ""
  output_bytes: dict[str, tuple[int, int]] = dataclasses.field(
      default_factory=dict)
  verdicts: list[str] = dataclasses.field(default_factory=list)
  correct: Optional[bool] = None  # None: nothing verified


def _run_tools(session: Session, result: CaseResult, index: int,
               contenders: Sequence[tuple[str, str, list[str]]],
               out_dir: str, stopped: set[str]) -> None:
  """One round of the tools: (row, tool, input prefixes) each, in order.

  Legacy may fail in these cases (it is reported, not fatal); a row that ran
  out of time is not run again.
  """
  for row, tool, prefixes in contenders:
    if row in stopped:
      continue
    output = _output_prefix(out_dir, row)
    run = session.measure(_tool_argv(tool, prefixes, output),
                          legacy=tool == "legacy", may_fail=tool == "legacy",
                          what=f"{row} ({result.name}, run {index + 1})")
    result.runs.add(row, run, index)
    if _stopped(run):
      stopped.add(row)
    if index == 0 and run.ok:
      result.output_bytes[row] = _output_bytes(output + "-0")


def _add_verdict(result: CaseResult, correct: bool, verdict: str) -> None:
  result.verdicts.append(verdict)
  result.correct = correct and result.correct is not False
  print(f"  [{result.name}] {verdict}", flush=True)


def bench_small_tensors(session: Session, tools: Sequence[str], runs: int,
                        count: int, checkpoints: int, seed: int) -> CaseResult:
  """Many 1 KB tensors: per-tensor overhead, beside a bare import."""
  name = "small_tensors"
  print(f"\n=== {name} ===", flush=True)
  manifest = {"format": SMALL_TENSORS_FORMAT, "kind": name, "count": count,
              "elements": series_lib.SMALL_TENSOR_ELEMENTS,
              "checkpoints": checkpoints, "seed": seed}
  series = series_lib.ensure(
      _series_dir(f"{name}-{count}-{checkpoints}x"), manifest,
      [series_lib.checkpoint_name(i) for i in range(checkpoints)],
      lambda partial: _run_worker(
          "generate_small_tensors", "generating the small tensors",
          directory=partial, count=count, checkpoints=checkpoints, seed=seed),
      f"{checkpoints} checkpoints of {count} tensors of 1 KB")
  result = CaseResult(name, Runs(name, runs), series.total_bytes,
                      load_before=_load())
  if not session.cold:
    result.warm_s = warm_page_cache(series.files, result.input_bytes)
  out_dir = os.path.join(_CACHE_DIR.value, f"out-{name}")
  _clear(out_dir)
  stopped: set[str] = set()
  contenders = [(tool, tool, series.prefixes) for tool in tools]
  try:
    for index in range(runs):
      _run_tools(session, result, index, contenders, out_dir, stopped)
      if index == 0 and "t2t_avg" in result.output_bytes:
        _add_verdict(result, *_check_mean(
            series.prefixes, _output_prefix(out_dir, "t2t_avg") + "-0"))
      _clear(out_dir)
      measure_floors(session, result.runs, index, files=series.files,
                     input_bytes=result.input_bytes, out_dir=out_dir,
                     output_bytes=_floor_output_bytes(result.output_bytes))
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  result.load_after = _load()
  print_small_tensors_report(session, result, count, checkpoints)
  return result


def print_small_tensors_report(session: Session, result: CaseResult,
                               count: int, checkpoints: int) -> None:
  """Markdown: the runs, the overhead beyond the import, legacy's outcome."""
  runs = result.runs
  print(f"\n### Case `small_tensors`: {checkpoints} checkpoints x {count} "
        f"float32 tensors of 1 KB ({_mb(result.input_bytes)} of input)\n")
  print(f"- tensors `layer_00000/kernel` ... `layer_{count - 1:05d}/kernel`, "
        f"{series_lib.SMALL_TENSOR_ELEMENTS} elements each, plus an int64 "
        "`global_step`; one `tf.raw_ops.SaveV2` per checkpoint")
  for row, (checkpoint, other) in result.output_bytes.items():
    print(f"- output size, {row}: {_mb(checkpoint)} (.data + .index)"
          + (f", plus {_mb(other)} in other files" if other else ""))
  _print_condition_lines(session, result.warm_s)
  _print_legacy_lines(runs, ["legacy"])
  print("- output verified: " + (" ".join(result.verdicts) or "not verified"))
  _print_load(result.load_before, result.load_after)
  print()
  rows = [r for r in TOOLS + FLOORS if r in runs.by_row]
  print_runs_table(runs, rows, session)
  ours = runs.median("t2t_avg", "wall_s")
  bare = runs.median("import_tf", "wall_s")
  overhead: Optional[float] = None
  per_tensor: Optional[float] = None
  per_tensor_label = "t2t_avg time beyond the import per tensor per checkpoint"
  if ours is not None and bare is not None:
    overhead = (ours - bare) / bare
    per_tensor = (ours - bare) / (count * checkpoints) * 1e6
    if ours < bare:  # TensorFlow not imported: the whole run, per tensor.
      per_tensor_label = "t2t_avg whole run per tensor per checkpoint"
      per_tensor = ours / (count * checkpoints) * 1e6
  _print_ratio_header()
  _print_target_row("wall beyond a bare import: (t2t_avg - import tf) / "
                    "import tf", overhead, SMALL_TENSORS_TARGET)
  print(f"| {per_tensor_label} (us) | {_fmt(per_tensor, '.1f')} | | |")
  legacy = runs.median("legacy", "wall_s")
  if legacy is not None and ours is not None:
    print(f"| wall: t2t_avg / legacy | {ours / legacy:.3f} | | |")
  if session.cold:
    print_cold_ratios(runs)
  if session.limited:
    print_limited_ratios(runs, session)
  print_durability_rows(runs)
  print_raw_runs(runs, rows, "case `small_tensors`")


def _print_legacy_lines(runs: Runs, rows: Sequence[str]) -> None:
  """One line per legacy row that did not finish every run."""
  for row in rows:
    failed = [r for r in runs.by_row.get(row, []) if not r.ok]
    if failed:
      print(f"- {row} ({len(failed)} of {len(runs.by_row[row])} runs did not "
            f"succeed): {_failure_line(failed[0])}")


# ----------------------------------------------------------------------------
# Case `max_shard`.


def _max_shard_dir(preset: Preset, checkpoints: int,
                   max_shard_bytes: int) -> str:
  return f"max_shard-{preset.name}-{max_shard_bytes}B-{checkpoints}x"


def ensure_max_shard(preset: Preset, checkpoints: int, seed: int,
                     max_shard_bytes: int) -> dict[str, Series]:
  """The cached TF2 series, {layout: series}, generated first if needed."""
  manifest = {"format": MAX_SHARD_FORMAT, "kind": "max_shard",
              "preset": dataclasses.asdict(preset),
              "checkpoints": checkpoints, "seed": seed,
              "max_shard_bytes": max_shard_bytes}
  prefixes = [f"{layout}/{series_lib.checkpoint_name(i)}"
              for layout in series_lib.LAYOUTS for i in range(checkpoints)]
  both = series_lib.ensure(
      _series_dir(_max_shard_dir(preset, checkpoints, max_shard_bytes)),
      manifest, prefixes,
      lambda partial: _run_worker(
          "generate_max_shard", "generating the TF2 series",
          directory=partial, preset=preset.name, checkpoints=checkpoints,
          seed=seed, max_shard_bytes=max_shard_bytes),
      f"{checkpoints} TF2 checkpoints of preset '{preset.name}', sliced and "
      "unsliced")
  return {layout: both.subset(layout) for layout in series_lib.LAYOUTS}


def bench_max_shard(session: Session, tools: Sequence[str], runs: int,
                    preset: Preset, checkpoints: int, seed: int,
                    max_shard_bytes: int) -> CaseResult:
  """TF2 checkpoints sliced by MaxShardSizePolicy vs unsliced."""
  name = "max_shard"
  print(f"\n=== {name} ===", flush=True)
  layouts = ensure_max_shard(preset, checkpoints, seed, max_shard_bytes)
  sliced = layouts["sliced"]
  result = CaseResult(name, Runs(name, runs), sliced.total_bytes,
                      load_before=_load())
  if not session.cold:
    files = [f for s in layouts.values() for f in s.files]
    result.warm_s = warm_page_cache(files, sum(s.total_bytes
                                               for s in layouts.values()))
  out_dir = os.path.join(_CACHE_DIR.value, f"out-{name}")
  _clear(out_dir)
  stopped: set[str] = set()
  contenders = [(f"{tool}_{layout}", tool, layouts[layout].prefixes)
                for layout in series_lib.LAYOUTS for tool in tools]
  try:
    for index in range(runs):
      _run_tools(session, result, index, contenders, out_dir, stopped)
      if index == 0:
        _verify_max_shard(result, out_dir)
      _clear(out_dir)
      written = (result.output_bytes.get("t2t_avg_unsliced") or
                 next(iter(result.output_bytes.values()), None))
      measure_floors(session, result.runs, index, files=sliced.files,
                     input_bytes=result.input_bytes, out_dir=out_dir,
                     output_bytes=written[0] if written else None)
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  result.load_after = _load()
  print_max_shard_report(session, result, layouts, preset, max_shard_bytes)
  return result


def _verify_max_shard(result: CaseResult, out_dir: str) -> None:
  """Sliced vs unsliced t2t_avg outputs; legacy's against t2t_avg's."""
  pairs = [("t2t_avg_unsliced", "t2t_avg_sliced")] + [
      (f"legacy_{layout}", f"t2t_avg_{layout}")
      for layout in series_lib.LAYOUTS]
  for reference, candidate in pairs:
    if reference in result.output_bytes and (
        candidate in result.output_bytes):
      correct, verdict = _compare(_output_prefix(out_dir, reference) + "-0",
                                  _output_prefix(out_dir, candidate) + "-0",
                                  (reference, candidate))
      _add_verdict(result, correct, f"{candidate} vs {reference}: {verdict}")


def _data_files(series: Series) -> list[int]:
  """Sizes of the first checkpoint's `.data-*` files."""
  return [os.path.getsize(f)
          for f in series_lib.checkpoint_files(series.prefixes[0])
          if ".data-" in f]


def print_max_shard_report(session: Session, result: CaseResult,
                           layouts: dict[str, Series], preset: Preset,
                           max_shard_bytes: int) -> None:
  """Markdown: sliced vs unsliced memory, legacy's outcome."""
  runs = result.runs
  print(f"\n### Case `max_shard`: preset `{preset.name}` saved by TF2 "
        f"`tf.train.Checkpoint.write`, {len(layouts['sliced'].prefixes)} "
        "checkpoints, sliced vs unsliced\n")
  for layout, series in layouts.items():
    shards = _data_files(series)
    how = (f"MaxShardSizePolicy(max_shard_size={max_shard_bytes / 2**20:g}"
           " MiB)"
           if layout == "sliced" else "default CheckpointOptions")
    print(f"- {layout}: {how}: {len(shards)} data file(s) per checkpoint ("
          + ", ".join(_mb(s) for s in shards) + f"); {_gb(series.total_bytes)}"
          " of input")
  for row, (checkpoint, other) in result.output_bytes.items():
    print(f"- output size, {row}: {_mb(checkpoint)} (.data + .index)"
          + (f", plus {_mb(other)} in other files" if other else ""))
  _print_condition_lines(session, result.warm_s)
  legacy_rows = [f"legacy_{layout}" for layout in series_lib.LAYOUTS]
  _print_legacy_lines(runs, legacy_rows)
  print("- outputs compared: " + (" ".join(result.verdicts) or
                                  "not compared"))
  print("- floors read the sliced series")
  _print_load(result.load_before, result.load_after)
  print()
  rows = [f"{tool}_{layout}" for layout in series_lib.LAYOUTS
          for tool in TOOLS] + list(FLOORS)
  rows = [r for r in rows if r in runs.by_row]
  print_runs_table(runs, rows, session)
  bare = runs.median("import_tf", "peak_rss_mib")
  excess: dict[str, Optional[float]] = {}
  for layout in series_lib.LAYOUTS:
    rss = runs.median(f"t2t_avg_{layout}", "peak_rss_mib")
    excess[layout] = None if rss is None or bare is None else rss - bare
  sliced_excess, unsliced_excess = excess["sliced"], excess["unsliced"]
  label = "excess peak RSS: t2t_avg sliced / unsliced"
  ratio = (sliced_excess / unsliced_excess
           if sliced_excess is not None and unsliced_excess is not None
           and unsliced_excess > 0 else None)
  if ratio is None and unsliced_excess is not None and bare is not None:
    # Both below a bare import (TensorFlow is not imported): the whole peaks.
    label = ("peak RSS: t2t_avg sliced / unsliced (both below a bare "
             "import; TensorFlow not imported)")
    ratio = (sliced_excess + bare) / (unsliced_excess + bare) if (
        sliced_excess is not None) else None
  _print_ratio_header()
  for layout in series_lib.LAYOUTS:
    print(f"| t2t_avg peak RSS above import tf, {layout} (MiB) | "
          f"{_fmt(excess[layout], '.0f')} | | |")
  _print_target_row(label, ratio, MAX_SHARD_TARGET)
  sliced_wall = runs.median("t2t_avg_sliced", "wall_s")
  unsliced_wall = runs.median("t2t_avg_unsliced", "wall_s")
  if sliced_wall is not None and unsliced_wall is not None:
    print(f"| wall: t2t_avg sliced / unsliced, for information | "
          f"{sliced_wall / unsliced_wall:.2f} | | |")
  if session.cold:
    print_cold_ratios(runs, tool_rows=("t2t_avg_unsliced", "t2t_avg_sliced"))
  print_durability_rows(runs)
  print_raw_runs(runs, rows, "case `max_shard`")


# ----------------------------------------------------------------------------
# Case `import_limit`.


def bench_import_limit(cold: bool, limits: Sequence[int], runs: int,
                       timeout_s: float) -> bool:
  """A bare `import tensorflow` under each memory limit; False if no limits."""
  print("\n=== import_limit ===", flush=True)
  table = []
  for limit_mb in limits:
    memory, problem = children.memory_limit(limit_mb)
    if memory is None:
      print(f"--case=import_limit needs a memory limit: {problem}. Skipped.")
      return False
    session = Session(children.Isolation(cold=cold, memory=memory,
                                         timeout_s=timeout_s))
    result = Runs(f"{limit_mb} MiB", runs)
    for index in range(runs):
      result.add("import_tf", session.measure(
          [_PYTHON.value, "-c", IMPORT_TF_MAIN],
          what=f"import tensorflow under {limit_mb} MiB"), index)
    table.append((limit_mb, result))
  print("\n### Least memory for a bare `import tensorflow`\n")
  print(f"- {'cold' if cold else 'warm'} page cache; one fresh memory cgroup "
        "per run, no swap; a run is killed after "
        f"{timeout_s:g} s")
  print()
  print("| limit (MiB) | outcome | median wall (s) | median peak RSS (MiB) | "
        "median cgroup peak (MiB) | runs |")
  print("|---:|---|---:|---:|---:|---:|")
  for limit_mb, result in table:
    print(f"| {limit_mb} | {result.outcome('import_tf')} | "
          f"{_fmt(result.shown_median('import_tf', 'wall_s'), '.2f')} | "
          f"{_fmt(result.shown_median('import_tf', 'peak_rss_mib'), '.0f')} | "
          f"{_fmt(result.shown_median('import_tf', 'cgroup_peak_mib'), '.0f')}"
          f" | {len(result.by_row['import_tf'])} |")
  return True


# ----------------------------------------------------------------------------
# Tables shared by the cases.


def print_runs_table(runs: Runs, rows: Sequence[str], session: Session) -> None:
  """Medians per row; an outcome (and cgroup peak) column when it matters."""
  outcome = session.limited or not runs.all_ok()
  cgroup = runs.has_cgroup_peaks()
  print("| run | median wall (s) | median CPU (s) | median peak RSS (MiB) "
        + ("| median cgroup peak (MiB) " if cgroup else "")
        + ("| outcome " if outcome else "") + "| runs |")
  print("|---|---:|---:|---:|" + ("---:|" if cgroup else "")
        + ("---|" if outcome else "") + "---:|")
  for row in rows:
    cells = [_fmt(runs.shown_median(row, "wall_s"), ".2f"),
             _fmt(runs.shown_median(row, "cpu_s"), ".2f"),
             _fmt(runs.shown_median(row, "peak_rss_mib"), ".0f")]
    if cgroup:
      cells.append(_fmt(runs.shown_median(row, "cgroup_peak_mib"), ".0f"))
    if outcome:
      cells.append(runs.outcome(row))
    print(f"| {_label(row)} | " + " | ".join(cells)
          + f" | {len(runs.by_row[row])} |")


def _label(row: str) -> str:
  if row in ROW_LABELS:
    return ROW_LABELS[row]
  tool, _, layout = row.rpartition("_")
  return f"{ROW_LABELS.get(tool, tool)}, {layout}"


def print_raw_runs(runs: Runs, rows: Sequence[str], title: str) -> None:
  print(f"\nRaw runs, {title} (in the order they ran within each round):\n")
  width = max(len(runs.by_row[r]) for r in rows)
  print("| run | " + " | ".join(
      f"#{i + 1} wall s / CPU s / RSS MiB" for i in range(width)) + " |")
  print("|---|" + "---:|" * width)
  for row in rows:
    cells = [f"{r.wall_s:.2f} / {r.cpu_s:.2f} / {r.peak_rss_mib:.0f}"
             + ("" if r.ok else f" ({r.outcome})") for r in runs.by_row[row]]
    cells += ["not run again"] * (width - len(cells))
    print(f"| {row} | " + " | ".join(cells) + " |")


def print_cold_ratios(runs: Runs,
                      tool_rows: Sequence[str] = ("t2t_avg", "legacy")) -> None:
  """Cold wall against the cold floors: import + cat of every input byte."""
  import_wall = runs.median("import_tf", "wall_s")
  cat_wall = runs.median("cat_inputs", "wall_s")
  for row in tool_rows:
    wall = runs.median(row, "wall_s")
    value = (wall / (import_wall + cat_wall)
             if wall is not None and import_wall is not None
             and cat_wall is not None else None)
    target = (f"<= {COLD_WALL_TARGET}" if row.startswith("t2t_avg")
              else "for information")
    print(f"| cold wall: {row} / (cold import tf + cold cat inputs) | "
          f"{_fmt(value, '.2f')} | {target} | "
          + (_verdict(value, COLD_WALL_TARGET)
             if row.startswith("t2t_avg") else "") + " |")


def print_limited_ratios(runs: Runs, session: Session) -> None:
  """Under a memory limit: t2t_avg's memory above a bare import, legacy."""
  memory = session.isolation.memory
  if memory is None:
    return  # No limit (callers check session.limited).
  limit = memory.limit_mb
  ours = runs.median("t2t_avg", "peak_rss_mib")
  bare = runs.median("import_tf", "peak_rss_mib")
  excess_mb = (None if ours is None or bare is None
               else (ours - bare) * 1.048576)
  _print_target_row(f"peak RSS above a bare import under {limit} MiB: "
                    "t2t_avg - import tf (MB)", excess_mb,
                    LIMITED_EXCESS_TARGET_MB, ".0f")
  wall = runs.median("t2t_avg", "wall_s")
  print(f"| t2t_avg wall under {limit} MiB (s) | {_fmt(wall, '.2f')} | | "
        f"{runs.outcome('t2t_avg') if 't2t_avg' in runs.by_row else 'n/a'} |")
  if "legacy" in runs.by_row:
    print(f"| legacy under {limit} MiB | {runs.outcome('legacy')} | | |")


def print_durability_rows(runs: Runs) -> None:
  """What fsync of the output (file and directory) costs, from the floors."""
  plain = runs.median("write_output", "wall_s")
  durable = runs.median("write_output_fsync", "wall_s")
  if None in (plain, durable):
    return
  inside = [float(r.stdout.split()[2]) for r in runs.by_row[
      "write_output_fsync"] if r.ok and len(r.stdout.split()) == 3]
  print(f"| write the output's bytes once, no fsync / with fsync of file + "
        f"directory: child wall (s) | {plain:.2f} / {durable:.2f} | | |")
  if inside:
    print(f"| what durability costs: the fsync calls alone, timed inside the "
          f"fsync floor (s) | {statistics.median(inside):.2f} | | |")


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f} GB"


def _mb(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _fmt(value: Optional[float], spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def _print_ratio_header() -> None:
  print()
  print("| ratio | value | target | verdict |")
  print("|---|---:|---:|---|")


def _print_target_row(label: str, value: Optional[float], target: float,
                      spec: str = ".2f") -> None:
  """A row of the ratio table whose value must be at most `target`."""
  print(f"| {label} | {_fmt(value, spec)} | <= {target} | "
        f"{_verdict(value, target)} |")


def _verdict(value: Optional[float], target: float) -> str:
  if value is None:
    return "n/a"
  return "PASS" if value <= target else "FAIL"


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


# ----------------------------------------------------------------------------
# Main.


def _isolation() -> Optional[children.Isolation]:
  """The measured children's conditions from the flags; None: skip all."""
  limit_mb = _MEMORY_LIMIT_MB.value
  cold = _COLD.value or (limit_mb is not None and not _COLD.present)
  if cold:
    problem = children.cold_cache_problem()
    if problem:
      print(f"--cold: {problem}; running with a warm page cache instead.")
      cold = False
  memory = None
  if limit_mb is not None:
    memory, problem = children.memory_limit(limit_mb)
    if memory is None:
      print(f"--memory_limit_mb: {problem}. Skipped: nothing measured.")
      return None
  return children.Isolation(cold=cold, memory=memory,
                            timeout_s=_TIMEOUT_S.value)


def _sizes(session: Session) -> list[str]:
  if _SIZE.value:
    return [_SIZE.value]
  if (session.cold or session.limited) and not _SIZES.present:
    return ["default"]
  return _SIZES.value


def _check_flags(tools: Sequence[str]) -> None:
  if not tools or set(_TOOLS.value) - set(TOOLS):
    raise app.UsageError(f"--tools takes a subset of {list(TOOLS)}")
  if "legacy" in tools and not os.path.isdir(
      os.path.join(_LEGACY_PATH.value, "tensor2tensor")):
    raise app.UsageError(f"no tensor2tensor in --legacy_path="
                         f"{_LEGACY_PATH.value}")
  unknown = [s for s in ([_SIZE.value] if _SIZE.value else _SIZES.value) +
             [_MAX_SHARD_PRESET.value] if s not in PRESETS]
  if unknown:
    raise app.UsageError(f"unknown size(s) {unknown}; presets: "
                         f"{sorted(PRESETS)}")


def run_sizes(session: Session, tools: Sequence[str]) -> list[SizeResult]:
  results = []
  for size in _sizes(session):
    result = bench_size(session, PRESETS[size], tools, _RUNS.value,
                        _CHECKPOINTS.value, _SEED.value)
    results.append(result)
    print_size_report(session, result)
    if not _KEEP_CACHE.value:
      shutil.rmtree(_series_dir(f"{size}-{_CHECKPOINTS.value}x"),
                    ignore_errors=True)
  if len(results) > 1:
    print_summary(results)
  return results


def _modes_argv(row: str, series: Series, events: dict[str, str],
                out_dir: str) -> list[str]:
  if row == "continuous":
    return [_PYTHON.value, "-m", "t2t_avg", f"--model_dir={series.directory}",
            f"--output_dir={out_dir}", f"--n={len(series.prefixes)}"]
  argv = _tool_argv("t2t_avg", series.prefixes, _output_prefix(out_dir, row))
  if row != "uniform":
    argv += ["--weighting=softmax", "--metric=loss",
             f"--metrics_from_events={events[row]}"]
  return argv


def bench_modes(session: Session, runs: int, preset: Preset,
                checkpoints: int, seed: int) -> CaseResult:
  """Uniform, weighted from events and continuous runs on the same series."""
  name = "modes"
  print(f"\n=== {name} ===", flush=True)
  series = ensure_series(preset, checkpoints, seed)
  events = {}
  for row, tf2 in (("softmax_tf1", False), ("softmax_tf2", True)):
    events[row] = _series_dir(f"events-{row}-{checkpoints}x")
    if not glob.glob(os.path.join(events[row], "*tfevents*")):
      _run_worker("generate_events", f"writing {row} events",
                  directory=events[row], checkpoints=checkpoints, tf2=tf2)
  result = CaseResult(name, Runs(name, runs), series.total_bytes,
                      load_before=_load())
  if not session.cold:
    result.warm_s = warm_page_cache(series.files, result.input_bytes)
  out_dir = os.path.join(_CACHE_DIR.value, f"out-{name}")
  rows = ("uniform", "softmax_tf1", "softmax_tf2", "continuous")
  try:
    for index in range(runs):
      for row in rows:
        _clear(out_dir)
        run = session.measure(_modes_argv(row, series, events, out_dir),
                              what=f"{row} ({name}, run {index + 1})")
        result.runs.add(row, run, index)
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  result.load_after = _load()
  print_modes_report(session, result, preset, checkpoints)
  return result


def print_modes_report(session: Session, result: CaseResult, preset: Preset,
                       checkpoints: int) -> None:
  """Markdown: each mode's medians, and its wall over the uniform run's."""
  runs = result.runs
  print(f"\n### Case `modes`: {checkpoints} checkpoints of preset "
        f"'{preset.name}' ({_mb(result.input_bytes)} of input)\n")
  _print_condition_lines(session, result.warm_s)
  _print_load(result.load_before, result.load_after)
  print()
  rows = list(runs.by_row)
  print_runs_table(runs, rows, session)
  uniform = runs.median("uniform", "wall_s")
  _print_ratio_header()
  for row in rows[1:]:
    wall = runs.median(row, "wall_s")
    ratio = None if wall is None or not uniform else wall / uniform
    if row == "continuous":
      print(f"| wall: {_label(row)} / uniform | {_fmt(ratio, '.3f')} | | |")
    else:
      _print_target_row(f"wall: {_label(row)} / uniform", ratio, MODES_TARGET)
  print_raw_runs(runs, rows, "case `modes`")


def run_case(session: Session, tools: Sequence[str]) -> bool:
  """Runs the chosen case; False if an output was wrong."""
  if _CASE.value == "sizes":
    results = run_sizes(session, tools)
    if any(r.identical is False for r in results):
      print("\nOUTPUTS DIFFER for at least one size: see above.",
            file=sys.stderr)
      return False
    return True
  if _CASE.value == "modes":
    bench_modes(session, _RUNS.value, PRESETS[_SIZE.value or "default"],
                _CHECKPOINTS.value, _SEED.value)
    return True
  if _CASE.value == "small_tensors":
    result = bench_small_tensors(session, tools, _RUNS.value,
                                 _SMALL_TENSORS.value, _CHECKPOINTS.value,
                                 _SEED.value)
    series = f"small_tensors-{_SMALL_TENSORS.value}-{_CHECKPOINTS.value}x"
  else:
    preset = PRESETS[_MAX_SHARD_PRESET.value]
    max_shard_bytes = int(_MAX_SHARD_MB.value * (1 << 20))
    result = bench_max_shard(session, tools, _RUNS.value, preset,
                             _CHECKPOINTS.value, _SEED.value, max_shard_bytes)
    series = _max_shard_dir(preset, _CHECKPOINTS.value, max_shard_bytes)
  if not _KEEP_CACHE.value:
    shutil.rmtree(_series_dir(series), ignore_errors=True)
  if result.correct is False:
    print("\nWRONG OUTPUT: see above.", file=sys.stderr)
    return False
  return True


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tools = [t for t in TOOLS if t in _TOOLS.value]
  _check_flags(tools if _CASE.value != "import_limit" else ["t2t_avg"])
  os.makedirs(_CACHE_DIR.value, exist_ok=True)
  print(f"Machine: {_describe_machine()}; interpreter {_PYTHON.value}")
  if _CASE.value == "import_limit":
    cold = (_COLD.value or not _COLD.present) and (
        children.cold_cache_problem() is None)
    bench_import_limit(cold, [int(x) for x in _IMPORT_LIMITS_MB.value],
                       _RUNS.value, _TIMEOUT_S.value)
    return 0
  isolation = _isolation()
  if isolation is None:
    return 0
  session = Session(isolation)
  print(f"Tools: {', '.join(tools)}; {_RUNS.value} run(s) each per size, "
        "alternating; peak RSS per child from os.wait4 (ru_maxrss).")
  for line in session.describe():
    print(f"Condition: {line}.")
  try:
    correct = run_case(session, tools)
  except ChildFailed as e:
    print(f"\n{e}", file=sys.stderr)
    print("\nStopped: a child process failed; the numbers above are "
          "incomplete.", file=sys.stderr)
    return 1
  parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  print(f"\nNote: this parent's peak RSS was {parent_rss:.0f} MiB; on Linux "
        "no child can report less (exec keeps the spawning process's "
        "high-water mark).")
  return 0 if correct else 1


if __name__ == "__main__":
  app.run(main)
