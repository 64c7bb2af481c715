"""What a path holds, told by content: a TF checkpoint, a Keras 3 file, or what else.

`.weights.h5` files are HDF5 (signature at byte 0, or 512, 1024, ... after a
user block); `.keras` files are zips with `config.json` and
`model.weights.h5` at their root. Anything else that is recognisably not a
checkpoint (a PyTorch file, a SavedModel directory, another zip or pickle)
gets one line naming what it is. No TensorFlow and no h5py here.
"""
from __future__ import annotations

import os
import struct
import zipfile
from typing import Optional

from t2t_avg.files import paths
from t2t_avg.errors import AveragingError

TF, KERAS_WEIGHTS, KERAS_ARCHIVE = "tf", "keras_weights", "keras_archive"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_SUFFIXES = (".weights.h5", ".keras")
KERAS_CONFIG, KERAS_WEIGHTS_MEMBER = "config.json", "model.weights.h5"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# The magic number ending every TF table file (a V1 checkpoint, a V2 index).
_TABLE_MAGIC = struct.pack("<Q", 0xdb4775248b80fb57)
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # after b"\x80"
_NOT_A_CHECKPOINT = ("t2t_avg averages TensorFlow checkpoints and Keras 3 "
                     ".weights.h5 and .keras files")


def hdf5_offset(path: str) -> Optional[int]:
  """Where the HDF5 superblock of a local file starts, or None: not HDF5."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= size:
      f.seek(offset)
      if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
        return offset
      offset = 512 if offset == 0 else offset * 2
  return None


def kind_of(path: str) -> str:
  """TF, KERAS_WEIGHTS or KERAS_ARCHIVE, for a resolved checkpoint path.

  A path that is not a local file (a TF prefix, an object-store URL) is TF.

  Raises:
    AveragingError: a file that is no checkpoint, naming what it is.
  """
  if not paths.is_local(path):
    if path.endswith(KERAS_SUFFIXES):
      raise AveragingError(f"{path}: t2t_avg reads Keras files on a local "
                           "disk only (through h5py); copy it there first")
    return TF
  if not os.path.isfile(path):
    return TF
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith(_ZIP_SIGNATURES):
    return _zip_kind(path)
  if hdf5_offset(path) is not None:
    return KERAS_WEIGHTS
  if head[:1] == b"\x80" and head[1:2] in _PICKLE_PROTOCOLS:
    raise AveragingError(
        f"{path} is a Python pickle (an old-style PyTorch torch.save file?), "
        f"not a checkpoint: {_NOT_A_CHECKPOINT}")
  if path.endswith(".weights.json") and head.lstrip().startswith(b"{"):
    raise AveragingError(
        f"{path} is the index of sharded Keras weights (save_weights with "
        "max_shard_size), which t2t_avg does not read; save the weights "
        "unsharded, to a .weights.h5 file")
  if _ends_with_table_magic(path):
    return TF  # A V1 checkpoint: one table file named as its prefix.
  raise AveragingError(
      f"{path} is not a checkpoint: not a TensorFlow checkpoint (no "
      f"{path}.index), not an HDF5 file (.weights.h5), not a zip (.keras); "
      f"it starts with {head!r}")


def _ends_with_table_magic(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() < len(_TABLE_MAGIC):
      return False
    f.seek(-len(_TABLE_MAGIC), os.SEEK_END)
    return f.read() == _TABLE_MAGIC


def _zip_kind(path: str) -> str:
  """KERAS_ARCHIVE, or an AveragingError saying what zip this is."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise AveragingError(f"{path} is a truncated or damaged zip file ({e}), "
                         "not a readable .keras file") from e
  if KERAS_CONFIG in names and KERAS_WEIGHTS_MEMBER in names:
    return KERAS_ARCHIVE
  if KERAS_CONFIG in names and "model.weights.npz" in names:
    raise AveragingError(
        f"{path} is a .keras file whose weights are in model.weights.npz; "
        "t2t_avg reads model.weights.h5 only (save it with Keras' default)")
  if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
    raise AveragingError(f"{path} is a PyTorch checkpoint (a torch.save "
                         f"zip), not a TensorFlow or Keras one: "
                         f"{_NOT_A_CHECKPOINT}")
  held = ", ".join(names[:5]) or "nothing"
  raise AveragingError(
      f"{path} is a zip file but not a .keras file (no config.json and "
      f"model.weights.h5 at its root; it holds {held})")


def refuse_directory(directory: str) -> None:
  """Refuses a directory that is a model, not a directory of checkpoints.

  Raises:
    AveragingError: a SavedModel or an unzipped Keras model directory.
  """
  if not paths.is_local(directory):
    return
  try:
    names = set(os.listdir(directory))
  except OSError:
    return
  if "saved_model.pb" in names or "saved_model.pbtxt" in names:
    hint = ""
    if os.path.isfile(os.path.join(directory, "variables",
                                   "variables.index")):
      hint = (f"; its variables are a TF checkpoint, "
              f"{os.path.join(directory, 'variables', 'variables')}")
    raise AveragingError(f"{directory} is a TensorFlow SavedModel directory "
                         f"(saved_model.pb), not a checkpoint{hint}")
  if {KERAS_CONFIG, KERAS_WEIGHTS_MEMBER} <= names:
    raise AveragingError(
        f"{directory} is an unzipped Keras model directory (model.save("
        "zipped=False)), not a checkpoint; average the model.weights.h5 "
        f"files of such directories, e.g. "
        f"{os.path.join(directory, KERAS_WEIGHTS_MEMBER)}")
