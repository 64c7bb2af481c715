"""Keras files where TensorFlow is not installed, and TensorFlow installs that are broken.

The environment without TensorFlow is a real one: a virtual environment with
t2t_avg and nothing but its own requirements (`.venv-notf`, made once and
kept; `.ci/run` makes it fresh). The Keras files and the expected averages
are made here, with Keras and h5py, never with t2t_avg.
"""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO, assert_same_values, error_line
from keras_runs import (csv_column, datasets, expected_average,
                        keras_runs_fixture, softmax_weights)

assert keras_runs_fixture  # A fixture, used by name.

_VENV = os.environ.get("T2T_AVG_NO_TF_VENV", os.path.join(REPO, ".venv-notf"))


@pytest.fixture(scope="session", name="python_without_tf")
def python_without_tf_fixture():
  """The python of a virtual environment holding t2t_avg but no TensorFlow."""
  python = os.path.join(_VENV, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", _VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", REPO],
                   check=True, capture_output=True)
  found = subprocess.run(
      [python, "-c", "import importlib.util as u; "
       "print(u.find_spec('tensorflow') is None and u.find_spec('keras') is None)"],
      capture_output=True, text=True, check=True)
  assert found.stdout.strip() == "True", f"{_VENV} has TensorFlow or Keras"
  return python


def _run(python, *args, env=None):
  return subprocess.run([python, "-m", "t2t_avg", *args], capture_output=True,
                        text=True, timeout=300, cwd=REPO, check=False,
                        env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_keras_files_average_uniformly_without_tensorflow(
    keras_runs, python_without_tf, tmp_path, suffix):
  run = keras_runs["float32"]
  chosen = run.weights[-3:] if suffix == ".weights.h5" else run.archives[-3:]
  output = str(tmp_path / f"avg{suffix}")
  result = _run(python_without_tf, "--checkpoints=" + ",".join(chosen),
                "--output_path=" + output)
  assert result.returncode == 0, result.stderr[-2000:]
  assert_same_values(datasets(output), expected_average(chosen))


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_keras_files_weighted_by_csvlogger_without_tensorflow(
    keras_runs, python_without_tf, tmp_path, suffix):
  run = keras_runs["float32"]
  chosen = run.weights[-3:] if suffix == ".weights.h5" else run.archives[-3:]
  losses = csv_column(run.csv_log, "val_loss")
  epochs = range(len(run.weights) - 3, len(run.weights))  # 0-based rows
  weights = softmax_weights([losses[e] for e in epochs])
  output = str(tmp_path / f"avg{suffix}")
  result = _run(python_without_tf, "--checkpoints=" + ",".join(chosen),
                "--output_path=" + output, "--weighting=softmax",
                "--metrics_from_events=" + run.csv_log, "--metric=val_loss")
  assert result.returncode == 0, result.stderr[-2000:]
  assert_same_values(datasets(output), expected_average(chosen, weights))


def test_tf_checkpoint_without_tensorflow_is_one_line(python_without_tf,
                                                      tmp_path):
  result = _run(python_without_tf, "--prefix=testdata/train/",
                "--num_last_checkpoints=2",
                "--output_path=" + str(tmp_path / "avg" / "averaged.ckpt"))
  line = error_line(result)
  assert "needs TensorFlow, which is not installed" in line, line
  assert "pip install" in line, line
  assert not os.path.exists(tmp_path / "avg") or not os.listdir(tmp_path / "avg")


def _broken_tensorflow(root, *, corrupt_reader):
  """A `tensorflow` package that raises on import (and, if asked, holds a
  corrupt checkpoint-reader extension module where t2t_avg looks for it)."""
  package = root / "tensorflow"
  (package / "python" / "util").mkdir(parents=True)
  (package / "__init__.py").write_text(
      "raise RuntimeError('this TensorFlow install is broken')\n")
  if corrupt_reader:
    import importlib.machinery  # pylint: disable=import-outside-toplevel
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (package / "python" / "util" / f"_pywrap_checkpoint_reader{suffix}"
     ).write_bytes(b"\x7fELF not really a shared object")
  return str(root)


@pytest.mark.parametrize("corrupt_reader", [False, True])
def test_broken_tensorflow_is_one_line_for_tf_and_keras_still_averages(
    keras_runs, tmp_path, corrupt_reader):
  shadow = _broken_tensorflow(tmp_path / "shadow",
                              corrupt_reader=corrupt_reader)
  env = {"PYTHONPATH": shadow}
  tf_output = tmp_path / "tf" / "averaged.ckpt"
  result = _run(sys.executable, "--prefix=testdata/train/",
                "--num_last_checkpoints=2", f"--output_path={tf_output}",
                env=env)
  line = error_line(result)
  assert "`import tensorflow` fails" in line, line
  assert "this TensorFlow install is broken" in line, line
  assert not (tmp_path / "tf").exists() or not os.listdir(tmp_path / "tf")
  chosen = keras_runs["float32"].weights[-2:]
  output = str(tmp_path / "avg.weights.h5")
  result = _run(sys.executable, "--checkpoints=" + ",".join(chosen),
                "--output_path=" + output, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert_same_values(datasets(output), expected_average(chosen))


def test_bfloat16_keras_weights_need_ml_dtypes_when_absent(tmp_path):
  # A bfloat16 dataset as Keras 3 stores it: opaque 2-byte values marked
  # with their dtype name. Without ml_dtypes it must be refused by name,
  # never copied as opaque bytes in place of an average.
  path = tmp_path / "w.weights.h5"
  with h5py.File(path, "w") as f:
    data = f.create_dataset("layers/dense/vars/0",
                            data=np.zeros((2, 2), np.dtype("V2")))
    data.attrs["dtype"] = "bfloat16"
  shutil.copy(path, tmp_path / "w2.weights.h5")
  code = ("import sys; sys.modules['ml_dtypes'] = None; "
          "sys.argv = ['t2t_avg'] + sys.argv[1:]; "
          "from t2t_avg.cli import average; average.run_main()")
  result = subprocess.run(
      [sys.executable, "-c", code,
       f"--checkpoints={path},{tmp_path / 'w2.weights.h5'}",
       f"--output_path={tmp_path / 'out.weights.h5'}"],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
  line = error_line(result)
  assert "bfloat16 needs ml_dtypes, which is not installed" in line, line
  assert "layers/dense/vars/0" in line, line
