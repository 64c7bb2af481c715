"""`python -m t2t_avg.compare CKPT_A CKPT_B`: the compare tool's command line.

Its flags live in their own FlagValues and join absl's global ones only when
it runs as a program: importing `t2t_avg.compare` into another absl program,
or a test process that also imports `t2t_avg.cli.average`, defines no flags there.
"""
import sys
import traceback
from typing import NoReturn

from absl import app
from absl import flags

from t2t_avg.jobs.compare import compare_checkpoints, format_report
from t2t_avg.errors import WordedError

_PROGRAM = "t2t_avg.compare"
_EXIT_DIFFERENT = 1
_EXIT_UNUSABLE = 2

_COMPARE_FLAGS = flags.FlagValues()
_ATOL = flags.DEFINE_float(
    "atol", 0.0, "Absolute tolerance: a float element passes when "
    "|a-b| <= atol + rtol*|b|.", lower_bound=0.0, flag_values=_COMPARE_FLAGS)
_RTOL = flags.DEFINE_float(
    "rtol", 0.0, "Relative tolerance, relative to CKPT_B (the reference).",
    lower_bound=0.0, flag_values=_COMPARE_FLAGS)
_STRICT = flags.DEFINE_boolean(
    "strict", False, "Also count differing non-float variables (integers, "
    "bool, strings) in the exit status.", flag_values=_COMPARE_FLAGS)
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "List every variable, not only those that differ "
    "(also -v).", flag_values=_COMPARE_FLAGS)

def _usage_error(message: str) -> NoReturn:
  print(f"{_PROGRAM}: error: {message}", file=sys.stderr)
  sys.exit(_EXIT_UNUSABLE)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with usage errors as one line and exit status 2."""
  # absl's own -v is --verbosity=N; here -v alone means --verbose.
  argv = argv[:1] + ["--verbose" if arg == "-v" else arg for arg in argv[1:]]
  flags.FLAGS.append_flag_values(_COMPARE_FLAGS)
  for name in _COMPARE_FLAGS:
    flags.declare_key_flag(name)  # Listed by --help.
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error("; ".join(str(e).split("\n")))
  _COMPARE_FLAGS.mark_as_parsed()
  if len(args) != 3:
    _usage_error(f"expected two checkpoints, CKPT_A CKPT_B; got "
                 f"{len(args) - 1}: {' '.join(args[1:])}".rstrip(": "))
  return args


def main(argv: list[str]) -> int:
  """Compares CKPT_A with CKPT_B; exit 0 same, 1 different, 2 unusable."""
  _, path_a, path_b = argv
  try:
    report = compare_checkpoints(path_a, path_b, atol=_ATOL.value,
                                 rtol=_RTOL.value)
  except WordedError as e:  # ArgumentError, AveragingError
    message = " ".join(e.message(as_flags=True).splitlines())
    print(f"{_PROGRAM}: error: {message}", file=sys.stderr)
    return _EXIT_UNUSABLE
  except Exception as e:  # pylint: disable=broad-except
    # A bug, not a difference: exit 1 would read as "the checkpoints differ".
    traceback.print_exc()
    print(f"{_PROGRAM}: error: internal error: {e!r}", file=sys.stderr)
    return _EXIT_UNUSABLE
  print(format_report(report, verbose=_VERBOSE.value, strict=_STRICT.value))
  return 0 if report.passed(strict=_STRICT.value) else _EXIT_DIFFERENT


def run() -> None:
  """Runs the compare tool as a program."""
  app.run(main, flags_parser=_parse_flags)
