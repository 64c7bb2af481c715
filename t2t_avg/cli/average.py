"""Command-line flags (legacy avg_checkpoints and t2t-avg-all names) → typed options.

The only module that defines the averaging flags. `main` turns them into the
frozen option dataclasses of `options` (validated there, before TensorFlow
is imported) and calls the one-shot or the continuous mode.
"""
from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn, Optional
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging

from t2t_avg.files import filesystem
from t2t_avg.files import tf_loader
from t2t_avg import options
from t2t_avg.inputs import prefetch
from t2t_avg.errors import ArgumentError, WordedError
from t2t_avg.record import AveragingResult

_ONE_SHOT = "[one-shot] "
_CONTINUOUS = "[continuous: --model_dir, t2t-avg-all] "
_BOTH = "[both modes] "

# --- legacy avg_checkpoints.py ---------------------------------------------
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "", _ONE_SHOT + "Comma-separated list of checkpoints to "
    "average (prefixes, or directories meaning their latest checkpoint; or "
    "Keras .weights.h5 / .keras files).")
_NUM_LAST = flags.DEFINE_integer(
    "num_last_checkpoints", 0, _ONE_SHOT + "Averages the last N saved "
    "checkpoints. If the checkpoints flag is set, this is ignored.")
_PREFIX = flags.DEFINE_string(
    "prefix", "", _ONE_SHOT + "Prefix (e.g., directory) string-prepended to "
    "each checkpoint; with --num_last_checkpoints its dirname holds the "
    "`checkpoint` state file (Keras files, which have none: the files in its "
    "dirname whose names start with its basename, by iteration counter).")
_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", "/tmp/averaged.ckpt", _ONE_SHOT + "Path to output the "
    "averaged checkpoint to; saved as <output_path>-<output step>. Keras "
    "inputs: saved at <output_path> exactly, in their format, so it must end "
    "in .weights.h5 or .keras.")
# --- t2t_avg additions ---------------------------------------------------
_OUTPUT_STEP = flags.DEFINE_string(
    "output_step", "zero", _ONE_SHOT + "'zero' (legacy: -0, global_step 0), "
    "'last' (the newest input's step) or an integer.")
_WEIGHTING = flags.DEFINE_enum(
    "weighting", "uniform", options.SCHEMES, _BOTH + "How checkpoints are "
    "weighted ('greedy': one-shot only, with --eval_command).")
_WEIGHTS = flags.DEFINE_string(
    "weights", "", _BOTH + "With --weighting=explicit: one weight per "
    "checkpoint, in checkpoint order (continuous: per window position).")
_METRICS_FROM_EVENTS = flags.DEFINE_string(
    "metrics_from_events", "", _BOTH + "Comma-separated TensorBoard event "
    "files or directories (each directory one run, not recursive), or Keras "
    "CSVLogger files (told apart by content).")
_METRIC = flags.DEFINE_string("metric", "loss",
                              _BOTH + "The scalar tag to weight by.")
_METRIC_MODE = flags.DEFINE_enum(
    "metric_mode", "auto", options.METRIC_MODES,
    _BOTH + "Whether lower (min) or higher (max) metric values are better; "
    "auto infers it from the tag.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, _BOTH + "Softmax temperature in the metric's units; "
    "0 means the population standard deviation (numpy's std, ddof=0) of the "
    "chosen checkpoints' metric values.")
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, _BOTH + "With --weighting=top_k (required there): how many "
    "of the best checkpoints to average.")
_MAX_STEP_GAP = flags.DEFINE_integer(
    "max_step_gap", 0, _BOTH + "0: a metric must be logged at the "
    "checkpoint's exact step; g > 0: the nearest preceding point within g "
    "steps counts.")
_MISSING_METRIC = flags.DEFINE_enum(
    "missing_metric", "error", options.MISSING_METRIC,
    _BOTH + "A checkpoint without a metric: fail, or leave it out with a "
    "warning.")
_ALLOW_NONFINITE = flags.DEFINE_boolean(
    "allow_nonfinite", False, _BOTH + "Average tensors holding NaN/inf "
    "instead of refusing.")
_EXCLUDE_VARIABLES = flags.DEFINE_string(
    "exclude_variables", "", _BOTH + "Regex; matching variables are left out "
    "of the output (e.g. optimizer slots).")
_STEP_FROM = flags.DEFINE_string(
    "step_from", "auto", _BOTH + "Where a checkpoint's step comes from: auto, "
    "name, or a tensor key.")
_NAME_PATTERN = flags.DEFINE_string(
    "name_pattern", "", _BOTH + "The ModelCheckpoint filepath that named the "
    "Keras files, e.g. 's-{epoch:02d}-{batch:03d}.weights.h5': the number at "
    "{epoch} is a file's epoch (needed to pair files whose names hold "
    "several numbers with a metric logged per epoch).")
_MIN_STEP = flags.DEFINE_integer(
    "min_step", None, _ONE_SHOT + "Average no checkpoint below this step "
    "(inclusive bound, applied before any other choice).")
_MAX_STEP = flags.DEFINE_integer(
    "max_step", None, _BOTH + "Average no checkpoint above this step "
    "(inclusive bound, applied before any other choice).")
_STRIDE = flags.DEFINE_integer(
    "stride", 1, _BOTH + "Every k-th checkpoint, counting back from the "
    "newest chosen (continuous: windows of checkpoints k apart).")
_SELECT = flags.DEFINE_enum(
    "select", "last", ["last", "best_window"],
    _ONE_SHOT + "'last': the last N; 'best_window': the N consecutive "
    "checkpoints ending at the best by the metric.")
_EVAL_COMMAND = flags.DEFINE_string(
    "eval_command", "", _ONE_SHOT + "A command scoring a candidate: "
    "{checkpoint} is replaced by its path (a TF prefix or a Keras file); the "
    "score is the last line of its stdout. Run without a shell. With "
    "--weighting=greedy it builds the soup; otherwise it scores the average "
    "beside the uniform one and the best single checkpoint.")
_EVAL_TIMEOUT = flags.DEFINE_float(
    "eval_timeout", None, _ONE_SHOT + "Seconds one run of --eval_command may "
    "take (default: no limit).")
_GREEDY_TOLERANCE = flags.DEFINE_float(
    "greedy_tolerance", 0.0, _ONE_SHOT + "With --weighting=greedy: how much "
    "worse (in the score's units) a soup may score and keep its candidate.")
_DRY_RUN = flags.DEFINE_boolean(
    "dry_run", False, _ONE_SHOT + "Validate and print the table of "
    "checkpoints, steps, metrics and weights; write nothing.")
_WEIGHT_SUMMARIES = flags.DEFINE_boolean(
    "weight_summaries", False, _BOTH + "Also write metric and weight per step "
    "as TensorBoard scalars in <output dir>/t2t_avg/.")
_WRITE_META = flags.DEFINE_boolean(
    "write_meta", False, _ONE_SHOT + "Also write a .meta graph of the bare "
    "variables, as legacy did.")
# --- legacy t2t-avg-all ----------------------------------------------------
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", "", _CONTINUOUS + "Directory to load model checkpoints from; "
    "given to python -m t2t_avg, it runs the continuous mode.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "avg/", _CONTINUOUS + "Directory to output the averaged "
    "checkpoints to (Keras files: <output_dir>/<the window's newest file "
    "name>).")
_N = flags.DEFINE_integer("n", 8, _CONTINUOUS + "How many checkpoints should "
                          "be averaged?")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 0, _CONTINUOUS + "Ignore "
                                  "checkpoints with less steps.")
_WAIT_MINUTES = flags.DEFINE_integer(
    "wait_minutes", 0, _CONTINUOUS + "Wait upto N minutes for a new "
    "checkpoint.")
_RECOMPUTE = flags.DEFINE_boolean(
    "recompute", False, _CONTINUOUS + "Replace outputs in --output_dir whose "
    "record shows other settings (other weighting, --n, ...); without it such "
    "a directory is refused.")

_INTERRUPTED_CONTINUOUS = ("the outputs written so far are complete; the one "
                           "in progress was not written")
_ONE_SHOT_ONLY = ("checkpoints", "num_last_checkpoints", "prefix",
                  "output_path", "output_step", "dry_run", "write_meta",
                  "min_step", "select", "eval_command", "eval_timeout",
                  "greedy_tolerance")
_CONTINUOUS_ONLY = ("output_dir", "n", "min_steps", "wait_minutes",
                    "recompute")
# TF's start-up notices on stderr; t2t_avg's arithmetic is numpy, not oneDNN.
_QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
USAGE = """Average TensorFlow checkpoints (a drop-in for T2T's avg_checkpoints.py).

One-shot:   python -m t2t_avg --prefix=train/ --num_last_checkpoints=8 \\
              --output_path=avg/averaged.ckpt
            writes avg/averaged.ckpt-0 (--output_step: zero, last or N).
Continuous: t2t-avg-all --model_dir=train --output_dir=train/avg --n=8
            (or python -m t2t_avg --model_dir=...) writes
            <output_dir>/model.ckpt-<N> for each new checkpoint.
Keras 3:    .weights.h5 and .keras inputs (ModelCheckpoint's files) give an
            output in their format at --output_path exactly as given (it
            must end in .weights.h5 or .keras); t2t-avg-all writes
            <output_dir>/<the window's newest file name>.

Flags say which mode they belong to: [one-shot], [continuous], [both modes].
TensorFlow's start-up notices are silenced (TF_CPP_MIN_LOG_LEVEL=3,
TF_ENABLE_ONEDNN_OPTS=0) unless those variables are set.
"""


def _fail(message: str) -> NoReturn:
  sys.stderr.write(f"t2t_avg: error: {message}\n")
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))


def _present(name: str) -> bool:
  return bool(flags.FLAGS[name].present)


def _split(text: str) -> tuple:
  return tuple(s.strip() for s in text.split(",") if s.strip())


def weighting_options() -> options.WeightingOptions:
  """The weighting flags, validated."""
  weights = options.parse_weights(_WEIGHTS.value) if _WEIGHTS.value else None
  if _present("temperature") and _WEIGHTING.value != "softmax":
    raise ArgumentError("{temperature} goes with {weighting}=softmax")
  return options.WeightingOptions(
      weighting=_WEIGHTING.value, weights=weights,
      metrics_from_events=_split(_METRICS_FROM_EVENTS.value),
      metric=_METRIC.value, metric_mode=_METRIC_MODE.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      max_step_gap=_MAX_STEP_GAP.value, missing_metric=_MISSING_METRIC.value,
      greedy_tolerance=_GREEDY_TOLERANCE.value)


def selection_options() -> options.SelectionOptions:
  """The selection flags, validated."""
  return options.SelectionOptions(
      min_step=_MIN_STEP.value, max_step=_MAX_STEP.value,
      stride=_STRIDE.value, select=_SELECT.value)


def evaluation_options() -> Optional[options.EvalOptions]:
  """The eval command, or None; its score's direction must be known."""
  if not _EVAL_COMMAND.value:
    if _present("eval_timeout"):
      raise ArgumentError("{eval_timeout} goes with {eval_command}")
    return None
  if _METRIC_MODE.value == "auto" and not _present("metric"):
    raise ArgumentError("{eval_command}: say whether a higher or a lower "
                        "score is better, with {metric_mode}=max|min (or name "
                        "the score with {metric}, e.g. {metric}=bleu)")
  return options.EvalOptions(eval_command=_EVAL_COMMAND.value,
                                eval_timeout=_EVAL_TIMEOUT.value)


def averaging_options() -> options.AveragingOptions:
  """The flags of how tensors are averaged, validated."""
  return options.AveragingOptions(
      exclude_variables=_EXCLUDE_VARIABLES.value,
      allow_nonfinite=_ALLOW_NONFINITE.value, step_from=_STEP_FROM.value,
      weight_summaries=_WEIGHT_SUMMARIES.value,
      name_pattern=_NAME_PATTERN.value)


def _run_once(argv: list[str]) -> None:
  del argv
  for name in _CONTINUOUS_ONLY:
    if _present(name):
      raise ArgumentError("{%s} goes with {model_dir} (continuous mode)" %
                          name)
  inputs = options.InputOptions(
      checkpoints=tuple(_CHECKPOINTS.value.split(",")) if
      _CHECKPOINTS.value else (), prefix=_PREFIX.value,
      num_last_checkpoints=_NUM_LAST.value)
  if inputs.checkpoints and _NUM_LAST.value:
    logging.warning("--num_last_checkpoints is ignored because --checkpoints "
                    "is set")
  output = options.OutputOptions(
      output_path=_OUTPUT_PATH.value, output_step=_OUTPUT_STEP.value,
      write_meta=_WRITE_META.value, dry_run=_DRY_RUN.value)
  settings = options.OneShotSettings(
      inputs, output, averaging_options(), weighting_options(),
      selection_options(), evaluation_options())
  if not output.dry_run:
    prefetch.start(prefetch.input_prefixes(inputs))
  # Local V2 checkpoints and Keras files are read, averaged and written
  # without TensorFlow (its start-up notices and seconds); what needs TF
  # (gs:// paths, V1 checkpoints, event files, --write_meta) imports it.
  _import_numpy_without_blas_threads()
  from t2t_avg.jobs import oneshot  # pylint: disable=import-outside-toplevel
  _quiet_collector(run_ends_soon=True)
  result = oneshot.run(settings)
  if output.dry_run:
    print(format_table(result))


def _run_continuous(argv: list[str]) -> None:
  del argv
  for name in _ONE_SHOT_ONLY:
    if _present(name):
      raise ArgumentError("{%s} is for one-shot averaging; it does not go "
                          "with {model_dir}" % name)
  settings = options.ContinuousOptions(
      model_dir=_MODEL_DIR.value, output_dir=_OUTPUT_DIR.value, n=_N.value,
      min_steps=_MIN_STEPS.value, wait_minutes=_WAIT_MINUTES.value,
      recompute=_RECOMPUTE.value, max_step=_MAX_STEP.value,
      stride=_STRIDE.value)
  weighing, averaging = weighting_options(), averaging_options()
  settings.check_weighting(weighing)
  _import_numpy_without_blas_threads()
  from t2t_avg.jobs import continuous  # pylint: disable=import-outside-toplevel
  _quiet_collector(run_ends_soon=False)
  continuous.run(settings, weighting_options=weighing, averaging_options=averaging)


def _quiet_collector(*, run_ends_soon: bool) -> None:
  """Keeps Python's cycle collector off TensorFlow's objects (and ours).

  Indexes of many small tensors make hundreds of thousands of small objects;
  each collection then walks TensorFlow's millions too. Measured on 8
  checkpoints of 20,000 tensors: opening them took 2.2 s, and 0.7 s with
  TF's objects frozen and collection off. A one-shot run ends soon and frees
  by reference counting; the continuous mode keeps collecting, without TF's.
  """
  gc.freeze()
  if run_ends_soon:
    gc.disable()


def format_table(result: AveragingResult) -> str:
  """The checkpoints, steps, metric values and weights, as a text table."""
  # A greedy soup's weights depend on evaluations a dry run does not make.
  greedy = result.record.get("weighting", {}).get("scheme") == "greedy"
  left_out = result.record.get("left_out", [])
  width = max(len(p) for p in [r.path for r in result.rows] +
              [c["path"] for c in left_out])
  lines = [f"{'checkpoint':<{width}}  {'step':>10}  {'metric':>12}  "
           f"{'weight':>8}"]
  for r in result.rows:
    metric = "-" if r.metric is None else f"{r.metric:.6g}"
    step = "?" if r.step is None else str(r.step)
    weight = "-" if greedy else f"{r.weight:.4f}"
    lines.append(f"{r.path:<{width}}  {step:>10}  {metric:>12}  "
                 f"{weight:>8}")
  for c in left_out:  # missing_metric=skip
    step = "?" if c["step"] is None else str(c["step"])
    lines.append(f"{c['path']:<{width}}  {step:>10}  {'none':>12}  "
                 "left out (no metric)")
  if greedy:
    lines.append("greedy soup: the weights are known only after evaluating; "
                 f"output: {result.output_path}")
  else:
    lines.append("effective number of checkpoints: "
                 f"{result.effective_count:.2f} of {len(result.rows)}; "
                 f"output: {result.output_path}")
  order = result.record.get("weighting", {}).get("order")
  if isinstance(order, list):
    lines.append("greedy soup order (best first): " + ", ".join(order))
  elif order:
    lines.append(f"greedy soup order: {order}")
  return "\n".join(lines)


def _guarded(run: Callable[[list[str]], None],
             interrupted: str) -> Callable[[list[str]], None]:
  """Runs a mode; argument and domain errors become one line and exit 1.

  Anything else is a bug and keeps its traceback, except TensorFlow's own
  errors about a file (shown as their first line).
  """
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      run(argv)
    except KeyboardInterrupt:
      _fail(f"interrupted; {interrupted}")
    except WordedError as e:  # ArgumentError, AveragingError
      _fail(e.message(as_flags=True))
    except Exception as e:  # pylint: disable=broad-except
      tf = sys.modules.get("tensorflow")
      if tf is not None and isinstance(e, tf.errors.OpError):
        _fail(e.message.strip().splitlines()[0])
      if isinstance(e, filesystem.GFileError) and str(e).strip():
        _fail(str(e).strip().splitlines()[0])  # The same, through filesystem.
      raise
  return main


def main(argv: list[str]) -> None:
  """`python -m t2t_avg`: one-shot, or continuous when --model_dir is given."""
  if _MODEL_DIR.value:
    _guarded(_run_continuous, _INTERRUPTED_CONTINUOUS)(argv)
  else:
    _guarded(_run_once, "nothing was written")(argv)


def _import_numpy_without_blas_threads() -> None:
  """Imports numpy with OpenBLAS on one thread, unless the user chose.

  t2t_avg calls no BLAS routine, but OpenBLAS starts a worker per core that
  spins a while: on 2 cores they took CPU from the averaging threads
  (measured, 8 x 433 MB, warm, medians of 3: 1.73 s and 2.63 s of CPU; on
  one thread 1.34 s and 1.87 s). The variable is gone again once numpy is
  loaded, so commands t2t_avg runs (`--eval_command`) get the user's
  environment.
  """
  if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
    return
  os.environ["OPENBLAS_NUM_THREADS"] = "1"
  try:
    import numpy  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  finally:
    del os.environ["OPENBLAS_NUM_THREADS"]


def _quiet_tensorflow() -> None:
  """Silences TF's start-up notices unless the user asked for TF's logging
  (TF_CPP_MIN_LOG_LEVEL below 3)."""
  asked = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3").strip() not in ("3", "")
  for name, value in _QUIET_TF.items():
    os.environ.setdefault(name, value)
  if not asked:
    tf_loader.quiet_native_notices()


def _show_flags_in_help() -> None:
  # --help shows the main module's docstring and key flags: ours.
  sys.modules["__main__"].__doc__ = USAGE
  for flag in flags.FLAGS.get_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run_main() -> None:
  """`python -m t2t_avg`."""
  _quiet_tensorflow()
  _show_flags_in_help()
  app.run(main, flags_parser=_parse_flags)


def run_avg_all() -> None:
  """The `t2t-avg-all` console script: the continuous mode."""
  _quiet_tensorflow()
  _show_flags_in_help()
  app.run(_guarded(_run_continuous, _INTERRUPTED_CONTINUOUS),
          flags_parser=_parse_flags)
