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
    # What CI checks: the test suite on 3.11, every module and the main job
    # on 3.10 (scripts/check_python.sh), TensorFlow 2.21, Linux.
    python_requires=">=3.10",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
    ],
    # TensorFlow itself is an extra so that installing t2t_avg never puts a
    # second TensorFlow (tensorflow next to tensorflow-cpu) into an environment.
    install_requires=["absl-py", "numpy", "ml_dtypes", "crc32c", "h5py"],
    extras_require={
        "tensorflow": ["tensorflow>=2.16"],
        "tensorflow-cpu": ["tensorflow-cpu>=2.16"],
        "test": ["pytest", "hypothesis", "six", "tensorboard"],
        "lint": ["ruff", "mypy"],
    },
    entry_points={"console_scripts": ["t2t-avg-all = t2t_avg.cli.average:run_avg_all"]},
)
