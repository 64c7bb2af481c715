"""TensorFlow, loaded only where it is needed, and as little of it as will do.

A one-shot run of local V2 checkpoints or Keras files reads, averages and
writes without TensorFlow. What it needs of TF is the check that TF's own
reader opens the output (SPEC: "Before publishing, TF's own reader must open
the output and list every tensor"). That reader is the C++ `CheckpointReader`
behind `tf.train.load_checkpoint`, in the extension module
`tensorflow.python.util._pywrap_checkpoint_reader`; `checkpoint_reader`
loads that module alone (0.4 s, against 2.5 s and 770 MB of libraries read
for `import tensorflow`), registered under its own name so that a later
`import tensorflow` uses it as is. Where that module is not where TF 2.16 to
2.21 keep it, or TensorFlow is already imported, `tf.train.load_checkpoint`
is used.

Most of those 0.4 s are the dynamic linker loading TF's libraries and
running their initializers. `preload_reader` has that done on a thread while
the run averages: through the C library's `dlopen`, which ctypes calls
without holding the GIL (Python's own loading of an extension holds it, and
would stall the averaging threads), so that loading the module later only
finds its libraries there.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Any, Optional
from collections.abc import Iterator

from t2t_avg.errors import AveragingError
from t2t_avg.files import paths

_READER_MODULE = "tensorflow.python.util._pywrap_checkpoint_reader"


_preloading: Optional[threading.Thread] = None
_quiet_native = False  # See quiet_native_notices.
_LOADING = threading.Lock()


class ReaderError(OSError):
  """TF's reader cannot open a checkpoint; the text is TF's message."""


_INSTALL = ("install it next to t2t_avg: pip install 't2t_avg[tensorflow-cpu]' "
            "(or tensorflow-cpu, or tensorflow)")


def get(purpose: str = "this run") -> ModuleType:
  """The `tensorflow` module (imported now if it is not yet).

  Args:
    purpose: what needs it, for the error message.

  Raises:
    AveragingError: TensorFlow is not installed, or its import fails.
  """
  try:
    with _loading():
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except Exception as e:  # A broken install raises anything.
    raise AveragingError(_unusable(purpose, e)) from e
  return tf


def quiet_native_notices() -> None:
  """TensorFlow's libraries load from now on with nothing on stderr.

  Its C++ start-up notices ("Could not find cuda drivers", oneDNN) are
  written to file descriptor 2 while its libraries load, whatever
  TF_CPP_MIN_LOG_LEVEL says. For the command line, Python's `sys.stderr`
  moves to a duplicate of that descriptor, and descriptor 2 points at
  /dev/null while a TensorFlow library loads (on whichever thread), so
  t2t_avg's own lines are never lost and commands it runs later keep the
  real stderr.
  """
  global _quiet_native
  stream = sys.stderr
  try:
    on_fd2 = stream is not None and stream.fileno() == 2
  except (AttributeError, OSError, ValueError):  # Replaced, e.g. captured.
    on_fd2 = False
  if on_fd2:
    stream.flush()
    sys.stderr = open(os.dup(2), "w", buffering=1, encoding=stream.encoding,
                      errors=stream.errors)
  _quiet_native = True


@contextlib.contextmanager
def _loading() -> Iterator[None]:
  """Loads a TensorFlow library with descriptor 2 silenced when asked."""
  with _LOADING:
    if not _quiet_native:
      yield
      return
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def require(purpose: str) -> None:
  """Refuses early when TensorFlow is not installed (nothing is imported).

  Raises:
    AveragingError: it is not installed.
  """
  # On sys.path, whatever sys.modules holds (a test may block the import).
  if importlib.machinery.PathFinder.find_spec("tensorflow") is None:
    raise AveragingError(f"{purpose} needs TensorFlow, which is not "
                         f"installed; {_INSTALL}")


def _unusable(purpose: str, error: BaseException) -> str:
  if isinstance(error, ModuleNotFoundError) and error.name == "tensorflow":
    return f"{purpose} needs TensorFlow, which is not installed; {_INSTALL}"
  text = str(error).strip().splitlines()
  return (f"{purpose} needs TensorFlow, and `import tensorflow` fails: "
          f"{type(error).__name__}: {text[-1] if text else ''}")


def checkpoint_reader(prefix: str) -> Any:
  """TF's own `CheckpointReader` for the checkpoint at `prefix`.

  It has `get_variable_to_shape_map()`, as `tf.train.load_checkpoint`'s.

  Raises:
    ReaderError: TF's reader cannot open it (TF's message).
  """
  # Other file systems (gs://) are TF's to reach; the run imported it.
  module = _reader_module() if paths.is_local(prefix) else None
  if module is None:
    tf = get(f"checking {prefix} with TensorFlow's own reader")
    try:
      return tf.train.load_checkpoint(prefix)
    except tf.errors.OpError as e:
      raise ReaderError(e.message) from e
    except ValueError as e:
      raise ReaderError(str(e)) from e
  try:
    return module.CheckpointReader(prefix.encode("utf-8", "surrogateescape"))
  except RuntimeError as e:  # What the module raises without TF's Python.
    raise ReaderError(str(e)) from e


def preload_reader() -> None:
  """Starts loading the reader's libraries on a thread (once; a hint only)."""
  global _preloading
  if (_preloading is not None or sys.modules.get("tensorflow") is not None
      or _READER_MODULE in sys.modules):
    return
  path = _reader_path()
  if path is None:
    return
  # Not a daemon: the interpreter waits for it rather than exiting while
  # TF's libraries are half loaded.
  _preloading = threading.Thread(target=_dlopen, args=(path,),
                                 name="t2t_avg-tf-reader")
  _preloading.start()


def _dlopen(path: str) -> None:
  try:
    dlopen = ctypes.CDLL(None).dlopen
    dlopen.restype = ctypes.c_void_p
    dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    with _loading():
      dlopen(os.fsencode(path), sys.getdlopenflags())  # Loaded for good.
  except (OSError, AttributeError):
    pass  # The module loads it all itself.


def _reader_module() -> Optional[ModuleType]:
  """The reader's extension module, loaded alone; None to import TF instead."""
  if _preloading is not None:
    _preloading.join()
  loaded = sys.modules.get(_READER_MODULE)
  if loaded is not None:
    return loaded
  if sys.modules.get("tensorflow") is not None:
    return None  # Imported (or importing): TF loads it its own way.
  path = _reader_path()
  if path is None:
    return None
  try:
    loader = importlib.machinery.ExtensionFileLoader(_READER_MODULE, path)
    spec = importlib.util.spec_from_file_location(_READER_MODULE, path,
                                                  loader=loader)
    if spec is None:
      return None
    module = importlib.util.module_from_spec(spec)
    with _loading():
      loader.exec_module(module)
  except (ImportError, OSError):
    return None
  sys.modules[_READER_MODULE] = module
  return module


def _reader_path() -> Optional[str]:
  try:
    spec = importlib.util.find_spec("tensorflow")  # Finds; runs nothing.
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
      path = os.path.join(location, "python", "util",
                          "_pywrap_checkpoint_reader" + suffix)
      if os.path.isfile(path):
        return path
  return None
