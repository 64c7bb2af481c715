"""t2t_avg: average TensorFlow checkpoints, uniformly or weighted by eval metrics."""
import importlib

from t2t_avg.errors import ArgumentError, AveragingError

__all__ = ["ArgumentError", "AveragingError", "AveragingResult",
           "CheckpointRow", "average_checkpoints",
           "average_manager_checkpoints"]

__version__ = "0.1.0"

_LAZY = {"average_checkpoints": "t2t_avg.engine.averaging",
         "average_manager_checkpoints": "t2t_avg.jobs.manager",
         "AveragingResult": "t2t_avg.record",
         "CheckpointRow": "t2t_avg.record"}


def __getattr__(name: str) -> object:
  # The command line validates its flags before numpy and the engine load, so
  # the library API is loaded on first use.
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return getattr(module, name)
  raise AttributeError(f"module 't2t_avg' has no attribute {name!r}")
