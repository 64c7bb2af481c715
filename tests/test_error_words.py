"""Errors in the caller's words: parameters to a library caller, flags on the
command line; input errors name their file; output names match the inputs."""
import ast
import os
import pathlib

import numpy as np
import pytest

from conftest import REPO, call_cli, write_tf1_series, write_tf2_events

STEPS = (100, 200, 300)


def _vars(step, nan=False):
  w = np.full((2, 3), step, np.float32)
  if nan:
    w[1, 2] = np.nan
  return {"body/w": w, "body/b": np.full((3,), -step, np.float32)}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
  root = tmp_path_factory.mktemp("words")
  return {
      "train": write_tf1_series(str(root / "train"), STEPS, _vars),
      "nan": write_tf1_series(str(root / "nan"), STEPS,
                              lambda s: _vars(s, nan=s == 200)),
      "events": write_tf2_events(root / "events", "loss",
                                 {100: 2.0, 300: 1.0}),
  }


def _cli(capsys, *args):
  """`python -m t2t_avg args...` in this process: (exit status, stderr)."""
  del capsys  # call_cli captures the descriptors itself.
  result = call_cli(*map(str, args))
  return result.returncode, result.stderr


def _cli_line(capsys, *args):
  status, err = _cli(capsys, *args)
  assert status == 1, err
  lines = err.strip().splitlines()  # absl's INFO lines, then the error
  assert lines[-1].startswith("t2t_avg: error: "), err
  assert "Traceback" not in err, err
  return lines[-1][len("t2t_avg: error: "):]


# --- the template ------------------------------------------------------------

def test_a_template_names_parameters_bare_or_as_flags():
  from t2t_avg.errors import AveragingError  # pylint: disable=import-outside-toplevel
  error = AveragingError("{step_from}={key}: checkpoint {path} has no such "
                         "tensor", key="x", path="run/ckpt-1")
  assert str(error) == "step_from=x: checkpoint run/ckpt-1 has no such tensor"
  assert error.message(as_flags=True) == (
      "--step_from=x: checkpoint run/ckpt-1 has no such tensor")


def test_braces_that_are_no_parameter_stay_text():
  from t2t_avg.errors import ArgumentError, AveragingError  # pylint: disable=import-outside-toplevel
  # A path quoted into the text, a Keras name template, a dict, a lone brace.
  text = "cannot read w-{epoch:02d}.weights.h5: {'a': {}} }"
  assert AveragingError(text).message(as_flags=True) == text
  error = ArgumentError("{eval_command} {command} failed",
                        command="eval {checkpoint} {top_k}")
  assert error.message(as_flags=True) == (
      "--eval_command eval {checkpoint} {top_k} failed")


def test_an_error_quoted_into_another_speaks_the_same_words():
  from t2t_avg.errors import AveragingError  # pylint: disable=import-outside-toplevel
  inner = AveragingError("pass {allow_nonfinite}")
  outer = AveragingError("cannot average {path}: {reason}", path="a",
                         reason=inner)
  assert str(outer) == "cannot average a: pass allow_nonfinite"
  assert outer.message(as_flags=True) == (
      "cannot average a: pass --allow_nonfinite")


def _templates():
  """(file:line, parameter) for every `{name}` a raise in the package names
  without giving it a value."""
  from t2t_avg.errors import _FIELD  # pylint: disable=import-outside-toplevel
  found = []
  for path in sorted(pathlib.Path(REPO, "t2t_avg").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.Call) and node.args and getattr(
          node.func, "id", getattr(node.func, "attr", None)) in (
              "ArgumentError", "AveragingError", "Phrase")):
        continue
      given = {k.arg for k in node.keywords}
      for text in ast.walk(node.args[0]):
        if isinstance(text, ast.Constant) and isinstance(text.value, str):
          found += [(f"{path.name}:{node.lineno}", m.group(1))
                    for m in _FIELD.finditer(text.value)
                    if m.group(1) not in given]
  return found


def test_every_parameter_a_message_names_is_a_flag():
  # pylint: disable=import-outside-toplevel,protected-access
  from absl import flags
  from t2t_avg.cli import average, compare
  from t2t_avg.errors import PARAMETERS
  cli_flags = {f.name for f in flags.FLAGS.get_flags_for_module(average)}
  cli_flags |= set(compare._COMPARE_FLAGS)
  # Keywords of greedy_soup, ContinuousOptions and the Keras callback alone.
  assert PARAMETERS - cli_flags == {
      "newer", "poll_seconds", "last_n", "start_epoch", "save_freq",
      "directory", "bn_batch_size", "monitor", "mode"}
  # Text, not parameters: ModelCheckpoint's `{epoch}`, `{batch}` in names.
  quoted = {"epoch", "batch"}
  unnamed = [(where, name) for where, name in _templates()
             if name not in PARAMETERS | quoted]
  assert not unnamed  # A misspelt parameter would be printed in braces.
  assert len(_templates()) > 50  # The scan sees the package's messages.


# --- the same mistakes, from Python and from the command line ----------------

def _library_error(case, series, out):
  """Makes `case`'s mistake through the library; returns the error."""
  # pylint: disable=import-outside-toplevel
  from t2t_avg import AveragingError, average_checkpoints, options
  from t2t_avg.inputs import checkpoints
  from t2t_avg.metrics import weighting
  from t2t_avg.metrics.points import MetricPoint
  train = series["train"]
  with pytest.raises(AveragingError) as error:
    if case == "step_from":
      average_checkpoints(train, out, step_from="no_such_tensor")
    elif case == "output_is_an_input":
      average_checkpoints(train, train[0][:-len("-100")], output_step=100)
    elif case == "output_exists":
      average_checkpoints(train, out, output_step=100)
    elif case == "nonfinite":
      average_checkpoints(series["nan"], out)
    elif case == "missing_metric":
      opened = [checkpoints.load(p, "auto") for p in train]
      weighting.weigh_checkpoints(
          opened, [MetricPoint(100, 0.0, 2.0), MetricPoint(300, 0.0, 1.0)],
          options.WeightingOptions(weighting="softmax", metric="loss",
                                   metrics_from_events=("e",)), mode="min")
  return error.value


def _cli_args(case, series, out):
  train = series["train"]
  listed = "--checkpoints=" + ",".join(train)
  return {
      "step_from": [listed, "--step_from=no_such_tensor",
                    f"--output_path={out}"],
      "output_is_an_input": [listed, "--output_step=100",
                             f"--output_path={train[0][:-len('-100')]}"],
      "output_exists": [listed, "--output_step=100", f"--output_path={out}"],
      "nonfinite": ["--checkpoints=" + ",".join(series["nan"]),
                    f"--output_path={out}"],
      "missing_metric": [listed, "--weighting=softmax", "--metric=loss",
                         f"--metrics_from_events={series['events']}",
                         f"--output_path={out}"],
  }[case]


CASES = {  # case: the parameters its message names
    "step_from": ["step_from"],
    "output_is_an_input": ["output_path"],
    "output_exists": ["output_path"],
    "nonfinite": ["allow_nonfinite"],
    "missing_metric": ["max_step_gap", "missing_metric"],
}


def _not_ours(series, out):
  """An output at `out`-100 that t2t_avg did not write (no record)."""
  from t2t_avg import average_checkpoints  # pylint: disable=import-outside-toplevel
  average_checkpoints(series["train"][:1], out, output_step=100)
  os.remove(f"{out}-100.t2t_avg.json")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_library_caller_reads_parameters_and_the_cli_prints_flags(
    case, series, tmp_path, capsys):
  if case == "output_exists":
    for side in ("lib", "cli"):
      _not_ours(series, str(tmp_path / side / "avg"))
  library = str(_library_error(case, series, str(tmp_path / "lib" / "avg")))
  cli = _cli_line(capsys, *_cli_args(case, series, tmp_path / "cli" / "avg"))
  for name in CASES[case]:
    assert f"{name}" in library and f"--{name}" not in library, library
    assert f"--{name}" in cli, cli
  assert "--" not in library, library
  # Apart from the flags, the two say the same (paths aside).
  strip = lambda text: text.replace(str(tmp_path / "lib"), "").replace(  # noqa: E731
      str(tmp_path / "cli"), "")
  assert strip(cli).replace("--", "") == strip(library)


def test_a_link_in_place_of_an_output_file_names_the_parameter(
    series, tmp_path, capsys):
  from t2t_avg import AveragingError, average_checkpoints  # pylint: disable=import-outside-toplevel
  os.symlink(tmp_path / "elsewhere", tmp_path / "avg-0.index")
  with pytest.raises(AveragingError) as error:
    average_checkpoints(series["train"], str(tmp_path / "avg"))
  assert str(error.value).endswith("remove it or choose another output_path")
  line = _cli_line(capsys, "--checkpoints=" + ",".join(series["train"]),
                   f"--output_path={tmp_path}/avg")
  assert line.endswith("remove it or choose another --output_path"), line


# --- input errors name their file --------------------------------------------

def _with_dtype_enum(prefix, variable, enum):
  """Rewrites a TF-written bundle's index with `variable`'s dtype enum set."""
  # pylint: disable=import-outside-toplevel,protected-access
  import dataclasses
  from t2t_avg.formats import tf_bundle, tf_protos
  index = prefix + ".index"
  with open(index, "rb") as f:
    entries = list(tf_bundle._table_entries(f.read()))
  changed = [(key, tf_protos.encode_entry(dataclasses.replace(
      tf_protos.decode_entry(value), dtype=enum))
               if key == variable.encode() else value)
              for key, value in entries]
  assert changed != entries
  with open(index, "wb") as f:
    f.write(tf_bundle._table(changed))


def test_an_unknown_dtype_enum_names_the_file_and_the_variable(
    series, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from t2t_avg import AveragingError, average_checkpoints  # pylint: disable=import-outside-toplevel
  copies = []
  for prefix in series["train"][:2]:
    copy = str(tmp_path / os.path.basename(prefix))
    for suffix in (".index", ".data-00000-of-00001"):
      shutil.copy(prefix + suffix, copy + suffix)
    copies.append(copy)
  _with_dtype_enum(copies[1], "body/w", 99)
  with pytest.raises(AveragingError) as error:
    average_checkpoints(copies, str(tmp_path / "out" / "avg"))
  assert str(error.value) == (
      f"cannot read variable body/w of checkpoint {copies[1]}.index: unknown "
      "TensorFlow dtype enum 99 (DataType 99 is not one t2t_avg knows)")
  assert not os.path.exists(tmp_path / "out")
