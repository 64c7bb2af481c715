"""What an average was made of: the per-input rows, the result, the JSON record."""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Optional
from collections.abc import Sequence

from t2t_avg.files import paths

# The one field that differs between two runs of the same average.
TIMESTAMP_FIELD = "created"
# The record written beside every output (`<output>.t2t_avg.json`); it
# marks an output of this tool, never taken as an input.
RECORD_SUFFIX = ".t2t_avg.json"


@dataclasses.dataclass(frozen=True)
class CheckpointRow:
  """One input as averaged: where it is, its step, its weight."""
  path: str
  step: Optional[int]
  step_source: str
  weight: float
  metric: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class AveragingResult:
  """What was (or, for a dry run, would be) written."""
  output_path: str  # The output checkpoint prefix.
  written: bool
  rows: tuple[CheckpointRow, ...]
  effective_count: float
  record: dict


def _absolute(path: str) -> str:
  return os.path.abspath(path) if paths.is_local(path) else path


def make_record(rows: Sequence[CheckpointRow], *, effective_count: float,
                output_prefix: str, step: int, exclude_variables: str,
                averaged: int, copied: int, version: str,
                extra: Optional[dict] = None) -> dict:
  """The JSON record written beside an output (`<output>.t2t_avg.json`).

  Input and output paths are absolute (URLs as given), so the record keeps
  its meaning wherever it is read from.
  """
  record = {
      "t2t_avg_version": version,
      TIMESTAMP_FIELD: datetime.datetime.now(
          datetime.timezone.utc).isoformat(),
      "output": _absolute(output_prefix),
      "output_step": step,
      "inputs": [dict(dataclasses.asdict(r), path=_absolute(r.path))
                 for r in rows],
      "effective_count": effective_count,
      "averaged_variables": averaged,
      "copied_variables": copied,
      "exclude_variables": exclude_variables,
  }
  record.update(extra or {})
  return record
