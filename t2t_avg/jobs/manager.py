"""Averaging in a custom training loop: the last N of a `tf.train.CheckpointManager`."""
from __future__ import annotations

from typing import Any, Optional

from absl import logging

from t2t_avg import options
from t2t_avg.engine import averaging
from t2t_avg.errors import ArgumentError, AveragingError
from t2t_avg.record import AveragingResult


def average_manager_checkpoints(
    manager: Any, output_path: str, *, last_n: Optional[int] = None,
    restore_into: Any = None, output_step: options.OutputStep = "last",
    exclude_variables: str = "") -> AveragingResult:
  """Averages the newest checkpoints a `tf.train.CheckpointManager` keeps.

  Example:
    manager = tf.train.CheckpointManager(ckpt, "train", max_to_keep=5)
    ...  # the training loop calls manager.save()
    average_manager_checkpoints(manager, "avg/model", last_n=5,
                                restore_into=ckpt)

  Args:
    manager: the `tf.train.CheckpointManager` (its `checkpoints`, oldest
      first, are averaged).
    output_path: the output prefix; the output is `<output_path>-<step>`.
    last_n: average the newest N it keeps; None: all of them.
    restore_into: a `tf.train.Checkpoint` to restore the average into
      (every object of the checkpoint must find its value), or None.
    output_step: 'last' (the newest checkpoint's step: its `global_step`,
      optimizer iterations or save number), 'zero', or an int.
    exclude_variables: a regex of variables to leave out (e.g.
      `optimizer/` slots for an average to evaluate only).

  Returns:
    The AveragingResult (`output_path` is the prefix written).

  Raises:
    ArgumentError: `last_n` < 1.
    AveragingError: the manager keeps no checkpoint, or the average cannot
      be made or restored.
  """
  if last_n is not None and (isinstance(last_n, bool) or last_n < 1):
    raise ArgumentError("{last_n} must be an integer >= 1 or None, not "
                        "{value!r}", value=last_n)
  kept = list(manager.checkpoints)
  if not kept:
    raise AveragingError(f"the CheckpointManager of {manager.directory} "
                         "keeps no checkpoint yet: nothing to average")
  chosen = kept if last_n is None else kept[-last_n:]
  if last_n is not None and len(chosen) < last_n:
    logging.warning("last_n=%d but the CheckpointManager keeps %d", last_n,
                    len(chosen))
  result = averaging.average_checkpoints(
      chosen, output_path, output_step=output_step,
      exclude_variables=exclude_variables)
  if restore_into is not None:
    status = restore_into.restore(result.output_path)
    status.assert_existing_objects_matched()
    logging.info("Restored the average %s", result.output_path)
  return result
