"""How checkpoints are named: one scheme per kind, one listing per look, one step rule.

Each kind of name is one object behind the `NameFormat` protocol (the shape
of Orbax's `path/step.py`): the name of a step, every checkpoint of a
directory, the checkpoint of one step.

- `TFNames`: TF's `<basename>-<N>` prefixes, found by their `.index` files,
  N possibly zero-padded (tf_keras' `ckpt-{epoch:02d}` gives `ckpt-06`).
- `KerasNames`: Keras files (`.weights.h5`, `.keras`, Keras 2 `.h5`, the
  `.weights.json` index of sharded weights; never a shard) named by
  `ModelCheckpoint`, ordered by the optimizer's iteration counter inside
  them, else by the number in their names, else by modification time.
- `OutputNames`: this tool's continuous outputs, `model.ckpt-<N>` (TF) or
  the newest input's file name (Keras), each with its record beside it.

A directory is listed once per look (`Listing`) and every question about it
is answered from that list. A Keras file is opened once: the opened source
travels on in its `Checkpoint`. `read_step` is the one rule for a step: a
counter inside the checkpoint, else the number in its name.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import string
from typing import Optional, Protocol
from collections.abc import Sequence

from absl import logging

from t2t_avg import formats
from t2t_avg import options
from t2t_avg.errors import AveragingError, error_text
from t2t_avg.files import filesystem
from t2t_avg.files import paths
from t2t_avg.formats import base
from t2t_avg.formats import detect
from t2t_avg.formats import keras_sharded
from t2t_avg.formats import state_file
from t2t_avg.formats import tf_bundle
from t2t_avg.record import RECORD_SUFFIX

INDEX_SUFFIX = tf_bundle.INDEX_SUFFIX
STATE_FILE = state_file.STATE_FILE
KERAS_SUFFIXES = detect.KERAS_FILE_SUFFIXES  # The longest first.
KERAS_GLOBS = ", ".join("*" + s for s in KERAS_SUFFIXES)
OUTPUT_BASENAME = "model.ckpt"  # t2t-avg-all's continuous outputs.
BY_COUNTER, BY_NAME, BY_MTIME = "counter", "name", "mtime"
# Up to this many Keras files are kept open from the listing to the average
# (each opened once); a larger directory closes them and reopens the chosen,
# rather than hold a file handle (or an extracted `.keras` member) for each.
KEEP_OPEN_MAX = 64
_TF_NAME = re.compile(r"(.*)-(\d+)")
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")
# A name Keras gives a shard of sharded weights (`m_00000.weights.h5`).
_SHARD_NAME = re.compile(r".+_\d{5,}" + re.escape(keras_sharded.SHARD_SUFFIX))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checkpoint: its path, its step, and its source once opened.

  Attributes:
    path: the checkpoint prefix (TF) or file (Keras).
    step: its step, or None when unknown.
    step_source: where the step came from: a tensor key, 'name', 'unknown'.
    source: the opened checkpoint, when it was opened (handed on, not
      reopened).
    epoch: a Keras file's `{epoch}` (1-based), when its name says it for
      sure: its one number, or the number at `{epoch}` of the name pattern.
    name_numbers: the whole numbers in a Keras file's name. When it is not
      given (None), both are read from the name (`name_number`).
    mtime_ns, ctime_ns: of the file (TF: its `.index`), when listed.
  """
  path: str
  step: Optional[int]
  step_source: str
  source: Optional[base.Source] = dataclasses.field(default=None,
                                                    compare=False, repr=False)
  epoch: Optional[int] = None
  name_numbers: Optional[tuple[int, ...]] = None
  mtime_ns: int = dataclasses.field(default=0, compare=False)
  ctime_ns: int = dataclasses.field(default=0, compare=False)

  def __post_init__(self) -> None:
    if self.name_numbers is None:
      keras = is_keras_name(self.path)
      object.__setattr__(self, "name_numbers",
                         name_numbers(self.path) if keras else ())
      if self.epoch is None and keras:
        object.__setattr__(self, "epoch", name_number(self.path))

  @property
  def opened(self) -> base.Source:
    """The source, for a checkpoint that was opened."""
    if self.source is None:
      raise AveragingError(f"checkpoint {self.path} was never opened")
    return self.source


@dataclasses.dataclass(frozen=True)
class Listing:
  """The names in a directory, as one look found them."""
  directory: str
  names: frozenset[str]

  def path(self, name: str) -> str:
    """A name's path, as TF's glob gives it (`./name` in the current
    directory)."""
    return os.path.join(self.directory or ".", name)

  def is_ours(self, name: str) -> bool:
    """Whether an entry is an output of this tool (its record is there)."""
    return name + RECORD_SUFFIX in self.names

  def keras_files(self, name_prefix: str = "") -> list[str]:
    """The names of Keras files starting with `name_prefix`, ours and
    shards left out."""
    return sorted(n for n in self.names if n.endswith(KERAS_SUFFIXES) and
                  n.startswith(name_prefix) and not self.is_ours(n) and
                  n not in self.shards)

  @functools.cached_property
  def shards(self) -> frozenset[str]:
    """The names of shards of sharded weights, which are no checkpoints.

    A shard cannot be told by its name alone (`w_{epoch:05d}.weights.h5`
    looks the same): those every index here (`*.weights.json`) lists are
    shards, and so, where an index is, is every file named as Keras names
    shards (`<name>_00000.weights.h5`): Keras writes the shards of a save
    before its index, so a save in progress has shards and no index yet.
    """
    indexes = [n for n in self.names if n.endswith(detect.SHARDED_SUFFIX)]
    if not indexes or not paths.is_local(self.directory or "."):
      return frozenset()
    found = {n for n in self.names if _SHARD_NAME.fullmatch(n)}
    for name in indexes:
      path = self.path(name)
      try:
        found.update(os.path.basename(f) for f in keras_sharded.shard_files(
            path, detect.read_shard_index(path)))
      except (AveragingError, OSError):
        continue  # Being written, or no index: its own listing says so.
    return frozenset(found)

  def tf_prefixes(self) -> list[str]:
    """The names of TF checkpoints (their `.index` files), ours left out."""
    return sorted(n[:-len(INDEX_SUFFIX)] for n in self.names
                  if n.endswith(INDEX_SUFFIX) and
                  not self.is_ours(n[:-len(INDEX_SUFFIX)]))


def look(directory: str) -> Listing:
  """One listing of a directory (empty when it is not there)."""
  try:
    names = filesystem.listdir(directory or ".")
  except OSError:
    names = []
  return Listing(directory, frozenset(n.rstrip("/") for n in names))


class NameFormat(Protocol):
  """A naming scheme: names of steps, and the checkpoints of a directory."""

  def build_name(self, directory: str, step: int) -> str:
    """The path of the checkpoint of `step` in `directory`."""

  def find_all(self, directory: str,
               listing: Optional[Listing] = None) -> list[Checkpoint]:
    """The checkpoints of a directory, oldest first."""

  def find_step(self, directory: str, step: int,
                listing: Optional[Listing] = None) -> Optional[Checkpoint]:
    """The checkpoint of `step` in a directory, or None."""


def _find_step(found: Sequence[Checkpoint],
               step: int) -> Optional[Checkpoint]:
  matching = [c for c in found if c.step == step]
  return matching[-1] if matching else None


# --- TF checkpoints: <basename>-<N> ------------------------------------------

def split_tf_name(path: str) -> Optional[tuple[str, int]]:
  """(`<basename>`, N) of a prefix `<basename>-<N>` (N may be zero-padded)."""
  match = _TF_NAME.fullmatch(path)
  return (match.group(1), int(match.group(2))) if match else None


def tf_name_step(path: str) -> Optional[int]:
  """The trailing -N of a checkpoint prefix, or None."""
  split = split_tf_name(path)
  return split[1] if split else None


@dataclasses.dataclass(frozen=True)
class TFNames:
  """TF checkpoints `<basename>-<N>` (any basename when it is '').

  Attributes:
    basename: the name before `-<N>`; '' means any.
    ours: which to find: False, inputs (not outputs of this tool); True,
      outputs of this tool only; None, both.
  """
  basename: str = ""
  ours: Optional[bool] = False

  def build_name(self, directory: str, step: int) -> str:
    return os.path.join(directory, f"{self.basename or OUTPUT_BASENAME}-{step}")

  def find_all(self, directory: str,
               listing: Optional[Listing] = None) -> list[Checkpoint]:
    """The checkpoints `<basename>-<N>` of a directory, by step (then name)."""
    listing = listing or look(directory)
    found = []
    for name in listing.names:
      if not name.endswith(INDEX_SUFFIX):
        continue
      prefix = name[:-len(INDEX_SUFFIX)]
      split = split_tf_name(prefix)
      if split is None or self.basename not in ("", split[0]):
        continue
      if self.ours is not None and listing.is_ours(prefix) != self.ours:
        continue
      found.append(Checkpoint(listing.path(prefix), split[1], "name"))
    return sorted(found, key=lambda c: (c.step, c.path))

  def find_step(self, directory: str, step: int,
                listing: Optional[Listing] = None) -> Optional[Checkpoint]:
    return _find_step(self.find_all(directory, listing), step)


# --- Keras files: ModelCheckpoint's names, iteration counters ----------------

def name_numbers(path: str) -> tuple[int, ...]:
  """The whole numbers in a Keras file's name (not decimals such as `0.52`
  from `{val_loss:.2f}`)."""
  return tuple(int(n) for n in _NUMBERS.findall(detect.keras_stem(path))
               if "." not in n)


def name_number(path: str) -> Optional[int]:
  """The number `ModelCheckpoint` put in a file's name, when it is sure.

  That is the name's one whole number, or else its one number not glued to
  a letter (`resnet50-07.weights.h5` gives 7); decimals do not count
  (`weights.03-0.52.keras` gives 3). A name with several numbers
  (`s-06-002.weights.h5`, `{epoch}-{batch}`) gives None: which one is the
  epoch is never guessed.
  """
  stem = detect.keras_stem(path)
  whole = [m for m in _NUMBERS.finditer(stem) if "." not in m.group()]
  if len(whole) > 1:
    whole = [m for m in whole if not (m.start() and
                                      stem[m.start() - 1].isalpha())]
  return int(whole[0].group()) if len(whole) == 1 else None


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> re.Pattern[str]:
  """A regular expression for the names a `ModelCheckpoint` filepath makes.

  `{epoch...}` becomes the group `epoch` (digits); any other field
  (`{batch:03d}`, `{val_loss:.2f}`) matches anything.

  Raises:
    ArgumentError: no `{epoch}` field, or not a format string.
  """
  options.check_name_pattern(pattern)
  parts, epoch = [], r"(?P<epoch>\d+)"
  for literal, field, _, _ in string.Formatter().parse(
      os.path.basename(pattern)):
    parts.append(re.escape(literal))
    if field == "epoch":
      parts.append(epoch)
      epoch = r"\d+"
    elif field is not None:
      parts.append(".+?")
  return re.compile("".join(parts))


@dataclasses.dataclass(frozen=True)
class KerasNames:
  """Keras files named by `ModelCheckpoint` (see `Listing.keras_files`).

  Attributes:
    name_prefix: only files whose names start with it.
    pattern: the `ModelCheckpoint` filepath the files were named by
      (`s-{epoch:02d}-{batch:03d}.weights.h5`), which says which number of
      a name is its epoch; '' when the names say it alone.
  """
  name_prefix: str = ""
  pattern: str = ""

  def epoch_of(self, path: str) -> Optional[int]:
    """The `{epoch}` of a file's name, when the name says it for sure."""
    if not self.pattern:
      return name_number(path)
    match = compile_pattern(self.pattern).fullmatch(os.path.basename(path))
    return int(match.group("epoch")) if match else None

  def build_name(self, directory: str, step: int) -> str:
    pattern = self.pattern or self.name_prefix + "{epoch:02d}.weights.h5"
    fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    return os.path.join(directory, pattern.format(
        **{f: step for f in fields}))

  def find_all(self, directory: str, listing: Optional[Listing] = None, *,
               keep_open: bool = False, warn_unreadable: bool = True,
               strict: bool = False) -> list[Checkpoint]:
    """The Keras files of a directory, oldest first (see `order`).

    Args:
      directory: a local directory.
      listing: its listing, when it was just listed.
      keep_open: hand on every file opened here (its `Checkpoint.source`;
        the caller closes it); else a file is opened only when it changed
        since it was last read.
      warn_unreadable: warn about files that cannot be read (else DEBUG: a
        file still being written, in continuous mode).
      strict: a file that cannot be read is an error (one-shot mode: the
        last N cannot be told without it), not left out.

    Raises:
      AveragingError: the directory holds TF checkpoints too; with
        `strict`, a file cannot be read (naming it).
    """
    listing = listing or look(directory)
    check_one_kind(listing)
    files: list[Checkpoint] = []
    try:
      for name in listing.keras_files(self.name_prefix):
        path = listing.path(name)
        found, problem = _read_keras(self, path, keep_open)
        if found is None and strict:
          named = f" named {self.name_prefix}*" if self.name_prefix else ""
          raise AveragingError(
              f"{problem if path in problem else f'{path}: {problem}'}; it "
              f"is one of the Keras files{named} in {directory or '.'}, "
              "whose order needs every one: wait until it is written, or "
              "move it away")
        if found is None:
          (logging.warning if warn_unreadable else logging.debug)(
              "Leaving out %s: %s", path, problem)
          continue
        files.append(found)
    except BaseException:
      for opened in files:
        if opened.source is not None:
          opened.source.close()
      raise
    return order(directory, files)

  def find_step(self, directory: str, step: int,
                listing: Optional[Listing] = None) -> Optional[Checkpoint]:
    return _find_step(self.find_all(directory, listing), step)


def check_one_kind(listing: Listing) -> None:
  """Refuses a directory holding both TF checkpoints and Keras files.

  Raises:
    AveragingError: naming one of each.
  """
  keras, tf_prefixes = listing.keras_files(), listing.tf_prefixes()
  if keras and tf_prefixes:
    raise AveragingError(
        "directory {directory} holds both TF checkpoints ({tf}) and Keras "
        "files ({keras}); t2t_avg lists one kind per directory: move one "
        "kind elsewhere, or name the files with {checkpoints}",
        directory=listing.directory, tf=tf_prefixes[0], keras=keras[0])


# (path, size, mtime_ns) -> (step, step source): not re-read per poll.
_STEP_CACHE: dict[tuple[str, int, int], tuple[Optional[int], str]] = {}
# How each directory was last ordered, so the log says it once per change.
_ORDER_LOGGED: dict[str, str] = {}


def _read_keras(names: KerasNames, path: str, keep_open: bool) -> tuple[
    Optional[Checkpoint], str]:
  """The file with its step (`read_step`), or (None, why it cannot be read
  now). A `.keras` file's CRC is checked when it is chosen (`verify`)."""
  try:
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    source = None
    if keep_open or key not in _STEP_CACHE:
      source = formats.open_source(path, check_crc=False)
      step = read_step(source, names=names)
      if len(_STEP_CACHE) > 4096:
        _STEP_CACHE.clear()
      _STEP_CACHE[key] = step.step, step.step_source
      if not keep_open:
        source.close()
        source = None
  except FileNotFoundError:
    return None, "it was deleted"
  except AveragingError as e:
    return None, str(e)
  found = _named(path, *_STEP_CACHE[key], source, names)
  return dataclasses.replace(found, mtime_ns=stat.st_mtime_ns,
                             ctime_ns=stat.st_ctime_ns), ""


def order(directory: str, files: list[Checkpoint]) -> list[Checkpoint]:
  """Keras files, oldest first: by the optimizer's iteration counter when
  every file has one, else by the number in their names when every name has
  one, else by modification time (ties: modification time, then name). The
  log says which, once per directory and change."""
  if not files:
    return []
  if all(f.step_source not in ("name", "unknown") for f in files):
    basis = BY_COUNTER
    files = sorted(files, key=lambda f: (f.step, f.mtime_ns, f.path))
  elif all(f.epoch is not None for f in files):
    basis = BY_NAME
    files = sorted(files, key=lambda f: (f.epoch, f.mtime_ns, f.path))
  else:
    basis = BY_MTIME
    files = sorted(files, key=lambda f: (f.mtime_ns, f.path))
  text = {BY_COUNTER: "their optimizer iteration counters (%s)" % ", ".join(
              sorted({f.step_source for f in files})),
          BY_NAME: "the numbers in their names (ModelCheckpoint's {epoch})",
          BY_MTIME: "modification time (not every file has an iteration "
                    "counter or a number in its name)"}[basis]
  if _ORDER_LOGGED.get(directory) != text:
    _ORDER_LOGGED[directory] = text
    logging.info("Ordering the Keras files in %s by %s", directory, text)
  return files


def is_keras_name(path: str) -> bool:
  """Whether a path ends as a Keras file's name does (`KERAS_SUFFIXES`)."""
  return path.endswith(KERAS_SUFFIXES)


# --- continuous outputs -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OutputNames:
  """This tool's continuous outputs: `model.ckpt-<N>` for TF windows, the
  newest input's file name for Keras windows; a record beside each."""

  def build_name(self, directory: str, step: int) -> str:
    """`<directory>/model.ckpt-<step>`, the name t2t-avg-all gave outputs."""
    return os.path.join(directory, f"{OUTPUT_BASENAME}-{step}")

  def name_for(self, directory: str, newest: Checkpoint) -> str:
    """Where a window's average goes: `build_name` of its newest input's
    step, or for Keras files `<directory>/<that file's name>`."""
    if is_keras_name(newest.path):
      return os.path.join(directory, os.path.basename(newest.path))
    assert newest.step is not None
    return self.build_name(directory, newest.step)

  def find_all(self, directory: str,
               listing: Optional[Listing] = None) -> list[Checkpoint]:
    """The outputs in a directory: `model.ckpt-<N>` by step, then Keras
    files by name."""
    listing = listing or look(directory)
    keras = [Checkpoint(listing.path(n), None, "unknown")
             for n in sorted(listing.names)
             if is_keras_name(n) and listing.is_ours(n)]
    return TFNames(OUTPUT_BASENAME, ours=None).find_all(
        directory, listing) + keras

  def find_step(self, directory: str, step: int,
                listing: Optional[Listing] = None) -> Optional[Checkpoint]:
    return _find_step(self.find_all(directory, listing), step)


# --- the step rule ----------------------------------------------------------

def scheme_for(path: str, pattern: str = "") -> TFNames | KerasNames:
  """The naming scheme of a checkpoint path."""
  return KerasNames(pattern=pattern) if is_keras_name(path) else TFNames()


def _named(path: str, step: Optional[int], step_source: str,
           source: Optional[base.Source],
           names: TFNames | KerasNames) -> Checkpoint:
  """A Checkpoint with what its name says (a Keras file's epoch)."""
  if not isinstance(names, KerasNames):
    return Checkpoint(path, step, step_source, source)
  return Checkpoint(path, step, step_source, source, epoch=names.epoch_of(path),
                    name_numbers=name_numbers(path))


def name_step(path: str, names: TFNames | KerasNames) -> Optional[int]:
  """The step a name gives: TF's trailing -N, a Keras file's `{epoch}`."""
  if isinstance(names, KerasNames):
    return names.epoch_of(path)
  return tf_name_step(path)


def read_step(source: base.Source, step_from: str = "auto", *,
              names: Optional[TFNames | KerasNames] = None) -> Checkpoint:
  """The checkpoint with its step, from `step_from` or the first source found.

  `auto` looks at, in order: the format's step counters (for TF: a
  `global_step` tensor, then an optimizer's iteration counter, the inner
  optimizer's first for a Keras LossScaleOptimizer; for Keras files the
  optimizer's iteration counter), then the name (TF: the trailing -N; TF2
  numbers files by save count, not training step, which is why the name
  comes last; Keras: ModelCheckpoint's `{epoch}`, see `name_number`).

  Raises:
    AveragingError: the asked-for source is not there.
  """
  path = source.path
  names = names or scheme_for(path)
  if step_from == "name":
    step = name_step(path, names)
    if step is None:
      raise AveragingError("{step_from}=name: checkpoint {path} has no "
                           "trailing -N in its name", path=path)
    return _named(path, step, "name", source, names)
  tensors = source.tensors()
  if step_from != "auto":
    if step_from not in tensors:
      raise AveragingError("{step_from}={key}: checkpoint {path} has no "
                           "such tensor", key=step_from, path=path)
    return _named(path, _scalar_int(source, step_from), step_from, source,
                  names)
  for key in source.step_keys:
    if key in tensors:
      return _named(path, _scalar_int(source, key), key, source, names)
  step = name_step(path, names)
  return _named(path, step, "name" if step is not None else "unknown",
                source, names)


def _scalar_int(source: base.Source, key: str) -> int:
  tensor = source.tensors()[key]
  if not tensor.is_integer_scalar:
    raise AveragingError(f"tensor {key} in checkpoint {source.path} is not an "
                         "integer scalar, so it cannot give the step")
  return int(base.read_array(source, tensor))


# --- choosing the last N: the state file (TF), the listing (Keras) -----------

def read_state(directory: str) -> Optional[state_file.CheckpointState]:
  """A directory's `checkpoint` state file, or None.

  Raises:
    AveragingError: a garbled state file.
  """
  try:
    return state_file.read(directory)
  except (OSError, ValueError) as e:
    raise AveragingError(f"cannot read {os.path.join(directory, STATE_FILE)}: "
                         f"{error_text(e)}") from e


def relocate(listed: str, state_dir: str) -> str:
  """A state-file entry, or the same basename in the state file's directory.

  (TF's reader has already joined a relative entry to the directory.)

  Raises:
    AveragingError: neither exists.
  """
  state_path = os.path.join(state_dir, STATE_FILE)
  if tf_bundle.is_v2(listed) or tf_bundle.is_v1(listed):
    return listed
  moved = os.path.join(state_dir, os.path.basename(listed))
  if moved != listed and (tf_bundle.is_v2(moved) or tf_bundle.is_v1(moved)):
    logging.warning("%s lists %s, which does not exist; using %s (the "
                    "training directory was moved)", state_path, listed, moved)
    return moved
  raise AveragingError(f"{state_path} names checkpoint {listed}, whose files "
                       f"are missing (no {listed}{INDEX_SUFFIX})")


def tf_last_n(prefix: str, n: Optional[int],
              state: Optional[state_file.CheckpointState],
              listing: Listing) -> list[str]:
  """The last `n` (None: all) checkpoints of the state file in
  `dirname(prefix)`, with unlisted ones when it lists fewer.

  TF2's `tf.train.Checkpoint.save` lists only its newest checkpoint: when
  fewer than `n` are listed, unlisted checkpoints of the same basename with a
  step number no higher than the newest listed one count too, highest first
  (never an output of this tool). Steps may be zero-padded and of mixed
  widths (`ckpt-09`, `ckpt-10`).

  Raises:
    AveragingError: no state file, or a listed checkpoint is missing.
  """
  state_dir = listing.directory or "."
  listed = _listed(prefix, state, state_dir)
  wanted = len(listed) if n is None else n
  chosen = [relocate(p, state_dir) for p in listed[-wanted:]]
  if n is None or len(chosen) < n:
    unlisted = _unlisted(chosen, None if n is None else n - len(chosen),
                         listing)
    if unlisted:
      chosen = unlisted + chosen
      logging.info("%s lists %d checkpoints; using %d: %s",
                   os.path.join(state_dir, STATE_FILE), len(listed),
                   len(chosen), ", ".join(chosen))
  if n is not None and len(chosen) < n:
    logging.warning("--num_last_checkpoints=%d but only %d checkpoints were "
                    "found in %s", n, len(chosen), state_dir)
  return chosen


def _listed(prefix: str, state: Optional[state_file.CheckpointState],
            state_dir: str) -> list[str]:
  """The paths a state file lists, oldest first, its newest last."""
  if state is None or not state.model_checkpoint_path:
    hint = ""
    if not prefix.endswith("/") and filesystem.exists(
        os.path.join(prefix, STATE_FILE)):
      hint = "; did you mean {prefix}={directory}/?"
    raise AveragingError("no checkpoint state file {state_file} (the "
                         "directory of {prefix})" + hint,
                         state_file=os.path.join(state_dir, STATE_FILE),
                         directory=prefix)
  listed = list(state.all_model_checkpoint_paths)
  if not listed or listed[-1] != state.model_checkpoint_path:
    listed.append(state.model_checkpoint_path)
  return listed


def _unlisted(listed: list[str], wanted: Optional[int],
              listing: Listing) -> list[str]:
  """Up to `wanted` (None: all) unlisted checkpoints older than the newest."""
  split = split_tf_name(listed[-1])
  if split is None or wanted == 0:
    return []
  stem, newest_step = split
  directory = os.path.dirname(stem)
  if (directory or ".") != (listing.directory or "."):
    listing = look(directory)
  found = [c.path for c in TFNames(os.path.basename(stem)).find_all(
      directory, listing) if c.step is not None and c.step <= newest_step and
           c.path not in listed]
  return found if wanted is None else found[-wanted:]


def keras_last_n(names: KerasNames, directory: str, n: Optional[int],
                 listing: Listing) -> list[Checkpoint]:
  """The newest `n` (None: all) Keras files of a directory, oldest first,
  opened (the caller closes them) when there are at most `KEEP_OPEN_MAX`;
  the others are closed.

  Raises:
    AveragingError: there are none.
  """
  keep_open = len(listing.keras_files(names.name_prefix)) <= KEEP_OPEN_MAX
  files = names.find_all(directory, listing, keep_open=keep_open, strict=True)
  if not files:
    raise AveragingError(f"no Keras files ({KERAS_GLOBS}) named "
                         f"{names.name_prefix}* in {directory}")
  chosen = files if n is None else files[-n:]
  for skipped in files[:len(files) - len(chosen)]:
    if skipped.source is not None:
      skipped.source.close()
  logging.info("Using the last %d of %d Keras files in %s: %s", len(chosen),
               len(files), directory, ", ".join(c.path for c in chosen))
  if n is not None and len(chosen) < n:
    logging.warning("--num_last_checkpoints=%d but only %d Keras files were "
                    "found in %s", n, len(chosen), directory)
  return chosen
