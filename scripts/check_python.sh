#!/usr/bin/env bash
# Checks t2t_avg on the oldest Python and TensorFlow that setup.py declares, as
# a user of that TensorFlow would install it: TensorFlow first, then t2t_avg
# into the same virtual environment, which must leave TensorFlow as it was.
# Every module is imported, the README's main job runs on testdata/, and a
# checkpoint that TensorFlow writes is averaged and read back by it.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0
cd "$(dirname "$0")/.."
python=${1:-python3.10}
tensorflow=${2:-2.13.1}
if ! "$python" -c pass 2>/dev/null && command -v pyenv >/dev/null; then
  # A pyenv shim of a version that is installed but not selected.
  version=$(pyenv versions --bare | grep -E "^${python#python}(\.|$)" | tail -1)
  [ -n "$version" ] && python="$(pyenv root)/versions/$version/bin/$python"
fi
if ! "$python" -c pass 2>/dev/null; then
  echo "check_python: $python is not installed here; skipped" >&2
  exit 0
fi
venv=".venv-$($python -c 'import sys; print("py%d%d" % sys.version_info[:2])')-tf$tensorflow"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q "tensorflow-cpu==$tensorflow"
"$venv/bin/pip" install -q -e .
modules=$(cd t2t_avg && find . -name '*.py' ! -name '__main__.py' | sed 's|^\./||; s|\.py$||; s|/|.|g; s|\.__init__$||; s|^__init__$||' | sed 's|^|t2t_avg.|; s|\.$||' | sort)
# shellcheck disable=SC2086
"$venv/bin/python" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; print('imported', len(sys.argv) - 1, 'modules on', sys.version.split()[0])" $modules
out=$(mktemp -d)
"$venv/bin/python" -m t2t_avg --prefix=testdata/train/ --num_last_checkpoints=4 --output_path="$out/averaged.ckpt" 2>/dev/null
test -f "$out/averaged.ckpt-0.index"
echo "check_python: $python averaged testdata/ into $out/averaged.ckpt-0"
"$venv/bin/python" scripts/check_oldest_tf.py "$tensorflow"
