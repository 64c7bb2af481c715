"""What a metric means: one logged point, and whether lower or higher is better."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional
from collections.abc import Sequence

from absl import logging

from t2t_avg.errors import ArgumentError

MODES = ("min", "max")
# What a point's `step` counts (see `keras_logs` for how each aligns).
STEP = "step"  # the training step, as TF checkpoints count it
EPOCH = "epoch"  # the 0-based epoch (Keras `epoch_*` tags, CSVLogger rows)
ITERATIONS = "iterations"  # optimizer iterations (Keras `*_vs_iterations`)


@dataclasses.dataclass(frozen=True)
class MetricPoint:
  """One logged value of a scalar metric, and what its step counts."""
  step: int
  wall_time: float
  value: float
  kind: str = STEP


_HIGHER_BETTER = ("accuracy", "acc", "bleu", "rouge", "f1", "fscore", "chrf",
                  "precision", "recall", "likelihood", "auc")
_LOWER_BETTER = ("loss", "perplexity", "ppl", "wer", "ter", "cer", "error",
                 "distance", "rmse", "mse", "mae", "crossentropy")


def _matches(tokens: Sequence[str], keywords: Sequence[str]) -> bool:
  """Whether a token holds a keyword (see `infer_direction`)."""
  for token in tokens:
    for keyword in keywords:
      if len(keyword) >= 4:
        if keyword in token:
          return True
      elif (token.startswith(keyword) and
            not re.search(r"[a-z]", token[len(keyword):])):
        return True
  return False


def infer_direction(tag: str) -> str:
  """Whether a lower or a higher value of a metric is better, from its tag.

  The tag's last `/` component is split on `_` and `-` and lower-cased.
  Higher is better ('max') when a token starts with `neg` (T2T's
  `neg_log_perplexity`) or matches one of accuracy, acc, bleu, rouge, f1,
  fscore, chrf, precision, recall, likelihood, auc, or the name holds
  `r_squared`; otherwise lower is better ('min') when a token matches one of
  loss, perplexity, ppl, wer, ter, cer, error, distance, rmse, mse, mae,
  crossentropy.

  A token matches a keyword of 4 or more letters when it contains it
  (`rougeL`, `sacrebleu`, `valloss`), and a shorter keyword when it is the
  keyword followed by no letters (`acc`, `acc5`, `f1`; not `accumulated`,
  `term` or `certainty`). So `approx_bleu_score`, `rouge_2_fscore`,
  `BLEU_cased`, `accuracy_per_sequence`, `val_auc` give 'max'; `val_loss`,
  `perplexity`, `edit_distance`, `val_sparse_categorical_crossentropy` give
  'min'; `lr`, `learning_rate`, `global_step` are errors.
  Note that `neg_log_likelihood` gives 'max', by the `neg` rule.

  Args:
    tag: a scalar tag, e.g. `metrics-translate_ende/targets/approx_bleu_score`.

  Returns:
    'min' or 'max'.

  Raises:
    ArgumentError: the tag says neither; the message asks for
      `metric_mode=min|max`.
  """
  tokens = re.split(r"[_-]", tag.rsplit("/", 1)[-1].lower())
  if (any(token.startswith("neg") for token in tokens) or
      _matches(tokens, _HIGHER_BETTER) or "r_squared" in "_".join(tokens)):
    return "max"
  if _matches(tokens, _LOWER_BETTER):
    return "min"
  raise ArgumentError(
      "cannot tell whether a lower or a higher {tag!r} is better; pass "
      "{metric_mode}=min|max", tag=tag)


def check_mode(mode: str) -> None:
  """Refuses a direction other than 'min' or 'max'.

  Raises:
    ArgumentError: naming `metric_mode`.
  """
  if mode not in MODES:
    raise ArgumentError("{metric_mode} must be 'min' or 'max', not {mode!r}",
                        mode=mode)


def is_valid(value: Optional[float]) -> bool:
  """Whether a metric value counts: present and finite."""
  return value is not None and math.isfinite(value)


def direction(tag: str, metric_mode: str) -> str:
  """'min' or 'max': `metric_mode` as given, or inferred from the tag (logged).

  Raises:
    ArgumentError: `metric_mode` is 'auto' and the tag says neither.
  """
  if metric_mode in MODES:
    return metric_mode
  mode = infer_direction(tag)
  logging.info("Metric %s: %s is better (from its name; override with "
               "--metric_mode)", tag, "lower" if mode == "min" else "higher")
  return mode
