"""Averages with legacy T2T avg_checkpoints and with t2t_avg, then compares the two outputs.

For users who still have tensor2tensor (1.15.7) installed, or a directory
holding it (`pip install --no-deps --target DIR tensor2tensor==1.15.7 six`):

  python scripts/compare_with_legacy.py --checkpoints=a,b,c \\
      [--prefix=... | --num_last_checkpoints=N] [--legacy_pythonpath=DIR]

Both tools get the same avg_checkpoints flags and write into a temporary
directory (or --work_dir, kept). The report is `python -m t2t_avg.compare
<t2t_avg output> <legacy output>` (legacy is the reference), and so is the
exit status: 0 same within tolerance, 1 different, 2 unusable input or a
failed averaging run. Legacy averaged and truncated integer variables while
t2t_avg copies them from the newest checkpoint, so those differ by design;
they count only with --strict.
"""
import importlib.util
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_PROGRAM = "compare_with_legacy"
_EXIT_UNUSABLE = 2

_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "", "Comma-separated list of checkpoints to average "
    "(legacy avg_checkpoints flag).")
_NUM_LAST = flags.DEFINE_integer(
    "num_last_checkpoints", 0, "Averages the last N saved checkpoints "
    "(legacy avg_checkpoints flag).")
_PREFIX = flags.DEFINE_string(
    "prefix", "", "Prefix prepended to each checkpoint (legacy "
    "avg_checkpoints flag).")
_LEGACY_PYTHONPATH = flags.DEFINE_string(
    "legacy_pythonpath", "", "Directory holding the tensor2tensor package, "
    "put on PYTHONPATH for the legacy run only. Empty: tensor2tensor must be "
    "importable as is.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", "", "Where the two outputs go (kept). Empty: a temporary "
    "directory, removed afterwards.")
_ATOL = flags.DEFINE_float("atol", 0.0, "Passed to the compare.",
                           lower_bound=0.0)
_RTOL = flags.DEFINE_float("rtol", 0.0, "Passed to the compare.",
                           lower_bound=0.0)
_STRICT = flags.DEFINE_boolean(
    "strict", False, "Passed to the compare: non-float differences count.")
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "Passed to the compare: list every variable.")

# As in the spec: legacy runs on TF 2.x once v2 behaviour is disabled.
_LEGACY_MAIN = """
import tensorflow.compat.v1 as tf
tf.disable_v2_behavior()
from absl import app
from tensor2tensor.utils import avg_checkpoints
app.run(avg_checkpoints.main)
"""


class _RunFailed(Exception):
  """A child run that failed; the message says which and why."""


def _averaging_flags() -> list:
  """The avg_checkpoints flags given, passed the same to both tools."""
  given = []
  if _CHECKPOINTS.value:
    given.append(f"--checkpoints={_CHECKPOINTS.value}")
  if _PREFIX.value:
    given.append(f"--prefix={_PREFIX.value}")
  if _NUM_LAST.value:
    given.append(f"--num_last_checkpoints={_NUM_LAST.value}")
  return given


def _legacy_environment() -> dict:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  directory = _LEGACY_PYTHONPATH.value
  if directory:
    if not os.path.isdir(os.path.join(directory, "tensor2tensor")):
      raise _RunFailed(f"--legacy_pythonpath={directory} holds no "
                       "tensor2tensor package")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.abspath(directory), env.get("PYTHONPATH")) if p)
  elif importlib.util.find_spec("tensor2tensor") is None:
    raise _RunFailed("tensor2tensor is not importable: install "
                     "tensor2tensor==1.15.7 (pip install --no-deps --target "
                     "DIR tensor2tensor==1.15.7 six) and pass "
                     "--legacy_pythonpath=DIR")
  return env


def _run(what: str, command: list, env: dict) -> None:
  """Runs one averaging child; its stderr is shown only when it fails."""
  result = subprocess.run(command, capture_output=True, text=True, env=env,
                          check=False)
  if result.returncode:
    sys.stderr.write("\n".join(result.stderr.splitlines()[-20:]) + "\n")
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise _RunFailed(f"{what} failed with exit status {result.returncode}: "
                     f"{last}")


def _average_and_compare(work_dir: str) -> int:
  legacy_output = os.path.join(work_dir, "legacy", "averaged.ckpt")
  ours_output = os.path.join(work_dir, "t2t_avg", "averaged.ckpt")
  averaging = _averaging_flags()
  legacy_env = _legacy_environment()
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # t2t_avg first: its errors about the inputs are the clearer ones.
  _run("t2t_avg", [sys.executable, "-m", "t2t_avg", *averaging,
                   f"--output_path={ours_output}"], env)
  _run("legacy avg_checkpoints",
       [sys.executable, "-c", _LEGACY_MAIN, *averaging,
        f"--output_path={legacy_output}"], legacy_env)
  print(f"legacy avg_checkpoints: {legacy_output}-0", flush=True)
  print(f"t2t_avg:                {ours_output}-0", flush=True)
  compare = [sys.executable, "-m", "t2t_avg.compare",
             f"{ours_output}-0", f"{legacy_output}-0",
             f"--atol={_ATOL.value!r}", f"--rtol={_RTOL.value!r}"]
  if _STRICT.value:
    compare.append("--strict")
  if _VERBOSE.value:
    compare.append("--verbose")
  # The compare's report and errors go straight to our stdout and stderr.
  return subprocess.run(compare, env=env, check=False).returncode


def main(argv: list) -> int:
  """Averages both ways and returns the compare's exit status."""
  if len(argv) > 1:
    print(f"{_PROGRAM}: error: unexpected arguments: {' '.join(argv[1:])}",
          file=sys.stderr)
    return _EXIT_UNUSABLE
  if not _CHECKPOINTS.value and not (_NUM_LAST.value and _PREFIX.value):
    print(f"{_PROGRAM}: error: give --checkpoints, or --num_last_checkpoints "
          "with --prefix", file=sys.stderr)
    return _EXIT_UNUSABLE
  try:
    if _WORK_DIR.value:
      return _average_and_compare(_WORK_DIR.value)
    with tempfile.TemporaryDirectory(prefix="compare_with_legacy_") as tmp:
      return _average_and_compare(tmp)
  except _RunFailed as e:
    print(f"{_PROGRAM}: error: {e}", file=sys.stderr)
    return _EXIT_UNUSABLE


def _parse_flags(argv: list) -> list:
  """absl's parsing, with usage errors as one line and exit status 2."""
  # absl's own -v is --verbosity=N; here -v alone means --verbose.
  argv = argv[:1] + ["--verbose" if arg == "-v" else arg for arg in argv[1:]]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"{_PROGRAM}: error: {'; '.join(str(e).splitlines())}",
          file=sys.stderr)
    sys.exit(_EXIT_UNUSABLE)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
