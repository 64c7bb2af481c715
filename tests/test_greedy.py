"""Greedy soups and the selection flags, end to end on a real small training run.

A Keras MLP (scripts/demo_weighting.py) trains for 600 steps, saving a TF2
checkpoint and logging its validation loss every 100 steps; the learning rate
jumps x10 after step 400, so the last two checkpoints degrade. The eval
command, `score.py`, prints a checkpoint's validation loss as `val_loss: <x>`
on its last stdout line.

Importing TensorFlow takes 4-8 s per process on a loaded 2-core machine, which
would make every evaluation that slow. So `score.py` imports only the standard
library: it appends its checkpoint to a log (the tests count the invocations)
and asks a scorer thread in this test process, where TensorFlow is loaded
once, to restore the checkpoint into the model with `tf.train.Checkpoint` and
compute the loss.

Every expectation is computed here, independently of t2t_avg: each
checkpoint's own score, each soup's score (the float64 mean of its
checkpoints' model variables, cast once to float32, set into the model and
scored the same way), and, replaying the greedy rule from those scores, which
candidates are kept.
"""
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Listener

import numpy as np
import pytest
import tensorflow as tf

import t2t_avg
from t2t_avg.jobs import oneshot
from t2t_avg import options
from t2t_avg.metrics import weighting
from t2t_avg.errors import ArgumentError, AveragingError

from conftest import (REPO, absl_messages, assert_same_values, call_cli,
                      error_line, float64_mean, load_script, read_checkpoint,
                      read_record, tree_fingerprint)

# 6 checkpoints at steps 100..600 (files ckpt-1..ckpt-6: TF2 numbers files by
# save count); the learning rate x10 after step 400.
RUN = dict(train_size=8000, eval_size=500, test_size=500, hidden=32,
           steps=600, save_every=100, spike_from=400, learning_rate=5e-3,
           spike_factor=10.0)
SPIKED = (500, 600)
TMP_MARK = ".t2t_avg-tmp"
AUTHKEY = b"t2t_avg tests"

SCORE_PY = """\
    \"\"\"Eval command: logs its checkpoint, prints the scorer's val_loss.\"\"\"
    import sys
    from multiprocessing.connection import Client

    log, checkpoint = sys.argv[1:]
    with open(log, "a", encoding="utf-8") as f:
      f.write(checkpoint + "\\n")
    print("scoring", checkpoint)  # earlier lines are the command's own
    with Client({address!r}, authkey={authkey!r}) as conn:
      conn.send(checkpoint)
      if not conn.poll(120):
        sys.exit("the scorer did not answer")
      status, value = conn.recv()
    if status != "ok":
      sys.exit("the scorer failed: " + value)
    print(f"val_loss: {{value!r}}")
    """


# --- The training run and its scores -------------------------------------

class Run:
  """The trained run: its checkpoints, steps, eval events and data."""

  def __init__(self, directory):
    self.demo = load_script("demo_weighting")
    self.cfg = self.demo.Config(**RUN)
    self.data = self.demo.make_data(self.cfg)
    self.directory = directory
    saved = self.demo.train(self.cfg, directory, self.data)
    self.prefixes = [prefix for prefix, _ in saved]
    self.steps = [step for _, step in saved]
    self.events = os.path.join(directory, "eval")
    self.logged = self.demo.eval_losses(self.events)  # {step: val loss}
    self._weights = {}
    self._lock = threading.Lock()

  def prefix(self, step):
    return self.prefixes[self.steps.index(step)]

  def weights(self, prefix):
    """The model's variables as TF restores them from a checkpoint."""
    if prefix not in self._weights:
      model = self.demo.build_model(self.cfg)
      tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
      self._weights[prefix] = [w.numpy() for w in model.weights]
    return self._weights[prefix]

  def mean(self, prefixes):
    """float64 sum in the given order, divided by n, cast once."""
    return [float64_mean(variable, variable[0].dtype)
            for variable in zip(*(self.weights(p) for p in prefixes))]

  def soup_score(self, prefixes):
    """The validation loss of the uniform average of `prefixes`."""
    import keras  # pylint: disable=import-outside-toplevel
    model = self.demo.build_model(self.cfg)
    model.set_weights(self.mean(prefixes))
    split = self.data["eval"]
    with self._lock:
      logits = model(split.x, training=False)
      return float(keras.losses.SparseCategoricalCrossentropy(
          from_logits=True)(split.y, logits))

  def checkpoint_score(self, prefix):
    """What the eval command prints: restore, then the validation loss."""
    with self._lock:
      return self.demo.evaluate(self.cfg, prefix, self.data["eval"])[0]


class Scorer:
  """Answers `score.py` from a thread of this process (see the docstring)."""

  def __init__(self, directory, score):
    self.address = os.path.join(directory, "scorer.sock")
    self.script = os.path.join(directory, "score.py")
    with open(self.script, "w", encoding="utf-8") as f:
      f.write(textwrap.dedent(SCORE_PY.format(address=self.address,
                                              authkey=AUTHKEY)))
    self._score = score
    self._listener = Listener(self.address, family="AF_UNIX",
                              authkey=AUTHKEY)
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    while True:
      try:
        conn = self._listener.accept()
      except OSError:  # Closed.
        return
      with conn:
        try:
          checkpoint = conn.recv()
        except (EOFError, OSError):  # The command was killed meanwhile.
          continue
        try:
          reply = ("ok", self._score(checkpoint))
        except Exception as e:  # pylint: disable=broad-except
          reply = ("error", repr(e))
        try:
          conn.send(reply)
        except OSError:
          pass

  def command(self, log):
    """The eval command, logging each checkpoint it scores to `log`."""
    return shlex.join([sys.executable, self.script, str(log)]) + (
        " {checkpoint}")

  def close(self):
    self._listener.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  trained = Run(str(tmp_path_factory.mktemp("spike") / "train"))
  assert trained.steps == [100, 200, 300, 400, 500, 600]
  # The story every test here relies on: the spike degrades the last two.
  logged = trained.logged
  assert min(logged[s] for s in SPIKED) > max(logged[300], logged[400]), (
      logged)
  return trained


@pytest.fixture(scope="module")
def scorer(run, tmp_path_factory):
  directory = tmp_path_factory.mktemp("scorer")
  assert len(str(directory)) < 90, "too long for a Unix socket address"
  serving = Scorer(str(directory), run.checkpoint_score)
  yield serving
  serving.close()


# --- Helpers --------------------------------------------------------------

def _cli(*args, cwd):
  """`python -m t2t_avg` of this worktree, run in `cwd` (in this process)."""
  return call_cli(*args, cwd=cwd)


def _settings(output_path, *, checkpoints=(), prefix="", num_last=0,
              dry_run=False, eval_command=None, eval_timeout=None,
              min_step=None, max_step=None, stride=1, select="last",
              **weighting):
  """The settings `python -m t2t_avg` builds from the same flags."""
  return options.OneShotSettings(
      options.InputOptions(checkpoints=tuple(checkpoints), prefix=prefix,
                           num_last_checkpoints=num_last),
      options.OutputOptions(output_path=str(output_path), dry_run=dry_run),
      weighting=options.WeightingOptions(**weighting),
      selection=options.SelectionOptions(min_step=min_step,
                                           max_step=max_step, stride=stride,
                                           select=select),
      evaluation=None if eval_command is None else options.EvalOptions(
          eval_command, eval_timeout))


def _calls(log):
  """The checkpoints the eval command was run on, in order."""
  if not os.path.exists(log):
    return []
  with open(log, encoding="utf-8") as f:
    return f.read().splitlines()


def _leftovers(directory):
  """t2t_avg's temporary files or directories anywhere below `directory`."""
  return [os.path.join(root, name)
          for root, dirs, files in os.walk(directory)
          for name in dirs + files if name.startswith(TMP_MARK)]


def _best_first(scores, steps):
  """Indices, best (lowest) score first; ties to the newer step."""
  return sorted(range(len(scores)), key=lambda i: (scores[i], -steps[i]))


def _replay(prefixes, own, soup_score, start_score, tolerance=0.0):
  """The greedy rule (lower is better), from our own scores.

  Returns:
    [(candidate index, soup score with it, kept)] in trial order.
  """
  order = _best_first(own, list(range(len(own))))
  soup, score = [order[0]], start_score
  rows = [(order[0], score, True)]
  for i in order[1:]:
    with_it = soup_score([prefixes[j] for j in sorted(soup + [i])])
    kept = with_it <= score + tolerance
    if kept:
      soup.append(i)
      score = with_it
    rows.append((i, with_it, kept))
  return rows


def _soup_log_line(name, own, soup, kept):
  return (f"Greedy soup: {name} (own score {own:g}): soup with it {soup:g}, "
          f"{'kept' if kept else 'rejected'}")


# --- The greedy soup, step by step ------------------------------------------

def test_greedy_soup_follows_the_rule_step_by_step_and_averages_the_kept(
    run, scorer, tmp_path):
  out = tmp_path / "out"
  log = tmp_path / "calls.log"
  result = _cli(f"--prefix={run.directory}/ckpt", "--num_last_checkpoints=4",
                "--weighting=greedy", f"--eval_command={scorer.command(log)}",
                "--metric=val_loss", f"--output_path={out}/soup.ckpt",
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]

  candidates = run.prefixes[-4:]  # steps 300..600
  own = [run.soup_score([p]) for p in candidates]
  steps = run.steps[-4:]
  best = _best_first(own, steps)[0]
  expected = _replay(candidates, own, run.soup_score, own[best])

  # Each checkpoint alone, oldest first, then one soup per further candidate.
  calls = _calls(log)
  assert calls[:4] == candidates
  assert len(calls) == 4 + 3
  assert all(c.startswith(f"{out}/{TMP_MARK}.candidates.") for c in calls[4:])

  # The record: every step, in trial order, with both scores.
  output = f"{out}/soup.ckpt-0"
  record = read_record(output)
  rows = record["weighting"]["soup"]
  assert record["weighting"]["scheme"] == "greedy"
  assert record["weighting"]["mode"] == "min"
  assert [r["candidate"] for r in rows] == [candidates[i] for i, _, _ in
                                             expected]
  assert [r["own_score"] for r in rows] == pytest.approx(
      [own[i] for i, _, _ in expected], rel=1e-6)
  assert [r["soup_score"] for r in rows] == pytest.approx(
      [score for _, score, _ in expected], rel=1e-6)
  assert [r["kept"] for r in rows] == [kept for _, _, kept in expected]

  # What this run shows: the degraded checkpoints are left out, and the soup
  # is more than the best checkpoint alone.
  kept = sorted(i for i, _, k in expected if k)
  assert not {steps[i] for i in kept} & set(SPIKED)
  assert len(kept) >= 2

  # The output: exactly the uniform average of the kept checkpoints.
  kept_prefixes = [candidates[i] for i in kept]
  assert [r["path"] for r in record["inputs"]] == kept_prefixes
  reference = t2t_avg.average_checkpoints(kept_prefixes,
                                          str(tmp_path / "ref" / "ref.ckpt"))
  assert_same_values(read_checkpoint(output),
                     read_checkpoint(reference.output_path))
  restored = run.weights(output)
  for got, want in zip(restored, run.mean(kept_prefixes)):
    assert got.tobytes() == want.tobytes()

  # Every step a line in the log, then the outcome.
  messages = absl_messages(result.stderr)
  for r in rows:
    line = _soup_log_line(os.path.basename(r["candidate"]), r["own_score"],
                          r["soup_score"], r["kept"])
    assert line in messages, line
  final = [r["soup_score"] for r in rows if r["kept"]][-1]
  names = ", ".join(os.path.basename(p) for p in kept_prefixes)
  assert (f"The greedy soup keeps {len(kept)} of 4 candidates (score "
          f"{final:g}): {names}") in messages
  assert _leftovers(tmp_path) == []


def test_own_scores_from_events_order_the_soup_and_score_the_best_once(
    run, scorer, tmp_path, caplog):
  # Step 100 is worse than 400 but better than the spiked 500 and 600: the
  # order follows the logged loss, not the steps.
  candidates = [run.prefix(s) for s in (100, 400, 500, 600)]
  steps = [100, 400, 500, 600]
  logged = [run.logged[s] for s in steps]
  order = _best_first(logged, steps)
  best = order[0]
  log = tmp_path / "calls.log"
  with caplog.at_level(logging.INFO):
    result = oneshot.run(_settings(
        tmp_path / "out" / "soup.ckpt", checkpoints=candidates,
        weighting="greedy", metrics_from_events=(run.events,), metric="loss",
        eval_command=scorer.command(log)))

  # The best by the logged metric is scored alone by the command, once; then
  # one soup per further candidate.
  calls = _calls(log)
  assert calls[0] == candidates[best]
  assert len(calls) == 4
  assert all(f"/{TMP_MARK}.candidates." in c for c in calls[1:])

  rows = result.record["weighting"]["soup"]
  assert [r["candidate"] for r in rows] == [candidates[i] for i in order]
  assert [r["own_score"] for r in rows] == [logged[i] for i in order]
  start = run.soup_score([candidates[best]])  # the command's, not the logged
  assert rows[0]["soup_score"] == pytest.approx(start, rel=1e-6)
  expected = _replay(candidates, logged, run.soup_score, start)
  assert [r["soup_score"] for r in rows] == pytest.approx(
      [score for _, score, _ in expected], rel=1e-6)
  assert [r["kept"] for r in rows] == [kept for _, _, kept in expected]

  # Here no average scores as well as the best checkpoint alone: the log
  # says so, and the output is that checkpoint's (a uniform "average" of 1).
  assert [kept for _, _, kept in expected] == [True, False, False, False]
  messages = [r.getMessage() for r in caplog.records]
  assert (f"The greedy soup kept only the best single checkpoint, "
          f"{os.path.basename(candidates[best])}: no average scored at least "
          "as well as it") in messages
  assert [m.split(":")[0] for m in messages if m.startswith("Evaluation ")] \
      == [f"Evaluation {k} of at most 4" for k in range(1, 5)]
  assert [r.path for r in result.rows] == [candidates[best]]
  reference = t2t_avg.average_checkpoints([candidates[best]],
                                          str(tmp_path / "ref" / "ref.ckpt"))
  assert_same_values(read_checkpoint(result.output_path),
                     read_checkpoint(reference.output_path))
  # And, independently of t2t_avg: what TF restores is the best checkpoint's.
  for got, want in zip(run.weights(result.output_path),
                       run.weights(candidates[best]), strict=True):
    assert got.tobytes() == want.tobytes()
  assert _leftovers(tmp_path) == []


def test_greedy_tolerance_keeps_a_slightly_worse_soup_with_events(
    run, scorer, tmp_path):
  # The soup of the best two scores a little worse than the best alone: a
  # tolerance just above that gap keeps the second, and the soup goes on
  # from the worse score.
  steps = [100, 400, 500, 600]
  candidates = [run.prefix(s) for s in steps]
  logged = [run.logged[s] for s in steps]
  first, second = _best_first(logged, steps)[:2]
  start = run.soup_score([candidates[first]])
  gap = run.soup_score([candidates[i] for i in sorted([first, second])]) - (
      start)
  assert gap > 0
  tolerance = 1.01 * gap
  log = tmp_path / "calls.log"
  result = oneshot.run(_settings(
      tmp_path / "out" / "soup.ckpt", checkpoints=candidates,
      weighting="greedy", metrics_from_events=(run.events,), metric="loss",
      greedy_tolerance=tolerance, eval_command=scorer.command(log)))

  weighting = result.record["weighting"]
  assert weighting["tolerance"] == tolerance
  expected = _replay(candidates, logged, run.soup_score, start, tolerance)
  assert [r["soup_score"] for r in weighting["soup"]] == pytest.approx(
      [score for _, score, _ in expected], rel=1e-6)
  assert [r["kept"] for r in weighting["soup"]] == [
      kept for _, _, kept in expected]
  assert weighting["soup"][1]["kept"]
  assert len(_calls(log)) == 4


def test_greedy_has_no_weight_formula_and_the_weighting_module_says_so():
  # Its weights come from evaluations; compute_weights refuses the scheme
  # with an argument error rather than failing on a missing formula.
  assert "greedy" not in weighting.SCHEMES
  with pytest.raises(ArgumentError, match="not 'greedy'"):
    weighting.compute_weights([1.0, 2.0], scheme="greedy", mode="min")


# --- Dry run ------------------------------------------------------------------

def test_dry_run_prints_the_order_only_runs_no_command_writes_nothing(
    run, scorer, tmp_path):
  log = tmp_path / "calls.log"
  out = tmp_path / "never"
  result = _cli(f"--prefix={run.directory}/ckpt", "--num_last_checkpoints=4",
                "--weighting=greedy", f"--eval_command={scorer.command(log)}",
                f"--metrics_from_events={run.events}", "--metric=loss",
                f"--output_path={out}/soup.ckpt", "--dry_run", cwd=tmp_path)

  assert result.returncode == 0, result.stderr[-3000:]
  candidates, steps = run.prefixes[-4:], run.steps[-4:]
  order = _best_first([run.logged[s] for s in steps], steps)
  lines = result.stdout.strip().splitlines()
  assert lines[0].split() == ["checkpoint", "step", "metric", "weight"]
  # No weights: which candidates the soup keeps is not known yet.
  assert [line.split() for line in lines[1:5]] == [
      [p, str(s), f"{run.logged[s]:.6g}", "-"]
      for p, s in zip(candidates, steps)]
  assert lines[5:] == [
      "greedy soup: the weights are known only after evaluating; output: "
      f"{out}/soup.ckpt-0",
      "greedy soup order (best first): " +
      ", ".join(candidates[i] for i in order)]
  assert _calls(log) == []
  assert not out.exists()
  assert not any(m.startswith("Eval score") for m in absl_messages(result.stderr))


def test_dry_run_without_events_says_each_checkpoint_is_scored_first(
    run, scorer, tmp_path):
  log = tmp_path / "calls.log"
  result = oneshot.run(_settings(
      tmp_path / "never" / "soup.ckpt", prefix=f"{run.directory}/ckpt",
      num_last=4, dry_run=True, weighting="greedy", metric="val_loss",
      eval_command=scorer.command(log)))

  assert result.record["weighting"]["order"] == (
      "each of the 4 checkpoints scored alone by --eval_command, then tried "
      "best first")
  assert not result.written
  assert _calls(log) == []
  assert not (tmp_path / "never").exists()


# --- Failures leave no candidates behind ------------------------------------

FAILING_SH = """\
    case "$1" in
      *.t2t_avg-tmp.*)
        echo "restoring $1" >&2
        echo "RuntimeError: out of memory" >&2
        exit 3;;
    esac
    echo "val_loss: 1"
    """


def _soup_start(run, steps):
  """Basenames of the best two by the logged loss, in index order: the
  first average the soup tries."""
  order = _best_first([run.logged[s] for s in steps], steps)
  return ", ".join(os.path.basename(run.prefix(steps[i]))
                   for i in sorted(order[:2]))


def test_a_failing_command_is_one_line_its_stderr_logged_no_candidates_left(
    run, tmp_path):
  (tmp_path / "fail.sh").write_text(textwrap.dedent(FAILING_SH))
  out = tmp_path / "out"
  result = _cli(f"--prefix={run.directory}/ckpt", "--num_last_checkpoints=4",
                "--weighting=greedy", "--eval_command=sh fail.sh {checkpoint}",
                f"--metrics_from_events={run.events}", "--metric=loss",
                f"--output_path={out}/soup.ckpt", cwd=tmp_path)

  average = f"the average of {_soup_start(run, run.steps[-4:])}"
  assert error_line(result) == (
      "t2t_avg: error: eval command 'sh fail.sh {checkpoint}' failed on "
      f"{average} (exit status 3)")
  messages = absl_messages(result.stderr)
  assert (f"Last 2 lines of the eval command's stderr on {average}:" in
          messages)
  assert "RuntimeError: out of memory" in result.stderr.splitlines()
  assert _leftovers(tmp_path) == []
  assert not out.exists()  # Not even the directory it would have made.


HANGING_SH = """\
    case "$1" in
      *.t2t_avg-tmp.*)
        sleep 300 &
        echo "$$ $!" > pids.tmp && mv pids.tmp pids
        wait;;
    esac
    echo "val_loss: 1"
    """


def _gone(pid):
  """Whether a process has ended (a zombie no one reaped counts as ended)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True


def test_ctrl_c_while_the_command_runs_kills_it_and_leaves_no_candidates(
    run, tmp_path):
  (tmp_path / "hang.sh").write_text(textwrap.dedent(HANGING_SH))
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
             TF_ENABLE_ONEDNN_OPTS="0")
  proc = subprocess.Popen(
      [sys.executable, "-m", "t2t_avg", f"--prefix={run.directory}/ckpt",
       "--num_last_checkpoints=4", "--weighting=greedy",
       "--eval_command=sh hang.sh {checkpoint}",
       f"--metrics_from_events={run.events}", "--metric=loss",
       f"--output_path={out}/soup.ckpt"], cwd=tmp_path, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not (tmp_path / "pids").exists():
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.monotonic() < deadline, "the soup never started"
      time.sleep(0.1)
    # A candidate average is being scored: the temporary files exist.
    assert _leftovers(out)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches t2t_avg, not the command
    _, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()

  assert proc.returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1] == (
      "t2t_avg: error: interrupted; nothing was written")
  assert _leftovers(tmp_path) == []
  assert not out.exists()  # Not even the directory it would have made.
  pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
  deadline = time.monotonic() + 10
  while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert all(_gone(p) for p in pids), "the eval command's group survived"


@pytest.mark.parametrize("script, timeout, problem", [
    pytest.param('echo "accuracy: 83%"', None,
                 "printed no score on ckpt-3 alone (last line: "
                 "'accuracy: 83%')", id="no-number"),
    pytest.param('echo "val_loss: nan"', None,
                 "gave NaN on ckpt-3 alone (last line: 'val_loss: nan')",
                 id="nan"),
    pytest.param("exec sleep 30", 0.5,
                 "ran past --eval_timeout=0.5 seconds on ckpt-3 alone",
                 id="timeout"),
])
def test_an_eval_that_gives_no_score_is_one_line_and_leaves_nothing(
    run, tmp_path, monkeypatch, script, timeout, problem):
  (tmp_path / "eval.sh").write_text(script + "\n")
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "out"
  with pytest.raises(AveragingError) as error:
    oneshot.run(_settings(
        out / "greedy" / "soup.ckpt",
        checkpoints=[run.prefix(300), run.prefix(400)],
        weighting="greedy", metric="val_loss",
        eval_command="sh eval.sh {checkpoint}", eval_timeout=timeout))

  assert error.value.message(as_flags=True) == (
      f"eval command 'sh eval.sh {{checkpoint}}' {problem}")
  assert _leftovers(tmp_path) == []
  assert not out.exists()  # Not even the directory it would have made.


# --- Argument errors: one line, before TensorFlow loads ---------------------

@pytest.mark.parametrize("flags, line", [
    (["--weighting=greedy"], "--weighting=greedy needs --eval_command"),
    (["--eval_command=python eval.py {checkpoint}"],
     "--eval_command: say whether a higher or a lower score is better, with "
     "--metric_mode=max|min (or name the score with --metric, e.g. "
     "--metric=bleu)"),
    (["--greedy_tolerance=0.01"],
     "--greedy_tolerance goes with --weighting=greedy"),
    (["--eval_timeout=60"], "--eval_timeout goes with --eval_command"),
    (["--select=best_window", "--metrics_from_events=eval"],
     "--select=best_window chooses from --prefix's directory; it does not go "
     "with --checkpoints"),
    (["--prefix=train/", "--num_last_checkpoints=4", "--select=best_window"],
     "--select=best_window needs --metrics_from_events"),
    (["--model_dir=train", "--output_dir=avg", "--weighting=greedy"],
     "--weighting=greedy is for one-shot averaging: it evaluates many "
     "candidates per output"),
    (["--model_dir=train", "--output_dir=avg", "--min_step=1000"],
     "--min_step is for one-shot averaging; it does not go with --model_dir"),
    (["--model_dir=train", "--output_dir=avg", "--select=best_window"],
     "--select is for one-shot averaging; it does not go with --model_dir"),
], ids=["greedy-without-command", "command-without-direction",
        "tolerance-without-greedy", "timeout-without-command",
        "best-window-with-checkpoints", "best-window-without-events",
        "continuous-greedy", "continuous-min-step", "continuous-best-window"])
def test_argument_errors_are_one_line(tmp_path, flags, line):
  if not any(f.startswith(("--prefix", "--model_dir")) for f in flags):
    flags = ["--checkpoints=train/model.ckpt-100"] + flags
  result = _cli(*flags, cwd=tmp_path)
  assert error_line(result) == f"t2t_avg: error: {line}"


def test_bounds_that_leave_nothing_are_an_error(run, tmp_path):
  with pytest.raises(AveragingError) as error:
    oneshot.run(_settings(tmp_path / "out" / "avg.ckpt",
                          prefix=f"{run.directory}/ckpt", num_last=2,
                          min_step=700))
  assert error.value.message(as_flags=True) == (
      "no checkpoint has a step within --min_step=700 (the steps run from 100 "
      "to 600)")
  assert not (tmp_path / "out").exists()


# --- --eval_command with another weighting ----------------------------------

def test_eval_command_scores_a_softmax_average_beside_uniform_and_best(
    run, scorer, tmp_path, caplog):
  log = tmp_path / "calls.log"
  with caplog.at_level(logging.INFO):
    result = oneshot.run(_settings(
        tmp_path / "out" / "soft.ckpt", prefix=f"{run.directory}/ckpt",
        num_last=4, weighting="softmax", metrics_from_events=(run.events,),
        metric="loss", eval_command=scorer.command(log)))

  candidates, steps = run.prefixes[-4:], run.steps[-4:]
  best = candidates[_best_first([run.logged[s] for s in steps], steps)[0]]
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("Eval scores")]
  assert len(lines) == 1
  match = re.fullmatch(
      r"Eval scores \(lower is better\): this softmax average (\S+); uniform "
      rf"average (\S+); best logged single checkpoint, {re.escape(best)} "
      r"(\S+)", lines[0])
  assert match, lines[0]
  got = [float(g) for g in match.groups()]
  want = [run.checkpoint_score(result.output_path),
          run.soup_score(candidates), run.soup_score([best])]
  assert got == pytest.approx(want, rel=1e-5)
  calls = _calls(log)
  assert calls[0] == result.output_path and calls[2] == best
  assert f"/{TMP_MARK}.candidates." in calls[1] and len(calls) == 3
  assert _leftovers(tmp_path) == []


# --- Selection flags on TF checkpoints --------------------------------------

def _best_window_steps(run, pool, n):
  """The n consecutive steps of `pool` ending at the lowest logged loss."""
  values = [run.logged[s] for s in pool]
  best = _best_first(values, pool)[0]
  return pool[max(0, best - n + 1):best + 1]


@pytest.mark.parametrize("flags, expected", [
    (dict(num_last=4, min_step=200, max_step=500), [200, 300, 400, 500]),
    (dict(num_last=3, stride=2), [200, 400, 600]),
    (dict(num_last=2, max_step=500, stride=2), [300, 500]),
    (dict(num_last=9, min_step=300), [300, 400, 500, 600]),
    (dict(num_last=3, select="best_window"), "best_window"),
    (dict(checkpoints="all", min_step=300, stride=2), [400, 600]),
], ids=["bounds-then-last-4", "stride-2-last-3", "max-step-stride-last-2",
        "fewer-than-n", "best-window-3", "checkpoints-bounds-stride"])
def test_selection_flags_choose_these_checkpoints(run, tmp_path, flags,
                                                  expected):
  if expected == "best_window":
    expected = _best_window_steps(run, run.steps, 3)
    flags = dict(flags, metrics_from_events=(run.events,))
  if flags.get("checkpoints") == "all":
    flags = dict(flags, checkpoints=run.prefixes)
  else:
    flags = dict(flags, prefix=f"{run.directory}/ckpt")
  result = oneshot.run(_settings(tmp_path / "avg.ckpt", **flags))

  record = read_record(result.output_path)
  assert [r["path"] for r in record["inputs"]] == [run.prefix(s)
                                                   for s in expected]
  assert [r["step"] for r in record["inputs"]] == expected


def test_best_window_does_not_warn_that_the_metric_goes_unused(run, tmp_path,
                                                              caplog):
  # The metric chose the window: "read and shown, but --weighting=uniform
  # does not use it" would be false.
  with caplog.at_level(logging.INFO):
    oneshot.run(_settings(tmp_path / "avg.ckpt", prefix=f"{run.directory}/ckpt",
                          num_last=3, select="best_window",
                          metrics_from_events=(run.events,)))
  assert [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING] == []


def test_selection_flags_on_the_command_line(run, tmp_path):
  out = tmp_path / "out"
  result = _cli(f"--prefix={run.directory}/ckpt", "--num_last_checkpoints=2",
                "--max_step=500", "--stride=2", "--select=best_window",
                f"--metrics_from_events={run.events}",
                f"--output_path={out}/avg.ckpt", cwd=tmp_path)

  assert result.returncode == 0, result.stderr[-3000:]
  strided = [500, 300, 100][::-1]  # <= 500, every 2nd back from the newest
  expected = _best_window_steps(run, strided, 2)
  record = read_record(f"{out}/avg.ckpt-0")
  assert [r["path"] for r in record["inputs"]] == [run.prefix(s)
                                                   for s in expected]
  messages = absl_messages(result.stderr)
  assert "--max_step=500 leaves 5 of 6 checkpoints" in messages
  assert "--stride=2 leaves 3 of 5 checkpoints" in messages


def test_continuous_max_step_and_stride_average_windows_k_apart(run,
                                                                tmp_path):
  out = tmp_path / "avg"
  # In continuous mode a checkpoint's number is the one in its name, as for
  # --min_steps: ckpt-1..ckpt-6 here.
  result = _cli(f"--model_dir={run.directory}", f"--output_dir={out}",
                "--n=2", "--stride=2", "--max_step=5", cwd=tmp_path)

  assert result.returncode == 0, result.stderr[-3000:]
  written = sorted(n[:-len(".index")] for n in os.listdir(out)
                   if n.endswith(".index"))
  assert written == ["model.ckpt-3", "model.ckpt-4", "model.ckpt-5"]
  for newest in (3, 4, 5):
    record = read_record(f"{out}/model.ckpt-{newest}")
    assert [r["path"] for r in record["inputs"]] == [
        f"{run.directory}/ckpt-{newest - 2}", f"{run.directory}/ckpt-{newest}"]
    assert record["output_step"] == newest
  assert f"{run.directory}/ckpt-6 is above --max_step=5; done" in absl_messages(
      result.stderr)


# --- The README's selection commands, on testdata/ ---------------------------

TESTDATA_TRAIN = os.path.join(REPO, "testdata", "train")
BLEU = "metrics-translate_ende_wmt32k/targets/approx_bleu_score"


@pytest.mark.parametrize("args, output, steps", [
    (["--prefix=testdata/train/", "--num_last_checkpoints=2",
      "--min_step=2000", "--max_step=4000", "--stride=2",
      "--output_path={out}/strided.ckpt"], "strided.ckpt-0", [2000, 4000]),
    (["--prefix=testdata/train/", "--num_last_checkpoints=3",
      "--select=best_window", "--metrics_from_events=testdata/train/eval",
      f"--metric={BLEU}", "--output_path={out}/best_window.ckpt"],
     "best_window.ckpt-0", [2000, 3000, 4000]),
], ids=["bounds-stride", "best-window"])
def test_readme_selection_commands_average_what_the_readme_says(
    tmp_path, args, output, steps):
  before = tree_fingerprint(TESTDATA_TRAIN)
  result = _cli(*[a.format(out=tmp_path) for a in args], cwd=REPO)

  assert result.returncode == 0, result.stderr[-3000:]
  record = read_record(str(tmp_path / output))
  assert [r["path"] for r in record["inputs"]] == [
      os.path.join(TESTDATA_TRAIN, f"model.ckpt-{s}") for s in steps]
  assert tree_fingerprint(TESTDATA_TRAIN) == before


def test_readme_continuous_stride_command_averages_what_the_readme_says(
    tmp_path):
  out = tmp_path / "strided"
  result = _cli("--model_dir=testdata/train", f"--output_dir={out}", "--n=2",
                "--stride=2", "--max_step=4000", cwd=REPO)

  assert result.returncode == 0, result.stderr[-3000:]
  for newest, older in ((3000, 1000), (4000, 2000)):
    record = read_record(f"{out}/model.ckpt-{newest}")
    assert [r["step"] for r in record["inputs"]] == [older, newest]
  assert not (out / "model.ckpt-5000.index").exists()


# --- Selection flags on Keras weights files -----------------------------------

def test_selection_flags_on_keras_weights_files(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(1)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  model.compile(optimizer="adam", loss="mse")
  x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
  model.fit(x, x[:, :3], epochs=4, batch_size=16, verbose=0, callbacks=[
      keras.callbacks.ModelCheckpoint(
          str(tmp_path / "w-{epoch:02d}.weights.h5"), save_weights_only=True)])
  files = [str(tmp_path / f"w-{e:02d}.weights.h5") for e in range(1, 5)]

  # Whatever step each file gets (see the README), the bounds are given in it.
  table = _cli(f"--checkpoints={','.join(files)}",
               f"--output_path={tmp_path}/all.weights.h5", "--dry_run",
               cwd=tmp_path)
  assert table.returncode == 0, table.stderr[-3000:]
  steps = [int(line.split()[1]) for line in table.stdout.splitlines()[1:5]]
  assert steps == sorted(steps)
  out = tmp_path / "out"
  result = _cli(f"--checkpoints={','.join(files)}", f"--min_step={steps[1]}",
                f"--max_step={steps[3]}", "--stride=2",
                f"--output_path={out}/avg.weights.h5", cwd=tmp_path)

  assert result.returncode == 0, result.stderr[-3000:]
  records = [n for n in os.listdir(out) if n.endswith(".t2t_avg.json")]
  assert len(records) == 1
  with open(out / records[0], encoding="utf-8") as f:
    record = json.load(f)
  assert [r["path"] for r in record["inputs"]] == [files[1], files[3]]
