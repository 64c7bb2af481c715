"""Metric-weighted averaging end to end: checkpoints and eval events from TF's own writers.

Expected weights are computed here from the formulas in SPEC.md ("Numbers",
"One-shot flags"), not by calling t2t_avg.metrics.weighting.
"""
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import t2t_avg
from t2t_avg.metrics import events
from t2t_avg.errors import AveragingError

from conftest import (call_cli, error_line, float64_mean, load_script,
                      logged, one_shot, read_checkpoint,
                      read_record, write_tf1_events, write_tf2_events,
                      write_tf1_series)

tf1 = tf.compat.v1

STEPS = (100, 200, 300, 400)
LOSS = "eval/loss"  # lower is better
BLEU = "eval/approx_bleu_score"  # higher is better
LOSSES = {100: 2.5, 200: 1.75, 300: 1.5, 400: 2.0}  # exact in float32
BLEUS = {100: 10.0, 200: 17.5, 300: 21.0, 400: 19.0}
FLOAT_DTYPES = {"body/kernel": np.float32, "body/scale16": np.float16,
                "body/bias64": np.float64}


def _step_valued(step):
  """Every element of every float variable equals the step; one int counter."""
  values = {name: np.full((3, 2), step, dtype)
            for name, dtype in FLOAT_DTYPES.items()}
  values["train_stats/problem_0_steps"] = np.int32(step)
  return values


# --- Event writers: TensorFlow's own --------------------------------------

# --- Expected weights, from the SPEC's formulas -----------------------------

def _goodness(values, mode):
  return [v if mode == "max" else -v for v in values]


def expected_softmax(values, mode, temperature=0.0):
  valid = [v for v in values if math.isfinite(v)]
  t = temperature or statistics.pstdev(valid)
  best = max(_goodness(valid, mode))
  raw = [math.exp((g - best) / t) if math.isfinite(g) else 0.0
         for g in _goodness(values, mode)]
  return [r / sum(raw) for r in raw]


def expected_proportional(values, mode):
  raw = [v if mode == "max" else 1.0 / v for v in values]
  return [r / sum(raw) for r in raw]


def expected_rank(values, mode):
  goodness = _goodness(values, mode)  # no ties in these tests
  ranks = [sorted(goodness).index(g) + 1 for g in goodness]  # worst: 1
  return [r / sum(ranks) for r in ranks]


def expected_top_k(values, mode, k, steps):
  order = sorted(range(len(values)), reverse=True,
                 key=lambda i: (_goodness(values, mode)[i], steps[i]))
  return [1.0 / k if i in order[:k] else 0.0 for i in range(len(values))]


def expected_average(weights, steps, dtype, uniform_over_selected=False):
  """The float64 sum of w_i * x_i in checkpoint order, cast once."""
  if uniform_over_selected:
    return float64_mean([s for w, s in zip(weights, steps) if w > 0], dtype)
  return float64_mean(steps, dtype, [np.float64(w) for w in weights])


def assert_step_valued_average(output_prefix, weights, steps=STEPS,
                               uniform_over_selected=False):
  """Float variables: the expected average; the int counter: the newest's.

  float32 and float16 outputs must equal the float64 sum cast once, bit for
  bit. float64 outputs are not cast, so they show the last-bit differences
  of normalising weights (the engine normalises the already normalised
  weights again): they get 4 ulp.
  """
  got = read_checkpoint(output_prefix)
  for name, dtype in FLOAT_DTYPES.items():
    want = expected_average(weights, steps, dtype, uniform_over_selected)
    assert got[name].dtype == dtype, name
    if dtype == np.float64:
      np.testing.assert_array_max_ulp(got[name], np.full((3, 2), want), 4)
    else:
      assert np.array_equal(got[name], np.full((3, 2), want, dtype)), (
          name, got[name].ravel()[0], want)
  # Not averaged: copied from the newest checkpoint that has weight.
  newest = max(s for w, s in zip(weights, steps) if w > 0)
  assert got["train_stats/problem_0_steps"] == newest
  assert got["global_step"] == 0


# --- Fixtures and helpers ---------------------------------------------------

@pytest.fixture(scope="module")
def series(tmp_path_factory):
  """Four step-valued TF1 checkpoints, loss events (TF1) and BLEU events (TF2)."""
  root = tmp_path_factory.mktemp("weighted")
  prefixes = write_tf1_series(str(root / "train"), list(STEPS), _step_valued)
  write_tf1_events(root / "train" / "eval", LOSS, LOSSES)
  write_tf2_events(root / "bleu_eval", BLEU, BLEUS)
  return {"prefixes": prefixes, "loss": str(root / "train" / "eval"),
          "bleu": str(root / "bleu_eval")}


def run_oneshot(prefixes, output_path, **flags):
  """`oneshot.run` with the CLI's defaults, as `python -m t2t_avg` calls it."""
  return one_shot(checkpoints=prefixes, output_path=str(output_path), **flags)


# --- Each scheme: float64 weighted sum, cast once ---------------------------

_LOSS_VALUES = [LOSSES[s] for s in STEPS]
_BLEU_VALUES = [BLEUS[s] for s in STEPS]

SCHEME_CASES = [
    pytest.param("softmax", "loss", {}, expected_softmax(_LOSS_VALUES, "min"),
                 id="softmax-loss-auto-temperature"),
    pytest.param("softmax", "bleu", {"temperature": 2.5},
                 expected_softmax(_BLEU_VALUES, "max", 2.5),
                 id="softmax-bleu-temperature-2.5"),
    pytest.param("proportional", "loss", {},
                 expected_proportional(_LOSS_VALUES, "min"),
                 id="proportional-loss"),
    pytest.param("proportional", "bleu", {},
                 expected_proportional(_BLEU_VALUES, "max"),
                 id="proportional-bleu"),
    pytest.param("rank", "loss", {}, expected_rank(_LOSS_VALUES, "min"),
                 id="rank-loss"),
    pytest.param("rank", "bleu", {}, expected_rank(_BLEU_VALUES, "max"),
                 id="rank-bleu"),
    pytest.param("top_k", "loss", {"top_k": 2},
                 expected_top_k(_LOSS_VALUES, "min", 2, STEPS),
                 id="top_k-2-loss"),
    pytest.param("explicit", None, {"weights": [1.0, 3.0, 0.0, 2.5]},
                 [1 / 6.5, 3 / 6.5, 0.0, 2.5 / 6.5], id="explicit"),
]


@pytest.mark.parametrize("scheme,metric,options,weights", SCHEME_CASES)
def test_weighted_output_is_float64_weighted_sum_cast_once(
    series, tmp_path, scheme, metric, options, weights):
  metric_args = {}
  if metric:
    metric_args = dict(metrics_from_events=[series[metric]],
                       metric=LOSS if metric == "loss" else BLEU)
  result = run_oneshot(series["prefixes"], tmp_path / "avg.ckpt",
                       weighting=scheme, **metric_args, **options)

  assert [r.weight for r in result.rows] == pytest.approx(weights, abs=1e-12)
  assert_step_valued_average(str(tmp_path / "avg.ckpt-0"), weights,
                             uniform_over_selected=scheme == "top_k")


def test_sanity_expected_weights_prefer_the_better_metric():
  # The expectations above must themselves order checkpoints by the metric.
  for weights in (expected_softmax(_LOSS_VALUES, "min"),
                  expected_proportional(_LOSS_VALUES, "min"),
                  expected_rank(_LOSS_VALUES, "min")):
    assert np.argsort(weights).tolist() == [0, 3, 1, 2]  # 2.5, 2.0, 1.75, 1.5
  assert expected_rank(_BLEU_VALUES, "max") == [1 / 10, 2 / 10, 4 / 10,
                                                3 / 10]


def test_softmax_cli_writes_weighted_average_and_json_record(series, tmp_path):
  out = tmp_path / "out" / "avg.ckpt"
  result = call_cli(f"--checkpoints={','.join(series['prefixes'])}",
                    "--weighting=softmax", f"--metrics_from_events={series['bleu']}",
                    f"--metric={BLEU}", f"--output_path={out}")

  assert result.returncode == 0, result.stderr[-2000:]
  weights = expected_softmax(_BLEU_VALUES, "max")
  assert_step_valued_average(f"{out}-0", weights)
  record = read_record(f"{out}-0")
  assert record["t2t_avg_version"] == t2t_avg.__version__
  assert [r["path"] for r in record["inputs"]] == series["prefixes"]
  assert [r["step"] for r in record["inputs"]] == list(STEPS)
  assert [r["metric"] for r in record["inputs"]] == _BLEU_VALUES
  assert [r["weight"] for r in record["inputs"]] == pytest.approx(weights,
                                                                  abs=1e-12)
  assert record["metric"]["tag"] == BLEU
  assert record["effective_count"] == pytest.approx(
      1 / sum(w * w for w in weights), rel=1e-12)
  assert record["weighting"]["scheme"] == "softmax"
  assert record["weighting"]["temperature"] == pytest.approx(
      statistics.pstdev(_BLEU_VALUES), rel=1e-12)


# --- top_k ------------------------------------------------------------------

def test_top_k_is_bit_identical_to_uniform_over_the_selected(mixed_checkpoints,
                                                             tmp_path):
  # Random values, so 1/k * sum and sum / k would differ in the last bits.
  # 200 and 300 tie for second best: the newer (300) is taken. The newest
  # input (400) is left out, so the int counter must come from 300.
  eval_dir = write_tf2_events(tmp_path / "eval", "loss",
                              {100: 1.0, 200: 2.0, 300: 2.0, 400: 3.0})
  top_k = run_oneshot(mixed_checkpoints, tmp_path / "top_k" / "avg.ckpt",
                      weighting="top_k", top_k=2, metrics_from_events=[eval_dir])
  uniform = run_oneshot([mixed_checkpoints[0], mixed_checkpoints[2]],
                        tmp_path / "uniform" / "avg.ckpt")

  assert [r.weight for r in top_k.rows] == [0.5, 0.0, 0.5, 0.0]
  got, want = (read_checkpoint(top_k.output_path),
               read_checkpoint(uniform.output_path))
  assert sorted(got) == sorted(want)
  floats = [n for n in want if want[n].dtype.kind == "f"]
  assert len(floats) == 4
  assert want["train_stats/problem_0_steps"] == 300 * 5 + 1
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    assert got[name].tobytes() == want[name].tobytes(), name


# --- Dry run ----------------------------------------------------------------

def test_dry_run_prints_the_table_and_writes_nothing(series, tmp_path):
  out_dir = tmp_path / "never"
  result = call_cli(f"--checkpoints={','.join(series['prefixes'])}",
                    "--weighting=rank", f"--metrics_from_events={series['loss']}",
                    f"--metric={LOSS}", f"--output_path={out_dir}/avg.ckpt",
                    "--dry_run", "--weight_summaries")

  assert result.returncode == 0, result.stderr[-2000:]
  assert not out_dir.exists()
  weights = expected_rank(_LOSS_VALUES, "min")
  lines = result.stdout.strip().splitlines()
  assert lines[0].split() == ["checkpoint", "step", "metric", "weight"]
  for line, prefix, step, weight in zip(lines[1:], series["prefixes"], STEPS,
                                        weights):
    assert line.split() == [prefix, str(step), f"{LOSSES[step]:.6g}",
                            f"{weight:.4f}"]
  effective = 1 / sum(w * w for w in weights)
  assert lines[5].startswith(
      f"effective number of checkpoints: {effective:.2f} of 4")
  assert len(lines) == 6


# --- Aligning metrics to checkpoints ----------------------------------------

def test_max_step_gap_takes_the_eval_logged_just_before_a_checkpoint(
    series, tmp_path):
  # Evals logged a few steps before each checkpoint; one after 400 (ignored:
  # only a preceding point counts) and one far before it.
  logged = {98: 2.5, 197: 1.75, 300: 1.5, 396: 2.0, 380: 0.5, 403: 9.0}
  eval_dir = write_tf1_events(tmp_path / "eval", "loss", logged)

  with pytest.raises(AveragingError, match="98, 197, 300, 380, 396, 403"):
    run_oneshot(series["prefixes"], tmp_path / "exact" / "avg.ckpt",
                weighting="softmax", metrics_from_events=[eval_dir])
  result = run_oneshot(series["prefixes"], tmp_path / "gap" / "avg.ckpt",
                       weighting="softmax", metrics_from_events=[eval_dir],
                       max_step_gap=5)

  assert [r.metric for r in result.rows] == _LOSS_VALUES
  weights = expected_softmax(_LOSS_VALUES, "min")
  assert_step_valued_average(result.output_path, weights)


def test_missing_metric_skip_leaves_the_checkpoint_out_with_a_warning(
    series, tmp_path, caplog):
  eval_dir = write_tf1_events(tmp_path / "eval", "loss",
                              {s: LOSSES[s] for s in (100, 200, 400)})
  result = run_oneshot(series["prefixes"], tmp_path / "avg.ckpt",
                       weighting="proportional", metrics_from_events=[eval_dir],
                       missing_metric="skip")

  assert series["prefixes"][2] in "\n".join(logged(caplog))
  kept = (100, 200, 400)
  weights = expected_proportional([LOSSES[s] for s in kept], "min")
  assert [r.step for r in result.rows] == list(kept)
  assert_step_valued_average(result.output_path, weights, steps=kept)
  assert [r["step"] for r in read_record(result.output_path)["inputs"]] == [
      100, 200, 400]
  # The dry-run table and the record say which checkpoint was left out.
  assert read_record(result.output_path)["left_out"] == [
      {"path": series["prefixes"][2], "step": 300}]
  from t2t_avg.cli import average  # pylint: disable=import-outside-toplevel
  table = average.format_table(result).splitlines()
  assert [line.split()[0] for line in table[1:5]] == [
      *[series["prefixes"][i] for i in (0, 1, 3)], series["prefixes"][2]]
  assert table[4].split()[1:] == ["300", "none", "left", "out", "(no",
                                  "metric)"]


def test_missing_metric_error_lists_the_steps_that_have_one(series, tmp_path):
  eval_dir = write_tf1_events(tmp_path / "eval", "loss",
                              {s: LOSSES[s] for s in (100, 200, 400)})
  result = call_cli(f"--checkpoints={','.join(series['prefixes'])}",
                    "--weighting=softmax", f"--metrics_from_events={eval_dir}",
                    f"--output_path={tmp_path}/out/avg.ckpt")

  line = error_line(result)
  assert "step 300" in line and "100, 200, 400" in line, line
  assert not (tmp_path / "out").exists()


# --- Non-finite metrics -----------------------------------------------------

def test_nan_metric_gives_weight_zero_with_a_warning(series, tmp_path, caplog):
  values = {100: 2.5, 200: float("nan"), 300: 1.5, 400: 2.0}
  eval_dir = write_tf2_events(tmp_path / "eval", "loss", values)
  result = run_oneshot(series["prefixes"], tmp_path / "avg.ckpt",
                       weighting="softmax", metrics_from_events=[eval_dir])

  weights = expected_softmax([values[s] for s in STEPS], "min")
  assert weights[1] == 0.0
  assert [r.weight for r in result.rows] == pytest.approx(weights, abs=1e-12)
  assert "nan" in "\n".join(logged(caplog)).lower()
  assert "200" in "\n".join(logged(caplog))
  assert_step_valued_average(result.output_path, weights)


def test_all_nan_metrics_are_an_error(series, tmp_path):
  eval_dir = write_tf1_events(tmp_path / "eval", "loss",
                              {s: float("nan") for s in STEPS})
  result = call_cli(f"--checkpoints={','.join(series['prefixes'])}",
                    "--weighting=softmax", f"--metrics_from_events={eval_dir}",
                    f"--output_path={tmp_path}/out/avg.ckpt")

  line = error_line(result)
  assert "nan" in line.lower(), line
  assert not (tmp_path / "out").exists()


# --- --weight_summaries -----------------------------------------------------

def test_weight_summaries_are_scalars_at_each_checkpoint_step(series,
                                                              tmp_path):
  result = run_oneshot(series["prefixes"], tmp_path / "out" / "avg.ckpt",
                       weighting="softmax", metrics_from_events=[series["loss"]],
                       metric=LOSS, weight_summaries=True)

  summaries = str(tmp_path / "out" / "t2t_avg")
  weight_points = events.read_metric([summaries], "t2t_avg/weight")
  metric_points = events.read_metric([summaries], f"t2t_avg/{LOSS}")
  weights = expected_softmax(_LOSS_VALUES, "min")
  assert [p.step for p in weight_points] == list(STEPS)
  assert [p.value for p in weight_points] == pytest.approx(weights, rel=1e-6)
  assert [(p.step, p.value) for p in metric_points] == list(LOSSES.items())
  assert result.written


# --- A real training run ----------------------------------------------------

def test_softmax_average_beats_uniform_after_a_late_loss_spike(tmp_path):
  demo = load_script("demo_weighting")
  # A smaller run than the README's: 12 checkpoints, the last 3 after a
  # learning-rate spike; the last 8 are averaged.
  cfg = demo.Config(train_size=16000, eval_size=500, test_size=2000,
                    hidden=32, steps=1200, save_every=100, spike_from=900)
  data = demo.make_data(cfg)
  saved = demo.train(cfg, str(tmp_path / "run"), data)
  last = [prefix for prefix, _ in saved[-8:]]
  eval_dir = str(tmp_path / "run" / "eval")

  logged = demo.eval_losses(eval_dir)
  assert sorted(logged) == [step for _, step in saved]
  assert min(logged[s] for s in (1000, 1100, 1200)) > max(
      logged[s] for s in range(500, 1000, 100))  # the spike degraded them
  uniform, _ = demo.average(last, str(tmp_path / "uniform" / "avg.ckpt"),
                            "uniform", eval_dir)
  softmax, record = demo.average(last, str(tmp_path / "softmax" / "avg.ckpt"),
                                 "softmax", eval_dir)

  assert [r["step"] for r in record["inputs"]] == list(range(500, 1300, 100))
  uniform_loss, _ = demo.evaluate(cfg, uniform, data["test"])
  softmax_loss, _ = demo.evaluate(cfg, softmax, data["test"])
  assert softmax_loss < uniform_loss - 0.02, (softmax_loss, uniform_loss)


def test_weight_summaries_need_no_tensorboard_package(tmp_path):
  """TF 2.21 no longer installs tensorboard; the summaries must not need it,
  and calls in quick succession (continuous mode) must all be kept."""
  code = f"""
import sys
sys.modules["tensorboard"] = None  # As if it were not installed.
from t2t_avg.metrics import events
from t2t_avg.engine.averaging import CheckpointRow
rows = [CheckpointRow("a", 10, "name", 0.25, 1.5),
        CheckpointRow("b", 20, "name", 0.75, 0.5)]
events.write_weight_summaries({str(tmp_path)!r}, rows[:1], "loss")
# A second call within the same second must not replace the first file.
events.write_weight_summaries({str(tmp_path)!r}, rows[1:], "loss")
print([(p.step, p.value) for p in events.read_metric([{str(tmp_path)!r}],
                                                     "t2t_avg/weight")])
print([(p.step, p.value) for p in events.read_metric([{str(tmp_path)!r}],
                                                     "t2t_avg/loss")])
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=False,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split("\n")[:2] == ["[(10, 0.25), (20, 0.75)]",
                                           "[(10, 1.5), (20, 0.5)]"]
