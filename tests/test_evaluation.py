"""Tests of t2t_avg.jobs.evaluation: real eval scripts run as the user's command."""
import json
import logging
import math
import os
import signal
import sys
import textwrap
import time

import pytest

from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.jobs.evaluation import evaluate, parse_score
from t2t_avg.options import EvalOptions

CANDIDATE = "model.ckpt-4000 alone"


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
  """A working directory holding `./python` (this interpreter), so commands
  are short enough to appear whole in error messages; the command inherits
  the working directory."""
  os.symlink(sys.executable, tmp_path / "python")
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _script(directory, body, name="eval.py"):
  (directory / name).write_text(textwrap.dedent(body))
  return name


def _printing(directory, stdout, stderr="", status=0):
  """A script writing exactly `stdout` and `stderr`, exiting with `status`."""
  return _script(directory, f"""
      import sys
      sys.stderr.write({stderr!r})
      sys.stdout.write({stdout!r})
      sys.exit({status})
      """)


def _evaluate(command, checkpoint="avg/model.ckpt-4000", timeout=None):
  return evaluate(EvalOptions(command, eval_timeout=timeout), checkpoint,
                  candidate=CANDIDATE)


@pytest.mark.parametrize("stdout, score", [
    ("0.8312\n", 0.8312),
    ("-1.5e-3", -1.5e-3),
    ("loading model\nstep 100 done\n27.4\n", 27.4),
    ("BLEU = 27.4\n", 27.4),
    ("accuracy: 0.83\n", 0.83),
    ("val_loss 0.41\n", 0.41),
    ("0.1\nBLEU = 31.5\n\n   \n\n", 31.5),
])
def test_score_is_read_from_the_last_non_empty_stdout_line(run_dir, stdout,
                                                           score):
  script = _printing(run_dir, stdout, stderr="warnings go here\n9.9\n")

  assert _evaluate(f"./python {script} {{checkpoint}}") == score


def test_success_logs_the_score_and_the_time_taken(run_dir, caplog):
  script = _printing(run_dir, "0.8312\n")

  with caplog.at_level(logging.INFO):
    _evaluate(f"./python {script} {{checkpoint}}")

  assert any(r.levelno == logging.INFO and
             r.getMessage().startswith(f"Eval score of {CANDIDATE}: 0.8312 (")
             and r.getMessage().endswith(" s)") for r in caplog.records)


@pytest.mark.parametrize("line, score", [
    ("0.8312", 0.8312), ("-1.5e-3", -1.5e-3), ("+3E2", 300.0), (".5", 0.5),
    ("27.", 27.0), ("  27.4  ", 27.4),
    ("BLEU = 27.4", 27.4), ("BLEU=27.4", 27.4), ("accuracy: 0.83", 0.83),
    ("eval/top-1:0.71", 0.71), ("val_loss 0.41", 0.41),
    ("_loss\t0.41", 0.41),
])
def test_parse_score_accepts_a_number_or_a_name_and_a_number(line, score):
  assert parse_score(line) == score


@pytest.mark.parametrize("line", [
    "", "done", "27.4%", "1 2", "BLEU = 27.4, 58.9/33.1", "= 27.4", ": 0.8",
    "loss is 0.41", "1loss 0.4", "0x1f", "1_000", "score = ", "BLEU == 27.4",
])
def test_parse_score_refuses_anything_else(line):
  assert parse_score(line) is None


@pytest.mark.parametrize("line",
                         ["nan", "NaN", "BLEU = nan", "inf", "-Infinity"])
def test_parse_score_reads_nan_and_infinities_for_the_caller_to_refuse(line):
  assert not math.isfinite(parse_score(line))


def test_nonzero_exit_is_one_line_naming_candidate_and_command(run_dir,
                                                                caplog):
  stderr = "".join(f"stderr line {i}\n" for i in range(30))
  script = _printing(run_dir, "0.5\n", stderr=stderr, status=3)
  command = f"./python {script} --checkpoint={{checkpoint}}"

  with caplog.at_level(logging.INFO):
    with pytest.raises(AveragingError) as error:
      _evaluate(command)

  assert str(error.value) == (f"eval command {command!r} failed on "
                              f"{CANDIDATE} (exit status 3)")
  logged = "\n".join(r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING)
  assert CANDIDATE in logged
  assert "stderr line 29" in logged and "stderr line 10" in logged
  assert "stderr line 9\n" not in logged  # only the last 20 lines


def test_a_command_killed_by_a_signal_says_which(run_dir):
  script = _script(run_dir, """
      import os, signal
      os.kill(os.getpid(), signal.SIGTERM)
      """)

  with pytest.raises(AveragingError, match=r"failed on model\.ckpt-4000 "
                     r"alone \(killed by SIGTERM\)$"):
    _evaluate(f"./python {script} {{checkpoint}}")


@pytest.mark.parametrize("stdout, detail", [
    ("BLEU = 27.4\ndone\n", "(last line: 'done')"),
    ("", "(no stdout)"),
    ("27.4%\n", "(last line: '27.4%')"),
])
def test_no_number_on_the_last_line_is_an_error(run_dir, stdout, detail):
  script = _printing(run_dir, stdout)
  command = f"./python {script} {{checkpoint}}"

  with pytest.raises(AveragingError) as error:
    _evaluate(command)

  assert str(error.value) == (f"eval command {command!r} printed no score on "
                              f"{CANDIDATE} {detail}")


@pytest.mark.parametrize("stdout, what", [
    ("BLEU = nan\n", "gave NaN on {candidate} (last line: 'BLEU = nan')"),
    ("NaN", "gave NaN on {candidate} (last line: 'NaN')"),
    ("-inf\n", "gave -inf on {candidate} (last line: '-inf')"),
])
def test_nan_or_infinite_score_is_an_error(run_dir, stdout, what):
  script = _printing(run_dir, stdout)
  command = f"./python {script} {{checkpoint}}"

  with pytest.raises(AveragingError) as error:
    _evaluate(command)

  assert str(error.value) == (f"eval command {command!r} "
                              + what.format(candidate=CANDIDATE))


def test_long_command_candidate_and_last_line_are_shortened(run_dir):
  script = _script(run_dir, f"print({'x' * 500!r})", name="e" * 100 + ".py")
  candidate = "the average of " + ", ".join(
      f"/long/training/directory/model.ckpt-{step}" for step in range(10))

  with pytest.raises(AveragingError) as error:
    evaluate(EvalOptions(f"./python {script} --checkpoint={{checkpoint}}"),
             "avg", candidate=candidate)

  message = str(error.value)
  assert "\n" not in message and len(message) <= 210, message
  assert message.startswith("eval command './python eeee")
  assert ("....py --checkpoint={checkpoint}' printed no score on the average "
          "of /long/") in message
  assert "/model.ckpt-9 (last line: 'xxxx" in message
  assert message.endswith("xxx')")


_SPAWNING_SLEEPER = """
    import subprocess, sys, time
    # A grandchild in the same process group: marks that it started, then
    # would mark that it survived. (The timeout leaves time for it to start.)
    subprocess.Popen([sys.executable, "-I", "-S", "-c",
                      "import time; open('started', 'w').close(); "
                      "time.sleep(2); open('survived', 'w').close()"])
    while True:
      time.sleep(0.05)
      try:
        open("started").close()
        break
      except OSError:
        pass
    print("loading model", file=sys.stderr, flush=True)
    time.sleep(60)
    """


def test_timeout_kills_the_whole_process_group_and_logs_stderr(run_dir,
                                                               caplog):
  script = _script(run_dir, _SPAWNING_SLEEPER)
  command = f"./python -I -S {script} {{checkpoint}}"

  started = time.monotonic()
  with caplog.at_level(logging.INFO):
    with pytest.raises(AveragingError) as error:
      _evaluate(command, timeout=1.5)
  assert time.monotonic() - started < 10

  assert error.value.message(as_flags=True) == (
      f"eval command {command!r} ran past --eval_timeout=1.5 seconds on "
      f"{CANDIDATE}")
  assert any(r.levelno == logging.ERROR and "loading model" in r.getMessage()
             for r in caplog.records)
  time.sleep(2.5)
  assert (run_dir / "started").exists()
  assert not (run_dir / "survived").exists()


def test_a_short_timeout_stops_a_sleeping_command(run_dir):
  script = _script(run_dir, "import time; time.sleep(60)")

  started = time.monotonic()
  with pytest.raises(AveragingError) as error:
    _evaluate(f"./python {script} {{checkpoint}}", timeout=0.5)
  assert "ran past --eval_timeout=0.5 " in error.value.message(as_flags=True)
  assert time.monotonic() - started < 10


def test_ctrl_c_kills_the_whole_process_group_and_is_reraised(run_dir):
  script = _script(run_dir, _SPAWNING_SLEEPER)

  def interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt

  # Ctrl-C as a signal handler delivers it: while the command runs.
  previous = signal.signal(signal.SIGALRM, interrupt)
  try:
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    with pytest.raises(KeyboardInterrupt):
      _evaluate(f"./python -I -S {script} {{checkpoint}}")
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)

  time.sleep(2.5)
  assert (run_dir / "started").exists()
  assert not (run_dir / "survived").exists()


def test_placeholder_is_replaced_inside_arguments_without_a_shell(run_dir):
  script = _script(run_dir, """
      import json, sys
      with open("argv.json", "w") as f:
        json.dump({"argv": sys.argv[1:], "stdin": sys.stdin.read()}, f)
      print(1.0)
      """)
  checkpoint = str(run_dir / "my run" / "avg.ckpt-5000")
  command = (f"./python {script} --checkpoint={{checkpoint}} {{checkpoint}} "
             "'two words' \"x={checkpoint}.index\" {step} $HOME '*' '|' a;b")

  assert _evaluate(command, checkpoint=checkpoint) == 1.0

  with open(run_dir / "argv.json") as f:
    seen = json.load(f)
  assert seen["argv"] == [f"--checkpoint={checkpoint}", checkpoint,
                          "two words", f"x={checkpoint}.index", "{step}",
                          "$HOME", "*", "|", "a;b"]
  assert seen["stdin"] == ""  # /dev/null, never the terminal


def test_a_shell_is_there_when_the_command_asks_for_one(run_dir):
  script = _printing(run_dir, "BLEU = 27.4\nnot a score\n")

  command = f"sh -c './python {script} {{checkpoint}} | head -n 1'"

  assert _evaluate(command) == 27.4


def test_a_program_that_cannot_start_is_one_line(run_dir):
  with pytest.raises(AveragingError) as error:
    _evaluate("./no_such_eval {checkpoint}")

  assert str(error.value) == (
      "eval command './no_such_eval {checkpoint}' cannot start on "
      f"{CANDIDATE}: No such file or directory: ./no_such_eval")


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_command": "python eval.py --checkpoint"},
     "eval_command must contain {checkpoint}, replaced by the path of each "
     "candidate average: python eval.py --checkpoint"),
    ({"eval_command": "python eval.py {ckpt} { checkpoint }"},
     "eval_command must contain {checkpoint}, replaced by the path of each "
     "candidate average: python eval.py {ckpt} { checkpoint }"),
    ({"eval_command": ""},
     "eval_command must contain {checkpoint}, replaced by the path of each "
     "candidate average: "),
    ({"eval_command": "python eval.py '{checkpoint}"},
     "eval_command cannot be split into arguments (No closing quotation): "
     "python eval.py '{checkpoint}"),
    ({"eval_command": "python eval.py {checkpoint} \\"},
     "eval_command cannot be split into arguments (No escaped character): "
     "python eval.py {checkpoint} \\"),
    ({"eval_command": "e {checkpoint}", "eval_timeout": 0},
     "eval_timeout must be a number of seconds > 0 (or none for no limit), "
     "not 0"),
    ({"eval_command": "e {checkpoint}", "eval_timeout": -1.5},
     "eval_timeout must be a number of seconds > 0 (or none for no limit), "
     "not -1.5"),
    ({"eval_command": "e {checkpoint}", "eval_timeout": math.nan},
     "eval_timeout must be a number of seconds > 0 (or none for no limit), "
     "not nan"),
    ({"eval_command": "e {checkpoint}", "eval_timeout": math.inf},
     "eval_timeout must be a number of seconds > 0 (or none for no limit), "
     "not inf"),
])
def test_eval_options_refuse_bad_arguments_naming_them(kwargs, message):
  with pytest.raises(ArgumentError) as error:
    EvalOptions(**kwargs)

  assert str(error.value) == message
  flag = next(iter(kwargs)) if len(kwargs) == 1 else "eval_timeout"
  assert error.value.message(as_flags=True) == message.replace(
      flag, "--" + flag, 1)


@pytest.mark.parametrize("command", [
    "python eval.py {checkpoint}", "python eval.py --checkpoint={checkpoint}",
    "sh -c 'python eval.py {checkpoint} | tail -n 1'",
    "python eval.py --out='{checkpoint}.json'",
])
def test_eval_options_accept_the_placeholder_anywhere_in_an_argument(command):
  assert EvalOptions(command, eval_timeout=30).eval_command == command
