#!/usr/bin/env bash
# Installs the legacy oracles the tests compare with:
# - tf_keras (Keras 2), for legacy Keras 2 .h5 files: the release matching the
#   installed TensorFlow, with --no-deps (its own requirement is the full
#   `tensorflow` wheel, which would land beside tensorflow-cpu);
# - tensor2tensor 1.15.7 (+ six), into .legacy/ with --target: only the legacy
#   runs of the tests and the benchmark put it on their PYTHONPATH, so T2T's
#   own `t2t-avg-all` console script never shadows ours.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import tf_keras" 2>/dev/null; then
  tf=$(python -c 'import tensorflow as tf; print(tf.__version__.rsplit(".", 1)[0])')
  python -m pip install -q --no-deps "tf-keras==$tf.*"
fi
if [ -d .legacy/tensor2tensor ]; then exit 0; fi
wheels=$(mktemp -d)
python -m pip download -q --no-deps -d "$wheels" tensor2tensor==1.15.7
python -m pip install -q --no-deps --target .legacy "$wheels"/tensor2tensor-1.15.7-*.whl six
rm -rf "$wheels"
