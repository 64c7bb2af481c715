"""The arithmetic and the worker pool: every output part, chunk by chunk.

Each part of an averaged tensor is read from every input in chunks of about
`CHUNK_BYTES`, summed in float64 (complex128) in input order, divided by n
or weighted, cast once and written to the sink: memory stays at a few
chunks whatever the tensor, model or checkpoint count. Two threads share the
parts (numpy, file reads and crc32c release the GIL); the sink places every
part beforehand, so which thread writes what never changes the bytes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import NamedTuple, Optional
from collections.abc import Sequence

import numpy as np

from t2t_avg.inputs import checkpoints
from t2t_avg.files import crc
from t2t_avg.errors import AveragingError
from t2t_avg.formats import base
from t2t_avg.engine import progress
from t2t_avg.engine.plan import Action, Plan

CHUNK_BYTES = 8 << 20  # Read from each input per step.
_SMALL_BYTES = 256 << 10  # Parts up to this size are read in runs.
WORKERS = 2
_BLOCK = 1 << 16  # Elements of a weighted sum's step (512 KB of float64).


class _Input(NamedTuple):
  """An input being read: where it is, and its part of the unit at hand."""
  source: base.Source
  part: base.Part


class _Unit(NamedTuple):
  """One output part and the input parts it is made of."""
  action: Action
  tensor: base.Tensor  # as written (the newest input's)
  key: bytes  # the output part
  inputs: tuple  # of _Input: every active input (AVERAGE) or the newest


@dataclasses.dataclass
class _Run:
  """Small averaged parts stored back to back in every input and the output.

  Read with one read per input, summed in one pass, written in one write:
  a TF checkpoint of many small tensors (optimizer slots, small layers)
  costs per run, not per tensor (Keras files are written dataset by
  dataset: their sink places no parts). Every part's crc32c is still checked on its own.
  """
  units: list[_Unit]
  end: list[int]  # Where the next part must start, per input file.
  output_end: int  # And in the output.
  size: int = 0

  def takes(self, unit: _Unit, place: Optional[int]) -> bool:
    first = self.units[0]
    return (unit.tensor.dtype is first.tensor.dtype and place == self.output_end
            and self.size + unit.inputs[0].part.size <= CHUNK_BYTES and all(
                inp.part.file == start.part.file and inp.part.offset == end
                for inp, start, end in zip(unit.inputs, first.inputs,
                                           self.end)))

  def add(self, unit: _Unit) -> None:
    self.units.append(unit)
    size = unit.inputs[0].part.size
    self.end = [inp.part.offset + size for inp in unit.inputs]
    self.output_end += size
    self.size += size


class _Stopped(Exception):
  """A worker stops early because the other one failed or Ctrl-C was hit."""


def write_all(plan: Plan, inputs: Sequence[checkpoints.Checkpoint],
              weights: Optional[Sequence[float]], newest: int,
              sink: base.Sink, *,
              allow_nonfinite: bool) -> None:
  """Computes every output part of `plan` and writes it into `sink`.

  Args:
    plan: what each tensor is.
    inputs: the checkpoints averaged (weight > 0), in averaging order.
    weights: their weights, or None for a uniform average (sum, then / n).
    newest: the index in `inputs` to copy non-float tensors from.
    sink: the output (`open_part(key)` → a writer with `write`, `close`).
    allow_nonfinite: average NaN/inf instead of refusing.

  Raises:
    AveragingError: an input is corrupted, truncated or holds NaN/inf.
  """
  units = []
  sources = [c.opened for c in inputs]
  tensors = [s.tensors() for s in sources]
  for item in plan.items:
    if item.action is Action.STEP:
      value = checkpoints.scalar_bytes(plan.step, item.tensor.element)
      writer = sink.open_part(item.tensor.parts[0].key)
      writer.write(value)
      writer.close()
      continue
    name = item.tensor.name
    chosen = (range(len(sources)) if item.action is Action.AVERAGE
              else [newest])
    for j, part in enumerate(item.tensor.parts):
      units.append(_Unit(item.action, item.tensor, part.key, tuple(
          _Input(sources[i], tensors[i][name].parts[j]) for i in chosen)))
  work = _batched(units, sink)
  # Largest first, so the workers end close together.
  work.sort(key=lambda w: -w.size if isinstance(w, _Run)
            else -w.inputs[0].part.size)
  try:
    _Pool(work, sink, _Arithmetic(weights, allow_nonfinite)).run()
  except AveragingError:
    check_integrity(sources)  # A corrupted input is the cause to name.
    raise
  check_integrity(sources)


def check_integrity(sources: Sequence[base.Source]) -> None:
  """Checks every source's whole-file checksum (`Source.check_integrity`).

  Raises:
    AveragingError: naming the first source that fails it.
  """
  for source in sources:
    source.check_integrity()


def _batched(units: list[_Unit], sink: base.Sink) -> list:
  """Units, with runs of small adjacent averaged parts joined into `_Run`s."""
  work: list = []
  run: Optional[_Run] = None
  for unit in units:
    place = sink.place(unit.key)
    small = (unit.action is Action.AVERAGE and place is not None and
             unit.inputs[0].part.size <= _SMALL_BYTES and
             all(inp.part.file is not None for inp in unit.inputs))
    if not small or place is None:
      work.append(unit)
      continue
    if run is not None and run.takes(unit, place):
      run.add(unit)
      continue
    run = _Run([], [], place)
    run.add(unit)
    work.append(run)
  return [w.units[0] if isinstance(w, _Run) and len(w.units) == 1 else w
          for w in work]


class _Arithmetic:
  """float64 (complex128) sum in input order, / n or weighted, cast once."""

  def __init__(self, weights: Optional[Sequence[float]], allow_nonfinite: bool):
    self.weights = None if weights is None else list(weights)
    self.allow_nonfinite = allow_nonfinite

  def accumulate(self, total: np.ndarray, value: np.ndarray, i: int,
                 scratch: np.ndarray) -> None:
    if self.weights is None:
      np.add(total, value, out=total)
      return
    # w_i * x_i in float64, added in blocks that stay in the CPU's cache
    # (the product is read back at once): measured 8.5 against 12 ms for 8
    # inputs of 1M float32; the same operations, so the same bits.
    weight, size = self.weights[i], len(total)
    for start in range(0, size, _BLOCK):
      part = total[start:start + _BLOCK]
      product = scratch[:len(part)]
      np.multiply(value[start:start + _BLOCK], weight, out=product,
                  dtype=total.dtype)
      np.add(part, product, out=part)

  def finish(self, total: np.ndarray, count: int, result: np.ndarray) -> bool:
    """Divides a uniform sum, casts into `result`; False when not finite.

    The cast is numpy's (as legacy's feed of float64 into a typed
    placeholder): direct rounding to float16/float32, through float32 for
    bfloat16 (ml_dtypes).
    """
    if self.weights is None:
      total /= count
    # A sum of finite values read from float32 or narrower cannot overflow
    # float64, so one sum finds any NaN or inf; the exact test only runs then.
    if not self.allow_nonfinite and not np.isfinite(total.sum()) and not (
        np.isfinite(total).all()):
      return False
    cast_once(total, result)
    return True


def cast_once(total: np.ndarray, result: np.ndarray) -> None:
  """Casts a float64 (complex128) average into `result`'s dtype: numpy's
  rounding, as legacy's typed placeholder did (see `_Arithmetic.finish`)."""
  np.copyto(result, total, casting="unsafe")


class _Pool:
  """`WORKERS` threads taking units largest first; the first error stops all."""

  def __init__(self, work: list, sink: base.Sink, arithmetic: _Arithmetic):
    self._todo = iter(work)
    self._sink = sink
    self._arithmetic = arithmetic
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._progress = progress.Progress(sum(
        w.size if isinstance(w, _Run) else w.inputs[0].part.size
        for w in work))

  def run(self) -> None:
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
      futures = [pool.submit(self._work) for _ in range(WORKERS)]
      try:
        while concurrent.futures.wait(futures,
                                      progress.TICK_SECONDS).not_done:
          self._progress.show()
      except BaseException:  # Ctrl-C: stop the workers at their next chunk.
        self._stop.set()
        raise
      finally:
        self._progress.close()
      for future in futures:
        future.result()

  def _work(self) -> None:
    try:
      while not self._stop.is_set():
        with self._lock:
          unit = next(self._todo, None)
        if unit is None:
          return
        if self._stop.is_set():
          raise _Stopped()
        if isinstance(unit, _Run):
          _run_batch(unit, self._sink, self._arithmetic)
          self._progress.add(unit.size)
        else:
          _run_unit(unit, self._sink.open_part(unit.key), self._arithmetic,
                    self._stop, self._progress)
    except _Stopped:
      return  # The other worker's error (or Ctrl-C) is the one to report.
    except BaseException:
      self._stop.set()
      raise


def _run_unit(unit: _Unit, writer: base.PartWriter, arithmetic: _Arithmetic,
              stop: threading.Event, done: progress.Progress) -> None:
  """Reads, combines and writes one part chunk by chunk, checking crc32c."""
  numpy = unit.tensor.dtype.numpy
  itemsize = numpy.itemsize if numpy is not None else 1
  size = unit.inputs[0].part.size
  step = max(1, CHUNK_BYTES // itemsize) * itemsize
  buffer = np.empty(min(step, size), np.uint8)
  crcs = [0] * len(unit.inputs)
  combine = _average_chunk if unit.action is Action.AVERAGE else _copy_chunk
  state = _ChunkState(unit, arithmetic, min(step, size) // itemsize)
  for start in range(0, size, step):
    if stop.is_set():
      raise _Stopped()
    chunk = buffer[:min(step, size - start)]
    writer.write(combine(state, chunk, start, crcs))
    done.add(len(chunk))
  _check_crcs(unit, crcs)
  stored = unit.inputs[0].part.crc if numpy is None else None
  writer.close(stored_crc=stored)


@dataclasses.dataclass
class _ChunkState:
  """Buffers for one unit, allocated once."""
  unit: _Unit
  arithmetic: _Arithmetic
  elements: int

  def __post_init__(self) -> None:
    dtype = self.unit.tensor.dtype
    if self.unit.action is Action.AVERAGE:
      wide = np.complex128 if dtype.kind is base.Kind.COMPLEX else np.float64
      self.total = np.empty(self.elements, wide)
      self.scratch = np.empty(min(self.elements, _BLOCK), wide)
      self.result = np.empty(self.elements, dtype.numpy)


def _run_batch(run: _Run, sink: base.Sink, arithmetic: _Arithmetic) -> None:
  """Reads, sums and writes a run of small parts in one pass each."""
  first = run.units[0]
  numpy = first.tensor.element
  buffer = np.empty(run.size, np.uint8)
  wide = np.complex128 if first.tensor.dtype.kind is base.Kind.COMPLEX else (
      np.float64)
  total = np.zeros(run.size // numpy.itemsize, wide)
  scratch = np.empty(min(total.size, _BLOCK), wide)
  bounds = np.cumsum([0] + [u.inputs[0].part.size for u in run.units])
  for i, inp in enumerate(first.inputs):
    _read(inp, first, buffer, 0)
    for unit, a, b in zip(run.units, bounds[:-1], bounds[1:]):
      part = unit.inputs[i].part
      if part.crc is not None and crc.masked(crc.crc32c(buffer[a:b])) != (
          part.crc):
        raise _corrupted(unit.inputs[i], unit)
    arithmetic.accumulate(total, buffer.view(numpy), i, scratch)
  result = np.empty(len(total), numpy)
  if not arithmetic.finish(total, len(first.inputs), result):
    for unit, a, b in zip(run.units, bounds[:-1], bounds[1:]):
      chunk = buffer[a:b]
      if not np.isfinite(total[a // numpy.itemsize:b // numpy.itemsize]).all():
        _raise_nonfinite(unit, chunk, 0)
  sink.write_parts([u.key for u in run.units], result.view(np.uint8),
                   bounds.tolist())


def _read(inp: _Input, unit: _Unit, chunk: np.ndarray, start: int) -> None:
  try:
    inp.source.read(inp.part, start, memoryview(chunk))  # type: ignore[arg-type]
  except (AveragingError, OSError) as e:
    raise AveragingError("cannot read variable {name} from checkpoint "
                         "{path}: {reason}", name=unit.tensor.name,
                         path=inp.source.path, reason=e) from e


def _copy_chunk(state: _ChunkState, chunk: np.ndarray, start: int,
                crcs: list[int]) -> np.ndarray:
  _read(state.unit.inputs[0], state.unit, chunk, start)
  crcs[0] = crc.crc32c(chunk, crcs[0])
  return chunk


def _average_chunk(state: _ChunkState, chunk: np.ndarray, start: int,
                   crcs: list[int]) -> np.ndarray:
  unit, arithmetic = state.unit, state.arithmetic
  numpy = unit.tensor.element
  count = len(chunk) // numpy.itemsize
  total, scratch = state.total[:count], state.scratch
  total.fill(0)
  for i, inp in enumerate(unit.inputs):
    _read(inp, unit, chunk, start)
    crcs[i] = crc.crc32c(chunk, crcs[i])
    arithmetic.accumulate(total, chunk.view(numpy), i, scratch)
  result = state.result[:count]
  if not arithmetic.finish(total, len(unit.inputs), result):
    _raise_nonfinite(unit, chunk, start)
  return result


def _raise_nonfinite(unit: _Unit, chunk: np.ndarray, start: int) -> None:
  """Names the input holding NaN/inf, unless one is corrupted instead."""
  for inp in unit.inputs:
    _check_whole_crc(inp, unit)
  for inp in unit.inputs:
    _read(inp, unit, chunk, start)
    if not np.isfinite(chunk.view(unit.tensor.element)).all():
      raise AveragingError(
          "variable {name} in checkpoint {path} holds NaN or inf (pass "
          "{allow_nonfinite} to average it anyway)", name=unit.tensor.name,
          path=inp.source.path)
  raise AveragingError(f"variable {unit.tensor.name}: the average is not "
                       "finite")


def _check_whole_crc(inp: _Input, unit: _Unit) -> None:
  """Reads a whole input part to check its crc32c (a NaN may be a bit flip)."""
  if inp.part.crc is None:
    return
  value, size = 0, inp.part.size
  buffer = np.empty(min(CHUNK_BYTES, size), np.uint8)
  for start in range(0, size, len(buffer)):
    chunk = buffer[:min(len(buffer), size - start)]
    _read(inp, unit, chunk, start)
    value = crc.crc32c(chunk, value)
  _check_crcs(unit._replace(inputs=(inp,)), [value])


def _check_crcs(unit: _Unit, crcs: Sequence[int]) -> None:
  if unit.tensor.dtype.numpy is None:
    return  # Strings and variants keep their own checksum, copied as is.
  for inp, value in zip(unit.inputs, crcs):
    if inp.part.crc is not None and crc.masked(value) != inp.part.crc:
      raise _corrupted(inp, unit)


def _corrupted(inp: _Input, unit: _Unit) -> AveragingError:
  return AveragingError(f"checkpoint {inp.source.path} is corrupted: "
                        f"variable {unit.tensor.name} fails its checksum in "
                        f"{inp.part.file}")
