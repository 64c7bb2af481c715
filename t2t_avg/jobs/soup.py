"""Choosing by the user's own evaluation: the greedy soup, and scores beside an average.

Candidate averages are written into a private temporary directory beside the
output (see `files.shared_dir`), scored by the user's eval command one at a time
and deleted; the directory goes at the end, also on errors and Ctrl-C (one a
killed run leaves, the next run removes). A single checkpoint is scored as
it is, without a copy.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Optional

from absl import logging

from t2t_avg.engine import averaging
from t2t_avg.jobs import evaluation
from t2t_avg import options
from t2t_avg.files import paths
from t2t_avg.files import shared_dir
from t2t_avg.inputs import greedy
from t2t_avg.inputs.checkpoints import Checkpoint
from t2t_avg.errors import ArgumentError


class Candidates:
  """Averages of chosen inputs, written and scored on demand (a context)."""

  def __init__(self, inputs: Sequence[Checkpoint], output_path: str,
               evaluation_options: options.EvalOptions,
               averaging_options: options.AveragingOptions):
    self._inputs = list(inputs)
    self._output_dir = os.path.dirname(output_path) or "."
    self._eval = evaluation_options
    self._averaging = averaging_options
    self._tmp_dir: Optional[str] = None
    self._made_dirs: list[str] = []  # Deepest first.
    self._count = 0
    self._evaluations = 0
    self.planned = 0  # Evaluations at most, for the progress lines.

  def __enter__(self) -> Candidates:
    if not paths.is_local(self._output_dir):
      raise ArgumentError("{eval_command} writes candidate averages beside "
                          "{output_path}, which must be a local directory")
    missing = self._output_dir
    while missing and not os.path.isdir(missing):
      self._made_dirs.append(missing)
      missing = os.path.dirname(missing)
    os.makedirs(self._output_dir, exist_ok=True)
    self._tmp_dir = shared_dir.make_temporary_dir(self._output_dir,
                                                  "candidates")
    return self

  def __exit__(self, *exc_info: object) -> None:
    if self._tmp_dir is not None:
      shutil.rmtree(self._tmp_dir, ignore_errors=True)
      self._tmp_dir = None
    # A run that fails leaves no directory either (the output, when there is
    # one, makes its own).
    for directory in self._made_dirs:
      try:
        os.rmdir(directory)
      except OSError:  # Not empty: someone else's files are in it.
        break
    self._made_dirs = []

  def name(self, indices: Sequence[int]) -> str:
    """How the log and messages name a candidate."""
    chosen = [os.path.basename(self._inputs[i].path) for i in indices]
    if len(chosen) == 1:
      return f"{chosen[0]} alone"
    return f"the average of {', '.join(chosen)}"

  def score(self, indices: Sequence[int]) -> float:
    """The eval command's score of the uniform average of `indices`."""
    self._evaluations += 1
    logging.info("Evaluation %d of at most %d: %s", self._evaluations,
                 max(self.planned, self._evaluations), self.name(indices))
    if len(indices) == 1:
      return evaluation.evaluate(self._eval, self._inputs[indices[0]].path,
                                 candidate=self.name(indices))
    assert self._tmp_dir is not None, "use Candidates as a context manager"
    self._count += 1
    source = self._inputs[indices[0]].source
    suffix = "" if source is None else source.format.suffix  # Keras files
    result = averaging.average_checkpoints(
        [self._inputs[i] for i in indices],
        os.path.join(self._tmp_dir, f"candidate{self._count}{suffix}"),
        exclude_variables=self._averaging.exclude_variables,
        allow_nonfinite=self._averaging.allow_nonfinite,
        step_from=self._averaging.step_from, update_state_file=False,
        quiet=True)
    try:
      return evaluation.evaluate(self._eval, result.output_path,
                                 candidate=self.name(indices))
    finally:
      for name in os.listdir(self._tmp_dir):
        if name.startswith((f"candidate{self._count}-",
                            f"candidate{self._count}.")):
          os.remove(os.path.join(self._tmp_dir, name))


def run_soup(inputs: Sequence[Checkpoint], own_scores: Sequence[Optional[float]],
             candidates: Candidates, *, mode: str, tolerance: float,
             own_scores_from_command: bool) -> greedy.SoupResult:
  """The greedy soup over `inputs`, scoring soups with `candidates`."""
  # The best candidate alone (each one, when the command gives own scores),
  # then a soup with each further candidate.
  candidates.planned = len(inputs) + (
      len(inputs) - 1 if own_scores_from_command else 0)
  return greedy.greedy_soup(
      own_scores, mode=mode, tolerance=tolerance, score_soup=candidates.score,
      own_scores_from_command=own_scores_from_command,
      newer=[c.step if c.step is not None else i
             for i, c in enumerate(inputs)],
      names=[os.path.basename(c.path) for c in inputs])


def soup_record(inputs: Sequence[Checkpoint],
                result: greedy.SoupResult) -> list[dict]:
  """The soup's steps for the JSON record: candidate, scores, kept."""
  return [{"candidate": os.path.abspath(inputs[s.candidate].path),
           "own_score": s.own_score, "soup_score": s.soup_score,
           "kept": s.kept} for s in result.steps]


def soup_table(inputs: Sequence[Checkpoint], result: greedy.SoupResult) -> str:
  """The soup's steps as a text table, in the order they were tried."""
  width = max(len(c.path) for c in inputs)
  lines = [f"{'candidate':<{width}}  {'own score':>10}  {'soup with it':>12}"
           "  kept"]
  for s in result.steps:
    own = "-" if s.own_score is None else f"{s.own_score:.6g}"
    with_it = "-" if s.soup_score is None else f"{s.soup_score:.6g}"
    lines.append(f"{inputs[s.candidate].path:<{width}}  {own:>10}  "
                 f"{with_it:>12}  {'yes' if s.kept else 'no'}")
  return "\n".join(lines)


def log_comparison(scores: Sequence[tuple[str, float]], mode: str) -> None:
  """One INFO line: the final average's score beside the others'."""
  better = "higher" if mode == "max" else "lower"
  logging.info("Eval scores (%s is better): %s", better,
               "; ".join(f"{label} {score:.6g}" for label, score in scores))
