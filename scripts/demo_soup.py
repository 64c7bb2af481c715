"""Does a greedy soup help? The runs of demo_weighting.py, averaged by evaluation too.

Usage (from the repository root, in its virtualenv; about 3 minutes on 2 CPU
cores, most of it TensorFlow starting in each of the 30 evaluations):

  python scripts/demo_soup.py          # prints two markdown tables

The two training runs of `scripts/demo_weighting.py` (fixed seeds, one CPU
thread, deterministic ops, so the numbers repeat): a Keras MLP saving a TF2
checkpoint and logging its validation loss every 150 steps; in run 1 the
learning rate jumps x30 for the last 3 checkpoints, run 2 is steady. Of the
last 8 checkpoints, each table shows the held-out test loss and accuracy of:
the best single checkpoint by the logged validation loss, the last one, the
uniform average, softmax and top_k weighting by the logged validation loss,
and the greedy soup of `python -m t2t_avg --weighting=greedy`, whose eval
command (an `eval_val.py` this script writes beside the runs) restores a
candidate into the model and prints its validation loss as `val_loss: <x>`.
Nothing is chosen or weighted by the test split.
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

import demo_weighting as demo

N = 8
EVAL_SCRIPT = """\
\"\"\"The demo's eval command: a checkpoint's validation loss, its last line.\"\"\"
import sys

sys.path.insert(0, {scripts!r})
import demo_weighting as demo

demo.configure_tensorflow()  # one CPU thread, deterministic ops
cfg = demo.Config(**{config!r})
loss, accuracy = demo.evaluate(cfg, sys.argv[1], demo.make_data(cfg)["eval"])
print(f"val_accuracy: {{accuracy!r}}")
print(f"val_loss: {{loss!r}}")
"""


def write_eval_script(cfg: demo.Config, path: str) -> str:
  """Writes the eval command's script for runs of `cfg`; returns its path."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(EVAL_SCRIPT.format(scripts=os.path.dirname(os.path.abspath(__file__)),
                               config=dataclasses.asdict(cfg)))
  return path


def greedy_args(prefixes: Sequence[str], output_path: str,
                eval_command: str) -> list[str]:
  """The `python -m t2t_avg` flags of the greedy soup."""
  return [f"--checkpoints={','.join(prefixes)}", "--weighting=greedy",
          f"--eval_command={eval_command}", "--metric=val_loss",
          f"--output_path={output_path}"]


def greedy_soup(cfg: demo.Config, run_dir: str, prefixes: Sequence[str],
                data: dict) -> demo.Row:
  """The greedy soup of `prefixes` by validation loss, on the test split."""
  script = write_eval_script(cfg, os.path.join(run_dir, "eval_val.py"))
  command = shlex.join([sys.executable, script]) + " {checkpoint}"
  output_path = os.path.join(run_dir, "avg", "greedy", "averaged.ckpt")
  result = subprocess.run(
      [sys.executable, "-m", "t2t_avg",
       *greedy_args(prefixes, output_path, command)],
      capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"the greedy soup failed:\n{result.stderr[-3000:]}")
  output = f"{output_path}-0"
  with open(output + ".t2t_avg.json", encoding="utf-8") as f:
    record = json.load(f)
  kept = [r["step"] for r in record["inputs"]]
  label = (f"greedy soup (by validation loss): {len(kept)} of {len(prefixes)} "
           f"kept, steps {', '.join(str(s) for s in kept)}")
  return demo.Row(label, *demo.evaluate(cfg, output, data["test"]),
                  record["effective_count"])


def run_demo(work_dir: str, *, n: int = N,
             base: demo.Config = demo.Config()) -> list[tuple[str, list]]:
  """Both runs; returns [(title, rows)]."""
  spike_from = base.steps - 3 * base.save_every
  count = base.steps // base.save_every
  runs = [
      (f"Run 1: learning rate x{base.spike_factor:g} after step {spike_from} "
       f"(the last 3 checkpoints degrade); last {n} of {count} checkpoints",
       dataclasses.replace(base, spike_from=spike_from), "spike"),
      (f"Run 2: the same run, steady; last {n} of {count} checkpoints", base,
       "steady"),
  ]
  tables = []
  for title, cfg, name in runs:
    data = demo.make_data(cfg)
    run_dir = os.path.join(work_dir, name)
    saved = demo.train(cfg, run_dir, data)
    rows = [r for r in demo.compare(cfg, run_dir, saved, data, n=n)
            if not r.label.startswith(("proportional", "rank"))]
    rows.append(greedy_soup(cfg, run_dir, [p for p, _ in saved[-n:]], data))
    tables.append((title, rows))
  return tables


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", default="",
                      help="where the runs go (default: a temporary "
                      "directory, removed afterwards)")
  args = parser.parse_args()
  start = demo.print_tables(run_demo, args.work_dir)
  example = shlex.join(["python", "-m", "t2t_avg"] + greedy_args(
      ["spike/ckpt-9", "...", "spike/ckpt-16"], "avg/greedy.ckpt",
      "python eval_val.py {checkpoint}"))
  print("Reproduce with `python scripts/demo_soup.py`. Each average is of the "
        f"last {N} checkpoints; the greedy soup is `{example}`, whose eval "
        "command prints the validation loss; losses and accuracies here are "
        "on a separate test split.")
  print(f"{time.monotonic() - start:.0f} s on {os.cpu_count()} CPU cores",
        file=sys.stderr)


if __name__ == "__main__":
  main()
