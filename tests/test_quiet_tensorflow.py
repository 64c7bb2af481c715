"""stderr holds only t2t_avg's lines, even where TensorFlow's libraries print as they load.

The full `tensorflow` wheel's libraries write "Could not find cuda drivers"
to file descriptor 2 while they load, whatever TF_CPP_MIN_LOG_LEVEL says. A
tiny shared library that does the same stands in for them here: it is placed
where t2t_avg looks for TensorFlow's checkpoint reader, in a `tensorflow`
package whose import loads it too.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, error_line

_NOISE = "NOISE from a TensorFlow library as it loads"

_LIBRARY = """
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void noisy(void) {
  const char *text = "%s\\n";
  (void) !write(2, text, strlen(text));
}
""" % _NOISE


@pytest.fixture(name="noisy_tensorflow", scope="module")
def noisy_tensorflow_fixture(tmp_path_factory):
  """A PYTHONPATH entry with a `tensorflow` package whose libraries print."""
  compiler = shutil.which("gcc") or shutil.which("cc")
  if compiler is None:
    pytest.skip("no C compiler to build the stand-in library")
  root = tmp_path_factory.mktemp("noisy")
  source = root / "noisy.c"
  source.write_text(_LIBRARY)
  util = root / "tensorflow" / "python" / "util"
  util.mkdir(parents=True)
  import importlib.machinery  # pylint: disable=import-outside-toplevel
  library = util / ("_pywrap_checkpoint_reader"
                    + importlib.machinery.EXTENSION_SUFFIXES[0])
  subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library),
                  str(source)], check=True)
  (root / "tensorflow" / "__init__.py").write_text(
      "import ctypes\n"
      f"ctypes.CDLL({str(library)!r})\n"
      "raise ImportError('this stand-in TensorFlow has no Python side')\n")
  return str(root)


def _average_testdata(tmp_path, pythonpath, **env):
  environment = {k: v for k, v in os.environ.items()
                 if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  environment.update(PYTHONPATH=pythonpath, **env)
  return subprocess.run(
      [sys.executable, "-m", "t2t_avg", "--prefix=testdata/train/",
       "--num_last_checkpoints=2",
       f"--output_path={tmp_path / 'avg' / 'averaged.ckpt'}"],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env=environment, check=False)


def test_libraries_loading_print_nothing_and_every_own_line_remains(
    noisy_tensorflow, tmp_path):
  result = _average_testdata(tmp_path, noisy_tensorflow)
  # The reader's library loads (on a thread, while the run averages), then
  # `import tensorflow` loads it again and fails: one line, nothing else.
  assert _NOISE not in result.stderr, result.stderr
  line = error_line(result)
  assert "this stand-in TensorFlow has no Python side" in line, line
  own = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ \w+\.py:\d+\] |t2t_avg: error: ")
  lines = result.stderr.strip().splitlines()
  assert all(own.match(line) for line in lines), lines
  assert any("weight 0.5000" in line for line in lines), lines


def test_users_who_ask_for_tensorflows_logging_get_it(noisy_tensorflow,
                                                      tmp_path):
  result = _average_testdata(tmp_path, noisy_tensorflow,
                             TF_CPP_MIN_LOG_LEVEL="0")
  assert _NOISE in result.stderr, result.stderr
  error_line(result)
