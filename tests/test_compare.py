"""Tests of t2t_avg.compare: the library in-process, the command line in subprocesses."""
import os
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import ml_dtypes
import numpy as np
import pytest

from conftest import _require_legacy
from conftest import LEGACY_DIR
from conftest import REPO
from conftest import call_cli
from conftest import run_cli
from conftest import run_legacy
from conftest import write_tf1_series
from t2t_avg.jobs import compare
from t2t_avg.jobs.compare import compare_checkpoints
from t2t_avg.jobs.compare import format_report
from t2t_avg.jobs.compare import max_ulp_difference
from t2t_avg.jobs.compare import Status
from t2t_avg.errors import AveragingError

FLOAT_DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def write_checkpoint(directory, values, step=1):
  """One TF1 checkpoint of `values` (plus global_step); returns its prefix."""
  return write_tf1_series(str(directory), [step], lambda _: values)[0]


def run_compare(*args):
  return call_cli(*args, module="t2t_avg.compare")


def unusable_input_line(result):
  """The error line of a run refused for unusable input (exit 2)."""
  assert result.returncode == 2, (result.returncode, result.stdout,
                                  result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("t2t_avg.compare: error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  return errors[0]


def stepped(values, steps, toward):
  """Each element moved `steps[i]` representable values toward `toward[i]`."""
  values = np.array(values).copy()
  steps = np.broadcast_to(steps, values.shape)
  target = np.broadcast_to(np.asarray(toward, dtype=values.dtype),
                           values.shape)
  for _ in range(int(np.max(steps, initial=0))):
    move = steps > 0
    with np.errstate(over="ignore"):  # The largest finite value -> inf.
      values[move] = np.nextafter(values[move], target[move])
    steps = steps - move
  return values


def mixed_values(seed):
  rng = np.random.default_rng(seed)
  return {
      "body/ffn/kernel": rng.standard_normal((6, 4)).astype(np.float32),
      "body/ffn/bias_f16": rng.standard_normal((4,)).astype(np.float16),
      "body/ffn/bias_bf16": rng.standard_normal((4,)).astype(
          ml_dtypes.bfloat16),
      "body/scale_f64": rng.standard_normal((3,)).astype(np.float64),
      "train_stats/problem_0_steps": np.int32(seed),
  }


def row_for(text, name):
  """The one table row of a variable (its name is the last column)."""
  rows = [line for line in text.splitlines()
          if line.endswith(f"  {name}") or f"  {name}  (" in line]
  assert len(rows) == 1, (name, text)
  return rows[0]


# Library, in-process.


def test_same_values_saved_separately_are_identical_and_list_nothing(
    tmp_path):
  a = write_checkpoint(tmp_path / "a", mixed_values(7))
  b = write_checkpoint(tmp_path / "b", mixed_values(7))

  report = compare_checkpoints(a, b)

  assert report.passed(strict=True)
  assert {v.status for v in report.variables} == {Status.IDENTICAL}
  assert {v.name for v in report.variables} == (
      set(mixed_values(7)) | {"global_step"})
  text = format_report(report)
  assert text.splitlines()[-1] == "identical: all 4 float variables are equal"
  for name in mixed_values(7):
    assert name not in text
  verbose = format_report(report, verbose=True)
  for name in mixed_values(7):
    assert row_for(verbose, name).startswith("identical")


@pytest.fixture(scope="module")
def perturbed_pair(tmp_path_factory):
  """(a, b, max |a-b|, max |a-b|/|b|) for a tiny perturbation of b."""
  directory = tmp_path_factory.mktemp("perturbed")
  rng = np.random.default_rng(3)
  b = (rng.standard_normal((8, 8)) + 3).astype(np.float32)
  a = (b * (1 + 1e-6 * rng.standard_normal((8, 8)))).astype(np.float32)
  diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
  assert 0 < diff.max() < 1e-4
  prefix_a = write_checkpoint(directory / "a", {"w": a})
  prefix_b = write_checkpoint(directory / "b", {"w": b})
  return prefix_a, prefix_b, float(diff.max()), float(
      (diff / np.abs(b.astype(np.float64))).max())


@pytest.mark.parametrize("tolerance, factor, passes", [
    ("atol", 2.0, True), ("atol", 0.5, False),
    ("rtol", 2.0, True), ("rtol", 0.5, False)])
def test_tiny_perturbation_passes_above_tolerance_fails_below(
    perturbed_pair, tolerance, factor, passes):
  a, b, max_abs, max_rel = perturbed_pair
  value = factor * (max_abs if tolerance == "atol" else max_rel)

  report = compare_checkpoints(a, b, **{tolerance: value})

  (w,) = [v for v in report.variables if v.name == "w"]
  assert w.max_abs_diff == max_abs
  assert w.status is (Status.WITHIN_TOLERANCE if passes else Status.DIFFERENT)
  assert report.passed() is passes
  summary = format_report(report).splitlines()[-1]
  assert summary.startswith("within tolerance: 1 of 1" if passes else
                            "different: 1 of 1")
  assert summary.endswith(" in w")


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_measures_equal_numpy_whether_or_not_compared_in_chunks(
    tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(compare, "_CHUNK", chunk)
  rng = np.random.default_rng(5)
  b = rng.standard_normal((10, 10)).astype(np.float32)
  a = b.copy()
  a[[0, 3, 7, 9], [1, 5, 2, 9]] += np.float32([1e-3, -2.5e-3, 5e-4, 3e-3])
  prefix_a = write_checkpoint(tmp_path / "a", {"w": a})
  prefix_b = write_checkpoint(tmp_path / "b", {"w": b})

  report = compare_checkpoints(prefix_a, prefix_b, atol=2e-3)

  (w,) = [v for v in report.variables if v.name == "w"]
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  assert w.differing == 4
  assert w.outside_tolerance == int(np.sum(np.abs(a64 - b64) > 2e-3)) == 2
  assert w.max_abs_diff == np.max(np.abs(a64 - b64))
  assert w.relative_l2 == pytest.approx(
      np.linalg.norm(a64 - b64) / np.linalg.norm(b64), rel=1e-12)
  assert w.max_ulp_diff == max(
      max_ulp_difference(a[i], b[i]) for i in np.ndindex(a.shape))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(data=st.data())
def test_ulp_distance_counts_nextafter_steps(dtype, data):
  dtype = np.dtype(dtype)
  bits = st.integers(0, 2**(8 * dtype.itemsize) - 1)
  unsigned = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
  size = data.draw(st.integers(1, 5))
  start = np.array(data.draw(st.lists(bits, min_size=size, max_size=size)),
                   dtype=unsigned).view(dtype)
  hypothesis.assume(np.isfinite(start.astype(np.float64)).all())
  steps = np.array(data.draw(st.lists(st.integers(0, 40), min_size=size,
                                      max_size=size)))
  direction = data.draw(st.sampled_from([np.inf, -np.inf]))
  moved = stepped(start, steps, direction)
  hypothesis.assume(np.isfinite(moved.astype(np.float64)).all())

  assert max_ulp_difference(start, moved) == steps.max()
  assert max_ulp_difference(moved, start) == steps.max()


def test_ulps_from_checkpoints_count_nextafter_steps_in_each_dtype(tmp_path):
  steps = np.array([0, 1, 2, 3, 7, 12, 5])
  toward = np.array([1, 1, -1, 1, -1, 1, 1]) * np.inf
  values_a, values_b = {}, {}
  for dtype in FLOAT_DTYPES:
    name = f"w_{np.dtype(dtype).name}"
    largest = ml_dtypes.finfo(dtype).max
    tiny = np.nextafter(np.array(0, dtype), np.array(1, dtype))
    # The largest finite value steps to inf; the smallest subnormals step
    # across zero (+0 and -0 are one value).
    values_a[name] = np.array([0, largest, -2.5, -tiny, tiny, -tiny, -1],
                              dtype=dtype)
    values_b[name] = stepped(values_a[name], steps, toward)
  a = write_checkpoint(tmp_path / "a", values_a)
  b = write_checkpoint(tmp_path / "b", values_b)

  report = compare_checkpoints(a, b)

  by_name = {v.name: v for v in report.variables}
  for name in values_a:
    assert by_name[name].dtype_a == name[len("w_"):]
    assert by_name[name].max_ulp_diff == steps.max(), name
    assert by_name[name].max_abs_diff == np.inf, name
    assert by_name[name].status is Status.DIFFERENT


def test_float64_ulps_between_extremes_do_not_overflow():
  largest = np.finfo(np.float64).max
  # Finite positive doubles are numbered by their bit patterns, in order.
  positives = int(np.array(largest).view(np.uint64))

  distance = max_ulp_difference(np.array([-largest]), np.array([largest]))

  assert distance == 2 * positives > 2**63


def test_nan_at_same_positions_is_equal_and_elsewhere_is_different(tmp_path):
  base = np.array([np.nan, 1.5, np.inf, -np.inf, -0.0], np.float32)
  same = np.array([np.nan, 1.5, np.inf, -np.inf, 0.0], np.float32)
  moved = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
  a = write_checkpoint(tmp_path / "a", {"w": base})
  b = write_checkpoint(tmp_path / "b", {"w": same})
  c = write_checkpoint(tmp_path / "c", {"w": moved})

  same_report = compare_checkpoints(a, b)
  moved_report = compare_checkpoints(a, c, atol=1e30, rtol=1e30)

  (w,) = [v for v in same_report.variables if v.name == "w"]
  assert w.status is Status.IDENTICAL and w.max_ulp_diff == 0
  assert same_report.passed()
  (w,) = [v for v in moved_report.variables if v.name == "w"]
  assert (w.status, w.nan_mismatches, w.differing) == (Status.DIFFERENT, 2, 2)
  assert not moved_report.passed()
  assert "2 NaN in only one" in format_report(moved_report)


def test_variable_in_only_one_checkpoint_is_reported_and_fails(tmp_path):
  same = np.arange(4, dtype=np.float32)
  a = write_checkpoint(tmp_path / "a", {"w": same, "adam/m": same})
  b = write_checkpoint(tmp_path / "b", {"w": same, "ema/w": same})

  report = compare_checkpoints(a, b)

  statuses = {v.name: v.status for v in report.variables}
  assert statuses["adam/m"] is Status.ONLY_IN_A
  assert statuses["ema/w"] is Status.ONLY_IN_B
  assert statuses["w"] is Status.IDENTICAL
  assert not report.passed()
  text = format_report(report)
  assert row_for(text, "adam/m").startswith("only in A")
  assert row_for(text, "ema/w").startswith("only in B")
  assert text.splitlines()[-1].startswith(
      "different: 0 of 1 float variables outside atol=0 rtol=0, "
      "1 only in A, 1 only in B")


def test_dtype_or_shape_mismatch_is_reported_and_fails(tmp_path):
  a = write_checkpoint(tmp_path / "a", {
      "w": np.ones((2, 3), np.float32), "v": np.ones((2, 3), np.float32)})
  b = write_checkpoint(tmp_path / "b", {
      "w": np.ones((2, 3), np.float16), "v": np.ones((3, 2), np.float32)})

  report = compare_checkpoints(a, b, atol=1.0)

  statuses = {v.name: v.status for v in report.variables}
  assert statuses["w"] is Status.DTYPE_DIFFERS
  assert statuses["v"] is Status.SHAPE_DIFFERS
  assert not report.passed()
  text = format_report(report)
  assert "float32|float16" in row_for(text, "w")
  assert "[2,3]|[3,2]" in row_for(text, "v")
  assert "1 dtype differs, 1 shape differs" in text.splitlines()[-1]


def test_differing_integers_have_their_own_line_and_count_only_when_strict(
    tmp_path):
  floats = {"w": np.arange(3, dtype=np.float32)}
  a = write_checkpoint(tmp_path / "a", {**floats, "counter": np.int32(5)})
  b = write_checkpoint(tmp_path / "b", {**floats, "counter": np.int32(6)})

  report = compare_checkpoints(a, b)

  assert report.passed()
  assert not report.passed(strict=True)
  lines = format_report(report).splitlines()
  assert row_for("\n".join(lines), "counter").startswith(
      "non-float differs")
  assert lines[-2] == ("non-float: 1 of 2 variables differ (counter); "
                       "not counted (--strict counts them)")
  assert lines[-1] == "identical: all 1 float variables are equal"
  strict = format_report(report, strict=True).splitlines()[-1]
  assert strict.startswith("different: 0 of 1 float variables") and (
      "1 non-float differ" in strict)


def test_tf2_object_checkpoints_compare_their_string_object_graph(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def save(directory, value):
    checkpoint = tf.train.Checkpoint(dense=tf.Variable(value))
    return checkpoint.write(str(directory / "ckpt"))

  a = save(tmp_path / "a", np.arange(4, dtype=np.float32))
  b = save(tmp_path / "b", np.arange(4, dtype=np.float32))
  c = save(tmp_path / "c", np.arange(4, dtype=np.float32) + 1)

  same, changed = compare_checkpoints(a, b), compare_checkpoints(a, c)

  statuses = {v.name: v.status for v in same.variables}
  assert statuses["_CHECKPOINTABLE_OBJECT_GRAPH"] is Status.IDENTICAL
  assert same.passed(strict=True)
  changed_floats = [v for v in changed.variables if v.status is
                    Status.DIFFERENT]
  assert [v.name for v in changed_floats] == [
      "dense/.ATTRIBUTES/VARIABLE_VALUE"]
  assert changed_floats[0].max_abs_diff == 1.0


def test_unreadable_tensor_data_names_the_variable_and_checkpoint(tmp_path):
  a = write_checkpoint(tmp_path / "a", {"w": np.ones(8, np.float32)})
  data = a + ".data-00000-of-00001"
  with open(data, "r+b") as f:
    f.write(b"\xa5" * os.path.getsize(data))

  with pytest.raises(AveragingError, match=f"variable .* checkpoint {a}"):
    compare_checkpoints(a, a)


def test_directory_without_checkpoint_is_refused(tmp_path):
  with pytest.raises(AveragingError, match=str(tmp_path)):
    compare_checkpoints(str(tmp_path), str(tmp_path))


# Command line, in subprocesses.


def test_command_line_names_each_differing_variable_and_exits_1(
    mixed_checkpoints):
  directory = os.path.dirname(mixed_checkpoints[-1])

  result = run_compare(mixed_checkpoints[0], directory)

  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[1] == f"B: {mixed_checkpoints[-1]} (reference)"
  for name in ["transformer/body/encoder/layer_0/self_attention/q/kernel",
               "transformer/body/encoder/layer_0/ffn/conv1/bias",
               "transformer/body/decoder/layer_0/layer_prepostprocess/scale",
               "transformer/symbol_modality/shared/weights_0",
               "transformer/body/scale64"]:
    assert row_for(result.stdout, name).startswith("different"), name
  assert row_for(result.stdout, "train_stats/problem_0_steps").startswith(
      "non-float differs")
  assert lines[-1].startswith("different: 5 of 5 float variables outside")


def test_command_line_identical_exits_0_and_lists_all_with_v(tmp_path):
  a = write_checkpoint(tmp_path / "a", mixed_values(1))
  b = write_checkpoint(tmp_path / "b", mixed_values(1))

  result = run_compare(a, b, "-v")

  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[-1].startswith("identical")
  for name in mixed_values(1):
    assert row_for(result.stdout, name).startswith("identical")


@pytest.mark.parametrize("tolerance", ["atol", "rtol"])
def test_command_line_tolerance_flags_accept_a_tiny_perturbation(
    perturbed_pair, tolerance):
  a, b, max_abs, max_rel = perturbed_pair
  value = 2 * (max_abs if tolerance == "atol" else max_rel)

  result = run_compare(f"--{tolerance}={value!r}", a, b)

  assert result.returncode == 0, (result.stdout, result.stderr[-2000:])
  assert result.stdout.splitlines()[-1].startswith(
      "within tolerance: 1 of 1 float variables differ")


@pytest.mark.parametrize("strict, status", [([], 0), (["--strict"], 1)])
def test_command_line_differing_integers_fail_only_with_strict(
    tmp_path, strict, status):
  floats = {"w": np.arange(3, dtype=np.float32)}
  a = write_checkpoint(tmp_path / "a", {**floats, "counter": np.int32(5)})
  b = write_checkpoint(tmp_path / "b", {**floats, "counter": np.int32(6)})

  result = run_compare(a, b, *strict)

  assert result.returncode == status, result.stderr[-2000:]
  assert row_for(result.stdout, "counter").startswith(
      "non-float differs")


def test_command_line_missing_checkpoint_exits_2_naming_it(tmp_path):
  a = write_checkpoint(tmp_path / "a", {"w": np.ones(2, np.float32)})
  missing = str(tmp_path / "nowhere" / "model.ckpt-5")

  line = unusable_input_line(run_compare(a, missing))

  assert missing in line


def test_command_line_corrupted_index_exits_2_naming_it(tmp_path):
  a = write_checkpoint(tmp_path / "a", {"w": np.ones(2, np.float32)})
  with open(a + ".index", "r+b") as f:
    f.write(b"\xa5" * 32)

  # A real process: its exit status, and nothing else on its stderr.
  line = unusable_input_line(run_cli(a, a, module="t2t_avg.compare"))

  assert a + ".index" in line


@pytest.mark.parametrize("args, message", [
    (["--atol=-1", "a", "b"], "--atol"),
    (["--rtol=nan", "a", "b"], "--rtol"),
    (["--bogus", "a", "b"], "bogus"),
    (["only_one"], "expected two checkpoints"),
])
def test_command_line_bad_flags_exit_2_with_one_line(args, message):
  line = unusable_input_line(run_compare(*args))

  assert message in line


# Against the real T2T 1.15.7 avg_checkpoints.


def test_uniform_average_float_tensors_are_identical_to_legacy(
    mixed_checkpoints, tmp_path):
  checkpoints = ",".join(mixed_checkpoints)
  run_legacy("avg_checkpoints", f"--checkpoints={checkpoints}",
             f"--output_path={tmp_path / 'legacy' / 'averaged.ckpt'}")
  ours = call_cli(f"--checkpoints={checkpoints}",
                  f"--output_path={tmp_path / 'ours' / 'averaged.ckpt'}")
  assert ours.returncode == 0, ours.stderr[-3000:]

  result = run_compare(str(tmp_path / "ours" / "averaged.ckpt-0"),
                       str(tmp_path / "legacy" / "averaged.ckpt-0"))

  assert result.returncode == 0, (result.stdout, result.stderr[-2000:])
  lines = result.stdout.splitlines()
  assert lines[-1] == "identical: all 5 float variables are equal"
  # Legacy averaged and truncated the integer; t2t_avg copies the newest.
  assert lines[-2].startswith(
      "non-float: 1 of 2 variables differ (train_stats/problem_0_steps)")


def test_compare_with_legacy_script_passes_prefix_and_exit_status(
    mixed_checkpoints):
  _require_legacy()
  script = os.path.join(REPO, "scripts", "compare_with_legacy.py")
  directory = os.path.dirname(mixed_checkpoints[0])

  # --prefix is string-prepended to each checkpoint by both tools.
  result = subprocess.run(
      [sys.executable, script, f"--prefix={directory}/",
       "--checkpoints=model.ckpt-100,model.ckpt-400",
       f"--legacy_pythonpath={LEGACY_DIR}", "--strict"],
      capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))

  assert result.returncode == 1, (result.stdout, result.stderr[-3000:])
  assert row_for(result.stdout, "train_stats/problem_0_steps").startswith(
      "non-float differs")
  # Floats identical to legacy; the integer legacy truncated counts here.
  assert result.stdout.splitlines()[-1] == (
      "different: 0 of 5 float variables outside atol=0 rtol=0, "
      "1 non-float differ")
