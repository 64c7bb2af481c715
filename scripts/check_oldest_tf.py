"""Checks t2t_avg inside an environment that already had the oldest TensorFlow.

Run by scripts/check_python.sh with the virtualenv's python, after
`pip install tensorflow-cpu==<oldest>` and then `pip install -e .`:
TensorFlow must still import at the version installed first, and a
checkpoint that this TensorFlow writes must be averaged into one it reads
back, equal to the float64 mean cast once.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf


def main(expected_version: str) -> None:
  if tf.__version__ != expected_version:
    sys.exit(f"check_oldest_tf: TensorFlow {tf.__version__} is installed, "
             f"not {expected_version}: installing t2t_avg replaced it")
  work = tempfile.mkdtemp()
  weights = tf.Variable(np.zeros((3, 4), np.float32))
  half = tf.Variable(np.zeros(5, np.float16))
  checkpoint = tf.train.Checkpoint(weights=weights, half=half)
  rng = np.random.default_rng(0)
  prefixes = []
  for _ in range(4):
    weights.assign(rng.normal(size=(3, 4)).astype(np.float32))
    half.assign(rng.normal(size=5).astype(np.float16))
    prefixes.append(checkpoint.save(os.path.join(work, "ckpt")))
  output = os.path.join(work, "avg", "averaged")
  subprocess.run([sys.executable, "-m", "t2t_avg",
                  "--checkpoints=" + ",".join(prefixes),
                  "--output_path=" + output], check=True,
                 stderr=subprocess.DEVNULL)
  averaged = tf.train.load_checkpoint(output + "-0")
  readers = [tf.train.load_checkpoint(p) for p in prefixes]
  for key in ("weights/.ATTRIBUTES/VARIABLE_VALUE",
              "half/.ATTRIBUTES/VARIABLE_VALUE"):
    got = averaged.get_tensor(key)
    total = np.zeros(got.shape, np.float64)
    for reader in readers:  # In input order, as the average sums.
      total += np.asarray(reader.get_tensor(key), np.float64)
    expected = (total / len(readers)).astype(got.dtype)
    if got.dtype != expected.dtype or not np.array_equal(got, expected):
      sys.exit(f"check_oldest_tf: {key} is not the float64 mean cast once")
  restored = tf.train.Checkpoint(weights=tf.Variable(np.zeros((3, 4), np.float32)),
                                 half=tf.Variable(np.zeros(5, np.float16)))
  restored.restore(output + "-0").assert_existing_objects_matched()
  print(f"check_oldest_tf: TensorFlow {tf.__version__} kept; its checkpoints "
        f"averaged into {output}-0, which it restores")


if __name__ == "__main__":
  main(sys.argv[1])
