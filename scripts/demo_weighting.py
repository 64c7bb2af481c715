"""Does weighting checkpoints by their eval metric help? Two small training runs, measured.

Usage (from the repository root, in its virtualenv; about a minute on 2 CPU cores):

  python scripts/demo_weighting.py             # prints two markdown tables
  python scripts/demo_weighting.py --cli       # the same, averaging through `python -m t2t_avg`

A Keras MLP learns a synthetic classification task (fixed seeds, one CPU
thread, deterministic ops). Every `save_every` steps training saves a TF2
`tf.train.Checkpoint(model=..., optimizer=...)` and evaluates on a validation
split, writing `loss` and `accuracy` with `tf.summary.scalar` into `eval/` at
the optimizer's step, as an evaluator beside training would. t2t_avg reads
each checkpoint's step from the optimizer's iteration counter and matches the
eval to it.

Run 1 has a late instability: the learning rate jumps for the last few
checkpoints, which degrade. Run 2 is the same run without the jump. For each,
the last N checkpoints are averaged uniformly and with each metric weighting
(weighted by the validation `loss`), each average is restored into a fresh
model with `tf.train.Checkpoint(model=...).restore(...).expect_partial()`, and
everything is evaluated on a separate test split, which nothing was chosen
or weighted by.

The functions are importable (tests train a smaller run with them).
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional
from collections.abc import Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC = "loss"
SCHEMES: tuple[tuple[str, dict[str, int]], ...] = (
    ("softmax", {}), ("proportional", {}), ("rank", {}),
           ("top_k", {"top_k": 3}))


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run. The defaults are the README's demo."""
  seed: int = 7
  features: int = 16
  classes: int = 6
  hidden: int = 64
  train_size: int = 40000  # about one pass: no overfitting
  eval_size: int = 1000  # validation: logged as events, weighted by
  test_size: int = 4000  # held out: only for the tables
  label_noise: float = 0.1
  batch_size: int = 32
  learning_rate: float = 2e-3
  steps: int = 2400
  save_every: int = 150
  spike_from: Optional[int] = None  # learning rate * spike_factor from here
  spike_factor: float = 30.0


@dataclasses.dataclass(frozen=True)
class Split:
  x: np.ndarray
  y: np.ndarray


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a table."""
  label: str
  loss: float
  accuracy: float
  effective_count: float


def make_data(cfg: Config) -> dict:
  """Train/eval/test splits labelled by a random teacher network, with noise."""
  rng = np.random.default_rng(cfg.seed)
  w1 = rng.standard_normal((cfg.features, 32)) / np.sqrt(cfg.features)
  w2 = rng.standard_normal((32, cfg.classes)) / np.sqrt(32)
  splits = {}
  for name, size in (("train", cfg.train_size), ("eval", cfg.eval_size),
                     ("test", cfg.test_size)):
    x = rng.standard_normal((size, cfg.features)).astype(np.float32)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    flip = rng.random(size) < cfg.label_noise
    y[flip] = rng.integers(0, cfg.classes, int(flip.sum()))
    splits[name] = Split(x, y.astype(np.int32))
  return splits


def build_model(cfg: Config) -> Any:
  """The MLP, built (so a checkpoint restores into it at once)."""
  import keras  # pylint: disable=import-outside-toplevel
  return keras.Sequential([
      keras.Input((cfg.features,)),
      keras.layers.Dense(cfg.hidden, activation="relu"),
      keras.layers.Dense(cfg.hidden, activation="relu"),
      keras.layers.Dense(cfg.classes),
  ])


def _loss_and_accuracy(model: Any, split: Split) -> tuple[float, float]:
  """Mean cross-entropy and accuracy on a split."""
  import keras  # pylint: disable=import-outside-toplevel
  logits = model(split.x, training=False)
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      split.y, logits)
  accuracy = np.mean(np.argmax(np.asarray(logits), axis=1) == split.y)
  return float(loss), float(accuracy)


def train(cfg: Config, run_dir: str, data: dict) -> list:
  """Trains, saving a checkpoint and an eval every `save_every` steps.

  Returns:
    (checkpoint prefix, step) of each save, oldest first. TF2 numbers the
    files by save count (`<run_dir>/ckpt-<count>`), not by step.
  """
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(cfg.seed)
  model = build_model(cfg)
  optimizer = keras.optimizers.Adam(cfg.learning_rate)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  writer = tf.summary.create_file_writer(os.path.join(run_dir, "eval"))

  @tf.function(reduce_retracing=True)
  def train_step(x: Any, y: Any) -> Any:
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

  rng = np.random.default_rng(cfg.seed + 1)
  train_split = data["train"]
  order = np.empty(0, np.int64)
  saved = []
  for step in range(1, cfg.steps + 1):
    if cfg.spike_from is not None and step == cfg.spike_from + 1:
      optimizer.learning_rate.assign(cfg.learning_rate * cfg.spike_factor)
    if len(order) < cfg.batch_size:
      order = np.concatenate([order, rng.permutation(len(train_split.y))])
    batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
    train_step(train_split.x[batch], train_split.y[batch])
    if step % cfg.save_every == 0:
      global_step = int(optimizer.iterations)
      saved.append((checkpoint.save(os.path.join(run_dir, "ckpt")),
                    global_step))
      loss, accuracy = _loss_and_accuracy(model, data["eval"])
      with writer.as_default():
        tf.summary.scalar("loss", loss, step=global_step)
        tf.summary.scalar("accuracy", accuracy, step=global_step)
  writer.close()
  return saved


def evaluate(cfg: Config, prefix: str, split: Split) -> tuple[float, float]:
  """(loss, accuracy) of a checkpoint restored into a fresh model."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  model = build_model(cfg)
  status = tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
  status.assert_existing_objects_matched()  # every model variable restored
  return _loss_and_accuracy(model, split)


def cli_args(prefixes: Sequence[str], output_path: str, scheme: str,
             events_dir: str, top_k: int = 0) -> list:
  """The `python -m t2t_avg` flags for one average."""
  args = [f"--checkpoints={','.join(prefixes)}", f"--output_path={output_path}"]
  if scheme != "uniform":
    args += [f"--weighting={scheme}", f"--metrics_from_events={events_dir}",
             f"--metric={METRIC}"]
  if top_k:
    args.append(f"--top_k={top_k}")
  return args


def average(prefixes: Sequence[str], output_path: str, scheme: str,
            events_dir: str, *, top_k: int = 0,
            use_cli: bool = False) -> tuple[str, dict]:
  """Averages with t2t_avg; returns (output prefix, its JSON record)."""
  if use_cli:
    args = cli_args(prefixes, output_path, scheme, events_dir, top_k)
    subprocess.run([sys.executable, "-m", "t2t_avg", *args], check=True,
                   capture_output=True, text=True)
    output = f"{output_path}-0"
    with open(output + ".t2t_avg.json", encoding="utf-8") as f:
      return output, json.load(f)
  # pylint: disable-next=import-outside-toplevel
  from t2t_avg import options
  from t2t_avg.jobs import oneshot
  result = oneshot.run(options.OneShotSettings(
      options.InputOptions(checkpoints=tuple(prefixes)),
      options.OutputOptions(output_path=output_path),
      weighting=options.WeightingOptions(
          weighting=scheme, metric=METRIC, top_k=top_k,
          metrics_from_events=(events_dir,) if scheme != "uniform" else ())))
  return result.output_path, result.record


def eval_losses(events_dir: str) -> dict:
  """{step: validation loss} as logged."""
  from t2t_avg.metrics import events  # pylint: disable=import-outside-toplevel
  return {p.step: p.value for p in events.read_metric([events_dir], METRIC)}


def compare(cfg: Config, run_dir: str, saved: Sequence[tuple], data: dict, *,
            n: int, use_cli: bool = False) -> list:
  """Rows: best and last single checkpoints, then each average of the last n."""
  last = [prefix for prefix, _ in saved[-n:]]
  steps = [step for _, step in saved[-n:]]
  events_dir = os.path.join(run_dir, "eval")
  logged = eval_losses(events_dir)
  best = min(range(n), key=lambda i: (logged[steps[i]], -steps[i]))
  rows = [
      Row(f"best single checkpoint (step {steps[best]}, lowest eval loss)",
          *evaluate(cfg, last[best], data["test"]), 1.0),
      Row(f"last checkpoint (step {steps[-1]})",
          *evaluate(cfg, last[-1], data["test"]), 1.0),
  ]
  for scheme, options in (("uniform", {}),) + SCHEMES:
    output, record = average(
        last, os.path.join(run_dir, "avg", scheme, "averaged.ckpt"), scheme,
        events_dir, use_cli=use_cli, **options)
    label = {"uniform": "uniform average",
             "top_k": f"top_k (k={options.get('top_k')})"}.get(scheme, scheme)
    if scheme == "softmax":
      label = (f"softmax (T = std of the eval losses = "
               f"{record['weighting']['temperature']:.3f})")
    rows.append(Row(label, *evaluate(cfg, output, data["test"]),
                    record["effective_count"]))
  return rows


def markdown_table(title: str, rows: Sequence[Row]) -> str:
  lines = [f"**{title}**", "",
           "| checkpoint(s) | test loss | test accuracy | effective n |",
           "|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r.label} | {r.loss:.4f} | {100 * r.accuracy:.2f}% | "
                 f"{r.effective_count:.2f} |")
  return "\n".join(lines)


def run_demo(work_dir: str, *, n: int = 8, use_cli: bool = False,
             base: Config = Config()) -> list:
  """Both runs; returns [(title, rows)]."""
  spike_from = base.steps - 3 * base.save_every
  runs = [
      (f"Run 1: learning rate x{base.spike_factor:g} after step {spike_from} "
       f"(the last 3 checkpoints degrade); last {n} of "
       f"{base.steps // base.save_every} checkpoints",
       dataclasses.replace(base, spike_from=spike_from), "spike"),
      (f"Run 2: the same run, steady; last {n} of "
       f"{base.steps // base.save_every} checkpoints", base, "steady"),
  ]
  tables = []
  for title, cfg, name in runs:
    data = make_data(cfg)
    run_dir = os.path.join(work_dir, name)
    saved = train(cfg, run_dir, data)
    tables.append((title, compare(cfg, run_dir, saved, data, n=n,
                                  use_cli=use_cli)))
  return tables


def configure_tensorflow() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.experimental.enable_op_determinism()


def print_tables(run: Callable[[str], list], work_dir: str) -> float:
  """Runs a demo in `work_dir` (or a scratch directory) and prints its tables.

  Returns:
    When it started (`time.monotonic()`), for the closing timing line.
  """
  configure_tensorflow()
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  start = time.monotonic()
  with tempfile.TemporaryDirectory() as scratch:
    tables = run(work_dir or scratch)
  for title, rows in tables:
    print(markdown_table(title, rows))
    print()
  return start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=8,
                      help="how many of the last checkpoints to average")
  parser.add_argument("--cli", action="store_true",
                      help="average through `python -m t2t_avg` subprocesses "
                      "instead of t2t_avg.jobs.oneshot.run (slower, same numbers)")
  parser.add_argument("--work_dir", default="",
                      help="where the runs go (default: a temporary "
                      "directory, removed afterwards)")
  args = parser.parse_args()
  start = print_tables(lambda work_dir: run_demo(work_dir, n=args.n,
                                                 use_cli=args.cli),
                       args.work_dir)
  command = "python scripts/demo_weighting.py" + (
      "" if args.n == 8 else f" --n={args.n}")
  example = shlex.join(["python", "-m", "t2t_avg"] + cli_args(
      ["spike/ckpt-9", "...", "spike/ckpt-16"], "avg/averaged.ckpt",
      "softmax", "spike/eval"))
  print(f"Reproduce with `{command}`. Each average is of the last {args.n} "
        "checkpoints, weighted by the validation loss logged at their steps, "
        f"e.g. `{example}`; losses and accuracies are on a separate test "
        "split.")
  print(f"{time.monotonic() - start:.0f} s on {os.cpu_count()} CPU cores",
        file=sys.stderr)

if __name__ == "__main__":
  main()
