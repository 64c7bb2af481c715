"""TensorFlow, imported on a background thread while the engine works without it.

`import tensorflow` takes seconds (it loads hundreds of megabytes of
libraries); a one-shot run of local V2 checkpoints or Keras files needs TF
only at the very end, for the check that TF's reader opens the output. The
command line starts the import here once flags are valid and every t2t_avg
module it will use is imported (so this thread never imports a module the
main thread is importing), and whatever needs TF calls `get()`.
"""
from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType
from typing import Optional

_lock = threading.Lock()
_thread: Optional[threading.Thread] = None
_error: Optional[BaseException] = None


def _import() -> None:
  global _error
  try:
    importlib.import_module("tensorflow")
  except BaseException as e:  # pylint: disable=broad-except
    _error = e  # Re-raised in the caller of `get`.


def start() -> None:
  """Starts importing TensorFlow on a daemon thread (once; idempotent)."""
  global _thread
  with _lock:
    if _thread is not None or sys.modules.get("tensorflow") is not None:
      return
    _thread = threading.Thread(target=_import, name="t2t_avg-tf-import",
                               daemon=True)
    _thread.start()


def get() -> ModuleType:
  """The `tensorflow` module: waits for the import `start` began, or imports it.

  Raises:
    ImportError: TensorFlow cannot be imported (the thread's error).
  """
  with _lock:
    thread = _thread
  if thread is not None:
    thread.join()
    if _error is not None:
      raise _error
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf
