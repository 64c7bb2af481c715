"""Time and peak memory of averaging large Keras 3 files (.weights.h5, .keras).

Usage (from the repository root, in its virtualenv):

  python scripts/bench_keras.py                # 4 files of ~0.5 GB each
  python scripts/bench_keras.py --files=8 --runs=3
  python scripts/bench_keras.py --case=callback   # the Keras callback
  python scripts/bench_keras.py --t2t_only     # the two t2t_avg rows only

Keras itself writes the inputs (cached in `.bench/keras/`): a model with a
32000x1024 embedding and a 1024-4096-1024 feed-forward block (41M
parameters), compiled with Adam, so every file holds the weights and both
Adam moments (about 0.5 GB; the largest dataset is 131 MB). Each file gets
its own random values. Every command runs in a child of its own, whose wall
time, CPU time (user, system) and peak RSS (`os.wait4`) are measured, next to two floors (`import
tensorflow`, and reading every input byte once from the page cache) and a
naive h5py script that sums the whole model in float64 in memory, as one
would by hand. Outputs are checked against that script's result, and the
.keras output's weights against the .weights.h5 output, byte for byte.
"""
import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".bench", "keras")

_NAIVE = """
import sys, h5py, numpy as np
paths, output = sys.argv[1:-1], sys.argv[-1]
totals = {}
for path in paths:
  with h5py.File(path, "r") as f:
    def add(name, item):
      if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
        value = item[()].astype(np.float64)
        totals[name] = totals[name] + value if name in totals else value
    f.visititems(add)
with h5py.File(output, "w") as out:
  for name, total in totals.items():
    out[name] = (total / len(paths)).astype(np.float32)
"""


def make_inputs(files: int) -> tuple[list[str], list[str]]:
  """The cached .weights.h5 and .keras inputs, written by Keras if missing."""
  weights = [os.path.join(CACHE, f"w-{i:02d}.weights.h5")
             for i in range(1, files + 1)]
  archives = [os.path.join(CACHE, f"m-{i:02d}.keras")
              for i in range(1, files + 1)]
  if all(os.path.exists(p) for p in weights + archives):
    return weights, archives
  os.makedirs(CACHE, exist_ok=True)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  tokens = keras.Input((16,), dtype="int32")
  x = keras.layers.Embedding(32000, 1024)(tokens)
  x = keras.layers.Dense(4096, activation="relu")(x)
  x = keras.layers.Dense(1024)(x)
  model = keras.Model(tokens, x)
  model.compile(keras.optimizers.Adam(1e-3), "mse")
  model.optimizer.build(model.trainable_variables)
  rng = np.random.default_rng(0)
  for w, m in zip(weights, archives):
    for variable in model.weights + model.optimizer.variables:
      if variable.dtype == "float32" and len(variable.shape):
        variable.assign(rng.standard_normal(variable.shape, np.float32))
    model.optimizer.iterations.assign(model.optimizer.iterations + 100)
    model.save_weights(w)
    model.save(m)
  return weights, archives


def run_child(argv: Sequence[str]) -> tuple[float, float, float, float]:
  """(wall s, user s, system s, peak RSS MiB) of one child, which must
  succeed."""
  with tempfile.TemporaryFile() as err:
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=err,
                            cwd=REPO, env=dict(os.environ,
                                               TF_CPP_MIN_LOG_LEVEL="3"))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
      err.seek(0)
      raise SystemExit(f"{argv[:4]} failed:\n{err.read().decode()[-2000:]}")
  return wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024.0


def _read_all(paths: Sequence[str]) -> None:
  for path in paths:
    with open(path, "rb") as f:
      while f.read(8 << 20):
        pass


def check_same(naive: str, ours: str) -> None:
  """Every float dataset of our output equals the naive script's."""
  import h5py  # pylint: disable=import-outside-toplevel
  with h5py.File(naive, "r") as a, h5py.File(ours, "r") as b:
    def same(name: str, item: object) -> None:
      if isinstance(item, h5py.Dataset):
        if item[()].tobytes() != b[name][()].tobytes():
          raise SystemExit(f"{name} differs from the naive average")
    a.visititems(same)


# The callback case: how an AverageCheckpoints configuration is made.
CALLBACK_CASES: dict[str, dict[str, Any]] = {
    "last_n=3, restore=False": {"last_n": 3, "restore": False},
    "last_n=3, restore=True": {"last_n": 3},
    "start_epoch=1 (running sum), restore=True": {"start_epoch": 1},
}
_EMBEDDING = (96000, 1024)  # 393 MB of float32


def _status_mib(field: str) -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  raise SystemExit(f"no {field} in /proc/self/status")


def callback_child(case: str, work: str) -> None:
  """Fits a ~400 MB model for 4 epochs with one AverageCheckpoints; prints
  (as JSON) the RSS when training ends, the peak RSS of the callback's
  on_train_end (VmHWM, reset just before: Linux's clear_refs 5), its
  seconds, and the model's bytes."""
  import json  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t2t_avg.keras import AverageCheckpoints  # pylint: disable=import-outside-toplevel
  tokens = keras.Input((4,), dtype="int32")
  model = keras.Model(tokens, keras.layers.Dense(16)(
      keras.layers.Embedding(*_EMBEDDING)(tokens)))
  model.compile(keras.optimizers.SGD(0.1), "mse")  # no optimizer slots
  marks: dict = {}

  class Mark(keras.callbacks.Callback):
    def on_train_end(self, logs: object = None) -> None:  # before the average
      marks["rss"] = _status_mib("VmRSS")
      with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
      marks["start"] = time.perf_counter()

  rng = np.random.default_rng(0)
  x = rng.integers(0, _EMBEDDING[0], (64, 4)).astype("int32")
  avg = AverageCheckpoints(os.path.join(work, "avg.weights.h5"),
                           **CALLBACK_CASES[case])
  model.fit(x, np.zeros((64, 4, 16), "float32"), epochs=4, batch_size=64,
            verbose=0, callbacks=[Mark(), avg])
  measured = {"rss": marks["rss"], "peak": _status_mib("VmHWM"),
              "seconds": time.perf_counter() - marks["start"],
              "model": sum(int(np.prod(w.shape)) * 4 for w in model.weights)}
  if not avg.settings.restore:  # Keras' own loading of the output, alone
    rss = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    start = time.perf_counter()
    model.load_weights(avg.output_path, objects_to_skip=[model.optimizer])
    measured["load"] = {"rss": rss, "peak": _status_mib("VmHWM"),
                        "seconds": time.perf_counter() - start}
  print(json.dumps(measured))


def callback_case() -> None:
  """The callback's averaging step on a ~400 MB model: its peak RSS above
  the process's RSS when training ends (model, TF and all)."""
  import json  # pylint: disable=import-outside-toplevel
  print("AverageCheckpoints on a model of a 96000x1024 embedding (SGD), 4 "
        "epochs; on_train_end measured in the training process:\n")
  print("| callback | model MiB | RSS at train end MiB | on_train_end peak "
        "above it MiB | on_train_end s |\n|---|---:|---:|---:|---:|")
  for case in CALLBACK_CASES:
    with tempfile.TemporaryDirectory(prefix="bench_callback.") as work:
      out = subprocess.run([sys.executable, __file__, f"--callback_child={case}",
                            f"--work={work}"], check=True, cwd=REPO,
                           capture_output=True, text=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    print(f"| {case} | {m['model'] / 2**20:.0f} | {m['rss']:.0f} | "
          f"{m['peak'] - m['rss']:.0f} | {m['seconds']:.2f} |")
    if "load" in m:
      load = m["load"]
      print(f"| (Keras' own model.load_weights of that output) | "
            f"{m['model'] / 2**20:.0f} | {load['rss']:.0f} | "
            f"{load['peak'] - load['rss']:.0f} | {load['seconds']:.2f} |")


def _arguments() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--files", type=int, default=4)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--t2t_only", action="store_true",
                      help="only the .weights.h5 and .keras runs (no floors, "
                      "no naive script), e.g. to compare two versions")
  parser.add_argument("--generate", action="store_true",
                      help="only write the inputs (the measuring parent runs "
                      "this in a child, so that it stays small)")
  parser.add_argument("--case", choices=("files", "callback"),
                      default="files", help="files: average Keras files "
                      "(the table above); callback: t2t_avg.keras."
                      "AverageCheckpoints' averaging step on a ~400 MB model")
  parser.add_argument("--callback_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--work", default="", help=argparse.SUPPRESS)
  return parser.parse_args()


def main() -> None:
  args = _arguments()
  if args.callback_child:
    callback_child(args.callback_child, args.work)
    return
  if args.case == "callback":
    callback_case()
    return
  if args.generate:
    make_inputs(args.files)
    return
  # A child's ru_maxrss starts from its parent's size at fork: Keras is
  # imported in a child of its own, never here.
  subprocess.run([sys.executable, __file__, "--generate",
                  f"--files={args.files}"], check=True)
  weights, archives = make_inputs(args.files)
  size = sum(os.path.getsize(p) for p in weights)
  out = tempfile.mkdtemp(prefix="bench_keras.")
  py = sys.executable
  commands: dict[str, list[str]] = {
      "import tensorflow (floor)": [py, "-c", "import tensorflow"],
      "read every input once (floor)": [
          py, "-c", f"import sys; sys.path.insert(0, {REPO!r}+'/scripts'); "
          f"import bench_keras; bench_keras._read_all({weights!r})"],
      "naive h5py script (float64 sum in RAM)": [
          py, "-c", _NAIVE, *weights, os.path.join(out, "naive.h5")],
      "t2t_avg .weights.h5": [
          py, "-m", "t2t_avg", f"--checkpoints={','.join(weights)}",
          f"--output_path={os.path.join(out, 'avg.weights.h5')}"],
      "t2t_avg .keras": [
          py, "-m", "t2t_avg", f"--checkpoints={','.join(archives)}",
          f"--output_path={os.path.join(out, 'avg.keras')}"],
  }
  if args.t2t_only:
    commands = {k: v for k, v in commands.items() if k.startswith("t2t_avg")}
  results: dict[str, list[tuple[float, ...]]] = {k: [] for k in commands}
  _read_all(weights + archives)  # warm the page cache
  for _ in range(args.runs):
    for label, argv in commands.items():
      for output in glob.glob(os.path.join(out, "avg*")):
        if output.endswith(".keras") == label.endswith(".keras"):
          os.remove(output)
      results[label].append(run_child(argv))
  if not args.t2t_only:
    check_same(os.path.join(out, "naive.h5"),
               os.path.join(out, "avg.weights.h5"))
  with zipfile.ZipFile(os.path.join(out, "avg.keras")) as archive, open(
      os.path.join(out, "avg.weights.h5"), "rb") as f:
    if archive.read("model.weights.h5") != f.read():
      raise SystemExit("the .keras output's weights differ from the "
                       ".weights.h5 output")
  print(f"{args.files} files of {size / args.files / 1e9:.2f} GB "
        f"(.weights.h5; .keras {os.path.getsize(archives[0]) / 1e9:.2f} GB), "
        f"{os.cpu_count()} CPU cores, warm page cache, median of "
        f"{args.runs} runs:\n")
  print_table(results)


def print_table(results: dict[str, list[tuple[float, ...]]]) -> None:
  """The medians of each command's runs, and the .keras / .weights.h5 ratio."""
  print("| command | wall s | user s | system s | peak RSS MiB |\n"
        "|---|---:|---:|---:|---:|")
  medians = {label: [statistics.median(m[i] for m in measured)
                     for i in range(4)]
             for label, measured in results.items()}
  for label, (wall, user, system, rss) in medians.items():
    print(f"| {label} | {wall:.2f} | {user:.2f} | {system:.2f} | {rss:.0f} |")
  ratio = medians["t2t_avg .keras"][0] / medians["t2t_avg .weights.h5"][0]
  print(f"\n.keras / .weights.h5 wall: {ratio:.2f}x")

if __name__ == "__main__":
  main()
