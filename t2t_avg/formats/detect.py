"""What a path holds, told by content: a TF checkpoint, a Keras file, or what else.

Keras weights files (Keras 3 `.weights.h5`, Keras 2 `.h5`) are HDF5
(signature at byte 0, or 512, 1024, ... after a user block; which Keras
wrote one is read from its root group when it is opened, in `keras_h5`);
`.keras` files are zips with `config.json` and `model.weights.h5` at their
root; sharded Keras 3 weights have a JSON index (`.weights.json`) whose
`weight_map` names their HDF5 shards. Anything else that is recognisably
not a checkpoint (a PyTorch file, a SavedModel directory, another zip or
pickle) gets one line naming what it is. No TensorFlow and no h5py here.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Optional

from t2t_avg.files import paths
from t2t_avg.errors import AveragingError

TF, KERAS_WEIGHTS, KERAS_ARCHIVE = "tf", "keras_weights", "keras_archive"
KERAS_SHARDED = "keras_sharded"  # a `.weights.json` index and its shards
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_SUFFIXES = (".weights.h5", ".keras")
LEGACY_H5_SUFFIX, SHARDED_SUFFIX = ".h5", ".weights.json"
# Every suffix of a Keras checkpoint file's name, a longer one before the
# shorter one it ends in (the first that matches is the suffix).
KERAS_FILE_SUFFIXES = (SHARDED_SUFFIX,) + KERAS_SUFFIXES + (LEGACY_H5_SUFFIX,)
SHARD_MAP = "weight_map"  # The index's {group path: shard file name(s)}.
_INDEX_BYTES = 64 << 20  # An index larger than this is no index.
KERAS_CONFIG, KERAS_WEIGHTS_MEMBER = "config.json", "model.weights.h5"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# The magic number ending every TF table file (a V1 checkpoint, a V2 index).
_TABLE_MAGIC = struct.pack("<Q", 0xdb4775248b80fb57)
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # after b"\x80"
_NOT_A_CHECKPOINT = ("t2t_avg averages TensorFlow checkpoints (tf_keras' "
                     "TF-format weights too) and Keras .weights.h5, "
                     ".weights.json, .keras and .h5 files")


def keras_stem(path: str) -> str:
  """A Keras file's name without its directory and suffix."""
  name = os.path.basename(path)
  for suffix in KERAS_FILE_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


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
  """TF, KERAS_WEIGHTS (HDF5), KERAS_ARCHIVE or KERAS_SHARDED, for a
  resolved checkpoint path.

  A path that is not a local file (a TF prefix, an object-store URL) is TF.

  Raises:
    AveragingError: a file that is no checkpoint, naming what it is.
  """
  if not paths.is_local(path):
    if path.endswith(KERAS_FILE_SUFFIXES):
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
  if head.lstrip().startswith(b"{"):
    read_shard_index(path)  # Or what JSON file this is.
    return KERAS_SHARDED
  if _ends_with_table_magic(path):
    return TF  # A V1 checkpoint: one table file named as its prefix.
  raise AveragingError(
      f"{path} is not a checkpoint: not a TensorFlow checkpoint (no "
      f"{path}.index), not an HDF5 file (.weights.h5, .h5), not a zip "
      f"(.keras), not a JSON index (.weights.json); it starts with {head!r}")


def read_shard_index(path: str) -> dict:
  """The JSON index of sharded Keras weights, checked for its `weight_map`.

  Raises:
    AveragingError: not a JSON object with a `weight_map` of file names.
  """
  try:
    if os.path.getsize(path) > _INDEX_BYTES:
      raise ValueError(f"it has more than {_INDEX_BYTES} bytes")
    with open(path, "rb") as f:
      index = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError.
    raise AveragingError(f"{path} is not a readable JSON index of sharded "
                         f"Keras weights: {e}") from e
  shards = index.get(SHARD_MAP) if isinstance(index, dict) else None
  if not isinstance(shards, dict) or not all(
      isinstance(v, str) or (isinstance(v, list) and v and all(
          isinstance(n, str) for n in v)) for v in shards.values()):
    held = (", ".join(sorted(index)[:5]) or "nothing") if isinstance(
        index, dict) else type(index).__name__
    raise AveragingError(
        f"{path} is a JSON file but not the index of sharded Keras weights "
        f"(no {SHARD_MAP} of group paths to shard file names; it holds "
        f"{held})")
  return index


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
