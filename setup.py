"""t2t_avg: drop-in, metric-aware replacement for T2T's checkpoint averaging scripts."""
import re

import setuptools

with open("t2t_avg/__init__.py", encoding="utf-8") as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setuptools.setup(
    name="t2t_avg",
    version=VERSION,
    description=("Average TensorFlow checkpoints: a drop-in replacement for "
                 "Tensor2Tensor's avg_checkpoints.py and t2t-avg-all, with "
                 "metric-weighted averaging, TF2 checkpoints and streaming."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["t2t_avg", "t2t_avg.*"]),
    # What CI checks: the test suite on 3.11 with TensorFlow 2.21; on 3.10,
    # t2t_avg installed after TensorFlow 2.13 leaves it working, imports every
    # module and averages what it writes (scripts/check_python.sh); Keras
    # files in an environment without TensorFlow; Linux.
    python_requires=">=3.10",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
    ],
    # TensorFlow itself is an extra so that installing t2t_avg never puts a
    # second TensorFlow (tensorflow next to tensorflow-cpu) into an environment,
    # and Keras files need none. No ml_dtypes and no bounds: an unpinned
    # ml_dtypes pulls numpy 2 into TensorFlow 2.13's numpy 1.24 environment;
    # TensorFlow 2.14+, Keras 3 and JAX bring the ml_dtypes they need.
    # zlib-ng: zip's CRC-32 of .keras files at 4-9 GB/s (zlib's: 1-1.6);
    # no dependencies of its own (t2t_avg falls back to zlib without it).
    install_requires=["absl-py", "numpy", "crc32c", "h5py", "tqdm",
                      "zlib-ng"],
    extras_require={
        "tensorflow": ["tensorflow>=2.13"],
        "tensorflow-cpu": ["tensorflow-cpu>=2.13"],
        "test": ["pytest", "hypothesis", "six", "tensorboard"],
        "lint": ["ruff", "mypy"],
    },
    entry_points={"console_scripts": ["t2t-avg-all = t2t_avg.cli.average:run_avg_all"]},
)
