#!/usr/bin/env bash
# Installs the legacy oracle, tensor2tensor 1.15.7 (+ six), into .legacy/ with
# --target: only the legacy runs of the tests and the benchmark put it on their
# PYTHONPATH, so T2T's own `t2t-avg-all` console script never shadows ours.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .legacy/tensor2tensor ]; then exit 0; fi
wheels=$(mktemp -d)
python -m pip download -q --no-deps -d "$wheels" tensor2tensor==1.15.7
python -m pip install -q --no-deps --target .legacy "$wheels"/tensor2tensor-1.15.7-*.whl six
rm -rf "$wheels"
