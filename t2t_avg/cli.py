"""Command-line flags (legacy avg_checkpoints and t2t-avg-all names) → library calls."""
import math
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from t2t_avg import weighting
from t2t_avg.errors import AveragingError

# --- legacy avg_checkpoints.py ---------------------------------------------
_CHECKPOINTS = flags.DEFINE_string(
    "checkpoints", "", "Comma-separated list of checkpoints to average "
    "(prefixes, or directories meaning their latest checkpoint).")
_NUM_LAST = flags.DEFINE_integer(
    "num_last_checkpoints", 0, "Averages the last N saved checkpoints. If the "
    "checkpoints flag is set, this is ignored.")
_PREFIX = flags.DEFINE_string(
    "prefix", "", "Prefix (e.g., directory) to append to each checkpoint; "
    "with --num_last_checkpoints its dirname holds the `checkpoint` file.")
_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", "/tmp/averaged.ckpt", "Path to output the averaged "
    "checkpoint to; saved as <output_path>-<output step>.")
# --- t2t_avg additions ---------------------------------------------------
_OUTPUT_STEP = flags.DEFINE_string(
    "output_step", "zero", "'zero' (legacy: -0, global_step 0), 'last' (the "
    "newest input's step) or an integer.")
_WEIGHTING = flags.DEFINE_enum("weighting", "uniform", weighting.SCHEMES,
                               "How checkpoints are weighted.")
_WEIGHTS = flags.DEFINE_string(
    "weights", "", "With --weighting=explicit: one weight per checkpoint, in "
    "checkpoint order.")
_METRICS_FROM_EVENTS = flags.DEFINE_string(
    "metrics_from_events", "", "Comma-separated TensorBoard event files or "
    "directories (each directory one run, not recursive).")
_METRIC = flags.DEFINE_string("metric", "loss", "The scalar tag to weight by.")
_METRIC_MODE = flags.DEFINE_enum(
    "metric_mode", "auto", ["auto", "min", "max"],
    "Whether lower (min) or higher (max) metric values are better; auto "
    "infers it from the tag.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Softmax temperature in the metric's units; 0 means "
    "the standard deviation of the checkpoints' metric values.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "With --weighting=top_k: how many "
                              "of the best checkpoints to average.")
_MAX_STEP_GAP = flags.DEFINE_integer(
    "max_step_gap", 0, "0: a metric must be logged at the checkpoint's exact "
    "step; g > 0: the nearest preceding point within g steps counts.")
_MISSING_METRIC = flags.DEFINE_enum(
    "missing_metric", "error", ["error", "skip"],
    "A checkpoint without a metric: fail, or leave it out with a warning.")
_ALLOW_NONFINITE = flags.DEFINE_boolean(
    "allow_nonfinite", False, "Average tensors holding NaN/inf instead of "
    "refusing.")
_EXCLUDE_VARIABLES = flags.DEFINE_string(
    "exclude_variables", "", "Regex; matching variables are left out of the "
    "output (e.g. optimizer slots).")
_STEP_FROM = flags.DEFINE_string(
    "step_from", "auto", "Where a checkpoint's step comes from: auto, name, "
    "or a tensor key.")
_DRY_RUN = flags.DEFINE_boolean(
    "dry_run", False, "Validate and print the table of checkpoints, steps, "
    "metrics and weights; write nothing.")
_WEIGHT_SUMMARIES = flags.DEFINE_boolean(
    "weight_summaries", False, "Also write metric and weight per step as "
    "TensorBoard scalars in <output dir>/t2t_avg/.")
_WRITE_META = flags.DEFINE_boolean(
    "write_meta", False, "Also write a .meta graph of the bare variables, "
    "as legacy did.")
# --- legacy t2t-avg-all ----------------------------------------------------
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", "", "Directory to load model checkpoints from; given to "
    "python -m t2t_avg, it runs the continuous mode.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "avg/", "Directory to output the averaged checkpoints to.")
_N = flags.DEFINE_integer("n", 8, "How many checkpoints should be averaged?")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 0,
                                  "Ignore checkpoints with less steps.")
_WAIT_MINUTES = flags.DEFINE_integer(
    "wait_minutes", 0, "Wait upto N minutes for a new checkpoint.")

_INTERRUPTED_CONTINUOUS = ("the outputs written so far are complete; the one "
                           "in progress was not written")
_ONE_SHOT_ONLY = ("checkpoints", "num_last_checkpoints", "prefix",
                  "output_path", "output_step", "dry_run", "write_meta")
_CONTINUOUS_ONLY = ("output_dir", "n", "min_steps", "wait_minutes")


def _fail(message: str) -> None:
  sys.stderr.write(f"t2t_avg: error: {message}\n")
  sys.exit(1)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))


def _present(name: str) -> bool:
  return flags.FLAGS[name].present


def _output_step(text: str):
  if text in ("zero", "last"):
    return text
  try:
    step = int(text)
  except ValueError:
    step = -1
  if step < 0:
    raise ValueError(f"--output_step must be zero, last or an integer >= 0, "
                     f"not {text!r}")
  return step


def _explicit_weights():
  if _WEIGHTING.value != "explicit":
    if _WEIGHTS.value:
      raise ValueError("--weights needs --weighting=explicit")
    return None
  if not _WEIGHTS.value:
    raise ValueError("--weighting=explicit needs --weights")
  try:
    weights = [float(w) for w in _WEIGHTS.value.split(",")]
  except ValueError as e:
    raise ValueError(f"--weights must be comma-separated numbers, not "
                     f"{_WEIGHTS.value!r}") from e
  # Checked here, before TensorFlow is imported, as every flag is.
  if not all(math.isfinite(w) and w >= 0 for w in weights) or not (
      sum(weights) > 0):
    raise ValueError(f"--weights must be finite and >= 0 with a sum > 0, not "
                     f"{_WEIGHTS.value!r}")
  return weights


def _check_weighting_flags() -> None:
  scheme = _WEIGHTING.value
  if scheme in weighting.METRIC_SCHEMES and not _METRICS_FROM_EVENTS.value:
    raise ValueError(f"--weighting={scheme} needs --metrics_from_events")
  if (_TOP_K.value != 0) != (scheme == "top_k"):
    raise ValueError("--top_k goes with --weighting=top_k (and needs k >= 1)")
  if _TOP_K.value < 0:
    raise ValueError(f"--top_k must be >= 1, not {_TOP_K.value}")
  if _TEMPERATURE.value < 0:
    raise ValueError(f"--temperature must be >= 0, not {_TEMPERATURE.value}")
  if _present("temperature") and scheme != "softmax":
    raise ValueError("--temperature goes with --weighting=softmax")
  if _MAX_STEP_GAP.value < 0:
    raise ValueError(f"--max_step_gap must be >= 0, not {_MAX_STEP_GAP.value}")
  if scheme in weighting.METRIC_SCHEMES and _METRIC_MODE.value == "auto":
    # Raises, asking for --metric_mode, when the tag does not say.
    from t2t_avg import events  # pylint: disable=import-outside-toplevel
    events.infer_direction(_METRIC.value)


def _check_exclude_variables() -> None:
  try:
    re.compile(_EXCLUDE_VARIABLES.value)
  except re.error as e:
    raise ValueError(f"--exclude_variables: bad regex "
                     f"{_EXCLUDE_VARIABLES.value!r}: {e}") from e


def _weighting_args() -> dict:
  """The weighting flags as plain keyword arguments."""
  return dict(
      scheme=_WEIGHTING.value,
      explicit=_explicit_weights(),
      event_sources=[s.strip() for s in _METRICS_FROM_EVENTS.value.split(",")
                     if s.strip()],
      tag=_METRIC.value,
      mode=_METRIC_MODE.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      max_step_gap=_MAX_STEP_GAP.value,
      missing_metric=_MISSING_METRIC.value,
  )


def _run_once(argv) -> None:
  del argv
  for name in _CONTINUOUS_ONLY:
    if _present(name):
      raise ValueError(f"--{name} goes with --model_dir (continuous mode)")
  output_step = _output_step(_OUTPUT_STEP.value)
  listed = [c for c in _CHECKPOINTS.value.split(",") if c.strip()]
  if _CHECKPOINTS.value:
    if _NUM_LAST.value:
      logging.warning("--num_last_checkpoints is ignored because "
                      "--checkpoints is set")
    if not listed:
      raise ValueError("--checkpoints: no checkpoints given")
  elif _NUM_LAST.value < 1:
    raise ValueError("give --checkpoints, or --num_last_checkpoints >= 1 with "
                     "--prefix")
  elif not _PREFIX.value:
    raise ValueError("--num_last_checkpoints needs --prefix (its dirname "
                     "holds the `checkpoint` state file)")
  _check_weighting_flags()
  _check_exclude_variables()
  weighting_args = _weighting_args()
  explicit = weighting_args["explicit"]
  if explicit is not None and listed and len(explicit) != len(listed):
    raise ValueError(f"--weights gives {len(explicit)} weights for the "
                     f"{len(listed)} checkpoints of --checkpoints")

  # TensorFlow prints start-up notices: imported only once flags are valid.
  from t2t_avg import oneshot  # pylint: disable=import-outside-toplevel
  oneshot.run(checkpoints=listed, prefix=_PREFIX.value,
              num_last=_NUM_LAST.value, output_path=_OUTPUT_PATH.value,
              output_step=output_step,
              exclude_variables=_EXCLUDE_VARIABLES.value,
              allow_nonfinite=_ALLOW_NONFINITE.value,
              step_from=_STEP_FROM.value, write_meta=_WRITE_META.value,
              dry_run=_DRY_RUN.value,
              weight_summaries=_WEIGHT_SUMMARIES.value, **weighting_args)


def _run_continuous(argv) -> None:
  del argv
  for name in _ONE_SHOT_ONLY:
    if _present(name):
      raise ValueError(f"--{name} is for one-shot averaging; it does not go "
                       "with --model_dir")
  if not _MODEL_DIR.value:
    raise ValueError("--model_dir is required")
  if _N.value < 1:
    raise ValueError(f"--n must be >= 1, not {_N.value}")
  same = (os.path.realpath(_MODEL_DIR.value) == os.path.realpath(
      _OUTPUT_DIR.value)) if "://" not in _MODEL_DIR.value else (
          _MODEL_DIR.value.rstrip("/") == _OUTPUT_DIR.value.rstrip("/"))
  if same:
    raise ValueError(f"--output_dir {_OUTPUT_DIR.value} is the training "
                     f"directory --model_dir {_MODEL_DIR.value}; choose "
                     "another --output_dir")
  if _WAIT_MINUTES.value < 0 or _MIN_STEPS.value < 0:
    raise ValueError("--wait_minutes and --min_steps must be >= 0")
  _check_weighting_flags()
  _check_exclude_variables()
  weighting_args = _weighting_args()
  from t2t_avg import watch  # pylint: disable=import-outside-toplevel
  watch.run(model_dir=_MODEL_DIR.value, output_dir=_OUTPUT_DIR.value,
            n=_N.value, min_steps=_MIN_STEPS.value,
            wait_minutes=_WAIT_MINUTES.value,
            exclude_variables=_EXCLUDE_VARIABLES.value,
            allow_nonfinite=_ALLOW_NONFINITE.value, step_from=_STEP_FROM.value,
            weight_summaries=_WEIGHT_SUMMARIES.value, **weighting_args)


def _guarded(run, interrupted: str):
  """Runs a mode; domain and argument errors become one line and exit 1."""
  def main(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      run(argv)
    except KeyboardInterrupt:
      _fail(f"interrupted; {interrupted}")
    except (AveragingError, ValueError, OSError) as e:
      _fail(str(e))
    except Exception as e:  # pylint: disable=broad-except
      tf = sys.modules.get("tensorflow")
      if tf is not None and isinstance(e, tf.errors.OpError):
        _fail(e.message.strip().splitlines()[0])
      raise
  return main


def main(argv):
  """`python -m t2t_avg`: one-shot, or continuous when --model_dir is given."""
  if _MODEL_DIR.value:
    _guarded(_run_continuous, _INTERRUPTED_CONTINUOUS)(argv)
  else:
    _guarded(_run_once, "nothing was written")(argv)


def _show_flags_in_help() -> None:
  # --help lists the main program's key flags; ours are defined here.
  for flag in flags.FLAGS.get_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run_main():
  _show_flags_in_help()
  app.run(main, flags_parser=_parse_flags)


def run_avg_all():
  """The `t2t-avg-all` console script: the continuous mode."""
  _show_flags_in_help()
  app.run(_guarded(_run_continuous, _INTERRUPTED_CONTINUOUS),
          flags_parser=_parse_flags)
