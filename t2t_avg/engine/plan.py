"""What happens to each tensor: averaged, copied from the newest input, or the step.

Building the plan is where the inputs are validated: the same tensors in
every input (after `exclude_variables`, so excluded ones may differ or be
missing), and for every averaged tensor the same dtype, shape and slicing.
Copied tensors (integers, strings, quantized, variants such as `tf.data`
iterator state, hash tables) come from the newest input as stored and may
differ in shape between inputs.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional
from re import Pattern
from collections.abc import Sequence

from absl import logging
import numpy as np

from t2t_avg.inputs import checkpoints
from t2t_avg.inputs.checkpoints import Checkpoint
from t2t_avg.errors import AveragingError
from t2t_avg.formats import base


class Action(enum.Enum):
  """What the output holds for one tensor."""
  AVERAGE = "average"  # Weighted sum in float64 (complex128), cast once.
  COPY = "copy"  # The newest input's bytes, as stored.
  STEP = "step"  # The output step (`global_step`).


@dataclasses.dataclass(frozen=True)
class Item:
  """One output tensor: its name, dtype, shape and parts, and what fills it."""
  tensor: base.Tensor
  action: Action


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every output tensor, sorted by name, and the output step."""
  items: tuple[Item, ...]
  step: int

  def count(self, action: Action) -> int:
    return sum(item.action is action for item in self.items)

  @property
  def tensors(self) -> tuple[base.Tensor, ...]:
    return tuple(item.tensor for item in self.items)


def make_plan(inputs: Sequence[Checkpoint], newest: int, *,
              exclude: Optional[Pattern[str]], step: int) -> Plan:
  """Validates the inputs against each other and decides every tensor.

  Args:
    inputs: opened checkpoints, in averaging order.
    newest: the index of the input non-float tensors are copied from.
    exclude: tensors whose name it matches (re.search) are left out before
      anything is compared.
    step: the output step, written into `global_step`.

  Raises:
    AveragingError: naming the variable and two checkpoints that disagree;
      every tensor excluded; a step that does not fit `global_step`.
  """
  tensors = [_kept(c, exclude) for c in inputs]
  _same_names(inputs, tensors)
  reference = tensors[newest]
  if not reference:
    raise AveragingError("{exclude_variables}={pattern!r} matches every "
                         "variable of {path}: nothing would be written"
                         if exclude else "checkpoint {path} holds no tensors",
                         pattern=exclude and exclude.pattern,
                         path=inputs[newest].path)
  items = []
  state = inputs[newest].opened.format.state_not_weights(list(reference))
  for name in sorted(reference):
    tensor = reference[name]
    if name == checkpoints.GLOBAL_STEP and tensor.is_integer_scalar:
      items.append(Item(tensor, Action.STEP))
    elif tensor.dtype.averaged and name not in state:
      _same_everywhere(name, inputs, tensors)
      items.append(Item(tensor, Action.AVERAGE))
    else:
      items.append(Item(tensor, Action.COPY))
  source = inputs[newest].opened
  if (checkpoints.GLOBAL_STEP not in reference and source.adds_global_step
      and not (exclude and exclude.search(checkpoints.GLOBAL_STEP))):
    items.append(Item(_global_step(), Action.STEP))
  for item in items:
    if item.action is Action.STEP:
      checkpoints.scalar_bytes(step, item.tensor.element)
  return Plan(tuple(sorted(items, key=lambda i: i.tensor.name)), step)


def _kept(checkpoint: Checkpoint,
          exclude: Optional[Pattern[str]]) -> dict:
  return {name: tensor for name, tensor in checkpoint.opened.tensors().items()
          if not (exclude and exclude.search(name))}


def _same_names(inputs: Sequence[Checkpoint], tensors: Sequence[dict]) -> None:
  first = tensors[0]
  for c, other in zip(inputs[1:], tensors[1:]):
    for name in sorted(set(first) ^ set(other)):
      having, lacking = ((inputs[0].path, c.path) if name in first
                         else (c.path, inputs[0].path))
      raise AveragingError(f"variable {name} is in checkpoint {having} but "
                           f"not in {lacking}")


def _same_everywhere(name: str, inputs: Sequence[Checkpoint],
                     tensors: Sequence[dict]) -> None:
  first = tensors[0][name]
  plain = len(first.parts) == 1 and first.parts[0].extents is None
  for c, other in zip(inputs[1:], tensors[1:]):
    tensor = other[name]
    if (plain and tensor.shape == first.shape and tensor.dtype is first.dtype
        and len(tensor.parts) == 1 and tensor.parts[0].extents is None):
      continue  # The common case, checked without building anything.
    if tensor.shape != first.shape:
      raise AveragingError(
          f"variable {name} has shape {list(first.shape)} in checkpoint "
          f"{inputs[0].path} but {list(tensor.shape)} in {c.path}")
    if tensor.dtype.name != first.dtype.name:
      raise AveragingError(
          f"variable {name} has dtype {first.dtype.name} in checkpoint "
          f"{inputs[0].path} but {tensor.dtype.name} in {c.path}")
    if tensor.layout != first.layout:
      raise AveragingError(
          f"variable {name} is partitioned into other slices in checkpoint "
          f"{c.path} than in {inputs[0].path}")


def _global_step() -> base.Tensor:
  """The int64 `global_step` legacy always wrote; T2T and Estimator read it."""
  dtype = base.DType("int64", base.Kind.OTHER, np.dtype(np.int64))
  key = checkpoints.GLOBAL_STEP.encode()
  return base.Tensor(checkpoints.GLOBAL_STEP, dtype, (),
                     (base.Part(key, None, (), 8),))


def log_plan(plan: Plan, exclude: Optional[Pattern[str]]) -> None:
  """One INFO line for what is copied and why, one for what is left out."""
  copied = [i.tensor for i in plan.items if i.action is Action.COPY]
  if copied:
    kinds = sorted({"float hash table values" if t.dtype.averaged
                    else t.dtype.name for t in copied})
    names = ", ".join(t.name for t in copied[:10]) + (
        ", ..." if len(copied) > 10 else "")
    logging.info("Copying %d tensors from the newest checkpoint, not "
                 "averaging them (%s are not weights): %s",
                 len(copied), ", ".join(kinds), names)
  if exclude:
    logging.info("Leaving out variables matching %r", exclude.pattern)
