"""The benchmark's checkpoint series: model shapes, generators, output checks.

Used by `bench.py`. The generators and checks (`generate_*`, `compare_outputs`,
`check_mean`) import numpy and TensorFlow and run in child processes started
by `bench.py` (`python -c WORKER_MAIN <function> <json kwargs>`); everything
else here imports neither, so the measuring parent stays small.

Series kinds, each cached in its own directory under `.bench/`:

- `t2t`: a T2T transformer saved by TF1's `tf.compat.v1.train.Saver`.
- `small_tensors`: many 1 KB float32 tensors written with `tf.raw_ops.SaveV2`.
- `max_shard`: a transformer saved twice per step by TF2's
  `tf.train.Checkpoint.write`: once under a `MaxShardSizePolicy` that slices
  the embedding over several shards, once unsliced (the same values).

Every generator makes one checkpoint at a time and values in slices of whole
rows, so its memory is one model plus a slice whatever the series length.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import types
from typing import TYPE_CHECKING, Any, Optional, TypedDict
from collections.abc import Callable, Iterator, Sequence

from bench_children import ChildRun

if TYPE_CHECKING:  # Only the children import numpy.
  from numpy.typing import NDArray

# TensorFlow ships no type information: its objects are Any to mypy.
TFModule = Any  # tf.Module
TFVariable = Any  # tf.Variable

# Bump when a generated series changes, so stale caches are regenerated.
SERIES_FORMAT = 2
FIRST_STEP = 1000
STEP_INTERVAL = 1000
GENERATE_CHUNK_ELEMENTS = 4 << 20
GENERATE_RSS_BUDGET_MIB = 2048
SMALL_TENSOR_ELEMENTS = 256  # float32: 1 KB each
LAYOUTS = ("unsliced", "sliced")  # The two halves of a max_shard series.

@dataclasses.dataclass(frozen=True)
class Preset:
  """Dimensions of a T2T transformer whose variables make a series."""
  name: str
  vocab_size: int
  hidden_size: int
  filter_size: int
  encoder_layers: int
  decoder_layers: int


PRESETS = {
    preset.name: preset for preset in (
        # 2 encoder + 3 decoder layers at hidden 1024 with a 32k vocabulary:
        # 108.3M float32 parameters, 433 MB per checkpoint.
        Preset("default", 32000, 1024, 4096, 2, 3),
        # transformer_big's 6 + 6 layers with a 64k vocabulary: 241.8M
        # parameters (2.2x), and a largest tensor twice as big (262 MB).
        Preset("large", 64000, 1024, 4096, 6, 6),
        # Seconds per run, for trying the harness; its ratios mean nothing
        # (importing TensorFlow dominates).
        Preset("tiny", 1000, 64, 256, 1, 1),
    )
}


@dataclasses.dataclass(frozen=True)
class VariableInfo:
  """One model variable: its T2T name, shape and initial value range."""
  name: str
  shape: tuple[int, ...]
  center: float
  limit: float  # values are uniform in center +- limit

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def model_variables(preset: Preset) -> list[VariableInfo]:
  """The float32 variables of a T2T transformer, named as T2T names them.

  Args:
    preset: the model dimensions.

  Returns:
    The variables, `global_step` not included.
  """
  hidden, filt = preset.hidden_size, preset.filter_size
  kernel_limit = math.sqrt(3.0 / hidden)  # T2T's uniform_unit_scaling
  variables = [
      VariableInfo(
          f"transformer/symbol_modality_{preset.vocab_size}_{hidden}/shared/"
          "weights_0", (preset.vocab_size, hidden), 0.0,
          math.sqrt(3.0) * hidden**-0.5)
  ]

  def layer_norm(scope: str) -> None:
    base = f"{scope}/layer_prepostprocess/layer_norm/layer_norm_"
    variables.append(VariableInfo(base + "scale", (hidden,), 1.0, 0.05))
    variables.append(VariableInfo(base + "bias", (hidden,), 0.0, 0.05))

  def attention(scope: str) -> None:
    for part in ("q", "k", "v", "output_transform"):
      variables.append(
          VariableInfo(f"{scope}/multihead_attention/{part}/kernel",
                       (hidden, hidden), 0.0, kernel_limit))
    layer_norm(scope)

  def ffn(scope: str) -> None:
    variables.extend([
        VariableInfo(f"{scope}/conv1/kernel", (hidden, filt), 0.0,
                     kernel_limit),
        VariableInfo(f"{scope}/conv1/bias", (filt,), 0.0, 0.01),
        VariableInfo(f"{scope}/conv2/kernel", (filt, hidden), 0.0,
                     math.sqrt(3.0 / filt)),
        VariableInfo(f"{scope}/conv2/bias", (hidden,), 0.0, 0.01),
    ])
    layer_norm(scope)

  for stack, layers in (("encoder", preset.encoder_layers),
                        ("decoder", preset.decoder_layers)):
    body = f"transformer/body/{stack}"
    for i in range(layers):
      attention(f"{body}/layer_{i}/self_attention")
      if stack == "decoder":
        attention(f"{body}/layer_{i}/encdec_attention")
      ffn(f"{body}/layer_{i}/ffn")
    layer_norm(body)
  return variables


def step_of(index: int) -> int:
  """The global step of the index-th checkpoint of a series."""
  return FIRST_STEP + index * STEP_INTERVAL


def checkpoint_name(index: int) -> str:
  return f"model.ckpt-{step_of(index)}"


def _rows_per_slice(info: VariableInfo) -> int:
  return max(1, GENERATE_CHUNK_ELEMENTS // (info.size // info.shape[0]))


def _variable_slices(info: VariableInfo, number: int, step: int,
                     seed: int) -> Iterator[tuple[int, int, Any]]:
  """The values of one variable at one step, as (begin row, end row, rows).

  One random base per variable (the same at every step) plus a small
  perturbation that differs per step, scaled into `center +- limit`.

  Args:
    info: the variable.
    number: its position in `model_variables`, which seeds its values.
    step: the checkpoint's step.
    seed: the series' seed.

  Yields:
    Fresh float32 arrays of at most GENERATE_CHUNK_ELEMENTS (TF may keep a
    fed buffer, so none is reused).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  base_rng = np.random.default_rng([seed, number])
  noise_rng = np.random.default_rng([seed, number, step])
  rows = _rows_per_slice(info)
  for begin in range(0, info.shape[0], rows):
    end = min(begin + rows, info.shape[0])
    value = np.empty((end - begin,) + info.shape[1:], np.float32)
    noise = np.empty(value.shape, np.float32)
    base_rng.random(out=value, dtype=np.float32)
    noise_rng.random(out=noise, dtype=np.float32)
    noise -= 0.5
    noise *= 1e-3
    value -= 0.5
    value += noise
    value *= 2.0 * info.limit
    value += info.center
    del noise
    yield begin, end, value


# ----------------------------------------------------------------------------
# Generators: run in child processes.


def generate_series(*, directory: str, preset: str, checkpoints: int,
                    seed: int) -> None:
  """Saves a series with a TF1 `Saver` in graph mode, one checkpoint at a time.

  Values are assigned in slices of whole rows (`_variable_slices`), so memory
  holds the TF variables (one model) plus one slice.

  Args:
    directory: receives `model.ckpt-<step>` files and the `checkpoint` state.
    preset: a key of PRESETS.
    checkpoints: how many checkpoints to save.
    seed: seed of the values.
  """
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  tf1 = tf.compat.v1
  tf1.disable_v2_behavior()

  variables = model_variables(PRESETS[preset])
  os.makedirs(directory, exist_ok=True)
  graph = tf.Graph()
  with graph.as_default():
    # Per variable: {begin row: (placeholder, assign op)}.
    slices, sliced_variables = [], []
    for info in variables:
      var = tf1.get_variable(info.name, shape=info.shape, dtype=tf.float32,
                             initializer=tf1.zeros_initializer())
      rows = _rows_per_slice(info)
      ops = {}
      for begin in range(0, info.shape[0], rows):
        end = min(begin + rows, info.shape[0])
        placeholder = tf1.placeholder(tf.float32,
                                      shape=(end - begin,) + info.shape[1:])
        # `.op`: fetching an assignment's output would copy the variable.
        if end - begin == info.shape[0]:
          ops[begin] = (placeholder, tf1.assign(var, placeholder).op)
        else:
          ops[begin] = (placeholder, var[begin:end].assign(placeholder).op)
      if len(ops) > 1:
        sliced_variables.append(var)
      slices.append(ops)
    global_step = tf1.train.get_or_create_global_step()
    step_placeholder = tf1.placeholder(tf.int64, shape=())
    assign_step = tf1.assign(global_step, step_placeholder).op
    # Only slice assignment needs an initialized variable; initializing the
    # others would hold each one twice for a moment.
    init = tf1.variables_initializer(sliced_variables)
    saver = tf1.train.Saver(max_to_keep=checkpoints, sharded=False)
    graph.finalize()
    config = tf1.ConfigProto()
    # Grappler would fold the zeros initializers into graph constants as big
    # as the variables and keep them.
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    with tf1.Session(graph=graph, config=config) as sess:
      sess.run(init)
      for index in range(checkpoints):
        step = step_of(index)
        for number, (info, ops) in enumerate(zip(variables, slices)):
          for begin, _, value in _variable_slices(info, number, step, seed):
            placeholder, assign = ops[begin]
            sess.run(assign, {placeholder: value})
            del value
        sess.run(assign_step, {step_placeholder: step})
        saver.save(sess, os.path.join(directory, "model.ckpt"),
                   global_step=step, write_meta_graph=False)


def small_tensor_name(number: int) -> str:
  return f"layer_{number:05d}/kernel"


def generate_small_tensors(*, directory: str, count: int, checkpoints: int,
                           seed: int) -> None:
  """Saves `checkpoints` checkpoints of `count` 1 KB float32 tensors each.

  Each is written by one `tf.raw_ops.SaveV2` of every tensor plus an int64
  `global_step`. Values: a base per tensor plus a per-step perturbation.

  Args:
    directory: receives `model.ckpt-<step>` files.
    count: tensors per checkpoint, named `layer_00000/kernel` on.
    checkpoints: how many checkpoints.
    seed: seed of the values.
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  os.makedirs(directory, exist_ok=True)
  names = [small_tensor_name(i) for i in range(count)] + ["global_step"]
  base = np.random.default_rng([seed, 1]).random(
      (count, SMALL_TENSOR_ELEMENTS), np.float32) - 0.5
  for index in range(checkpoints):
    step = step_of(index)
    noise = np.random.default_rng([seed, 2, step]).random(
        base.shape, np.float32) - 0.5
    values = base + noise * np.float32(1e-3)
    tensors = [tf.constant(row) for row in values]
    tensors.append(tf.constant(step, tf.int64))
    tf.raw_ops.SaveV2(prefix=os.path.join(directory, checkpoint_name(index)),
                      tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=tensors)
    del tensors, values, noise


def _module_tree(tf: types.ModuleType, variables: Sequence[VariableInfo]
                 ) -> tuple[TFModule, list[TFVariable]]:
  """A `tf.Module` tree whose attribute paths are the variables' T2T names.

  Args:
    tf: the `tensorflow` module (imported by the caller, in a child).
    variables: the variables to make.

  Returns:
    (root module, [tf.Variable per entry of `variables`]), zero-filled.
  """
  root = tf.Module()
  made = []
  for info in variables:
    *scopes, leaf = info.name.split("/")
    node = root
    for scope in scopes:
      child = getattr(node, scope, None)
      if child is None:
        child = tf.Module()
        setattr(node, scope, child)
      if not isinstance(child, tf.Module):
        raise ValueError(f"{info.name}: {scope} is taken by tf.Module")
      node = child
    var = tf.Variable(tf.zeros(info.shape, tf.float32), name=leaf)
    setattr(node, leaf, var)
    made.append(var)
  return root, made


def generate_max_shard(*, directory: str, preset: str, checkpoints: int,
                       seed: int, max_shard_bytes: int) -> None:
  """Saves each step twice with TF2's `tf.train.Checkpoint.write`.

  `<directory>/sliced/` under `MaxShardSizePolicy(max_shard_bytes)` (a tensor
  bigger than that is split into slices over several shards),
  `<directory>/unsliced/` with the default options; the same values in both.

  Args:
    directory: receives `sliced/` and `unsliced/`.
    preset: a key of PRESETS.
    checkpoints: how many steps.
    seed: seed of the values.
    max_shard_bytes: the policy's max_shard_size.
  """
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  variables = model_variables(PRESETS[preset])
  model, tf_variables = _module_tree(tf, variables)
  model.global_step = tf.Variable(0, dtype=tf.int64, name="global_step")
  checkpoint = tf.train.Checkpoint(model=model)
  options = {
      "sliced": tf.train.CheckpointOptions(
          experimental_sharding_callback=(
              tf.train.experimental.MaxShardSizePolicy(
                  max_shard_size=max_shard_bytes))),
      "unsliced": tf.train.CheckpointOptions(),
  }
  for index in range(checkpoints):
    step = step_of(index)
    for number, (info, var) in enumerate(zip(variables, tf_variables)):
      for begin, end, value in _variable_slices(info, number, step, seed):
        if end - begin == info.shape[0]:
          var.assign(value)
        else:
          var[begin:end].assign(value)
        del value
    model.global_step.assign(step)
    for layout in LAYOUTS:
      checkpoint.write(os.path.join(directory, layout, checkpoint_name(index)),
                       options=options[layout])


# ----------------------------------------------------------------------------
# Output checks: run in child processes, print one JSON line.


class _DifferenceBase(TypedDict):
  """The keys of a `Difference` that are always there."""
  name: str
  expected: str  # dtype and shape, e.g. "float32[1000, 64]"
  got: str


class Difference(_DifferenceBase, total=False):
  """One tensor that differs, as printed in JSON; counts if shapes match."""
  elements_differing: int
  max_abs_difference: float


class CompareReport(TypedDict):
  """What `compare_outputs` prints (JSON)."""
  compared: int
  identical: int
  differences: list[Difference]
  skipped: list[str]
  only_in_reference: list[str]
  only_in_candidate: list[str]


class MeanReport(TypedDict):
  """What `check_mean` prints (JSON)."""
  keys: int
  checked: int
  identical: int
  differences: list[Difference]
  missing: list[str]
  extra: list[str]


def _same_bits(a: NDArray[Any], b: NDArray[Any]) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel
  return (a.dtype == b.dtype and a.shape == b.shape and
          np.array_equal(a.reshape(-1).view(np.uint8),
                         b.reshape(-1).view(np.uint8)))


def _difference(name: str, a: NDArray[Any], b: NDArray[Any]) -> Difference:
  import numpy as np  # pylint: disable=import-outside-toplevel
  difference: Difference = {"name": name,
                            "expected": f"{a.dtype}{list(a.shape)}",
                            "got": f"{b.dtype}{list(b.shape)}"}
  if a.shape == b.shape:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    difference["elements_differing"] = int(np.count_nonzero(a64 != b64))
    difference["max_abs_difference"] = float(np.max(np.abs(a64 - b64)))
  return difference


def compare_outputs(*, reference: str, candidate: str) -> None:
  """Prints (JSON) whether two checkpoints hold bit-identical float tensors.

  Reads one variable at a time from each through TF's reader; `global_step`
  is skipped.

  Args:
    reference: prefix of the reference output (legacy's, or the unsliced
      run's).
    candidate: prefix of the output checked against it.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  reference_reader = tf.train.load_checkpoint(reference)
  candidate_reader = tf.train.load_checkpoint(candidate)
  reference_keys = set(reference_reader.get_variable_to_shape_map())
  candidate_keys = set(candidate_reader.get_variable_to_shape_map())
  ignored = {"global_step"}
  report: CompareReport = {
      "compared": 0, "identical": 0, "differences": [], "skipped": [],
      "only_in_reference": sorted(reference_keys - candidate_keys - ignored),
      "only_in_candidate": sorted(candidate_keys - reference_keys - ignored),
  }
  dtypes = reference_reader.get_variable_to_dtype_map()
  for name in sorted((reference_keys & candidate_keys) - ignored):
    if not dtypes[name].is_floating:
      report["skipped"].append(name)
      continue
    a = reference_reader.get_tensor(name)
    b = candidate_reader.get_tensor(name)
    report["compared"] += 1
    if _same_bits(a, b):
      report["identical"] += 1
    else:
      report["differences"].append(_difference(name, a, b))
  print(json.dumps(report))


def _sample(names: Sequence[str], sample: int) -> list[str]:
  """About `sample` names spread evenly over `names`, the first and last in."""
  if len(names) <= sample:
    return list(names)
  stride = (len(names) - 1) / (sample - 1)
  return sorted({names[round(i * stride)] for i in range(sample)})


def check_mean(*, inputs: list[str], output: str, sample: int) -> None:
  """Prints (JSON) whether sampled outputs are the inputs' float64 mean.

  The expected value is numpy's float64 mean over the inputs, cast once to
  the tensor's dtype: an independent computation of the uniform average
  (each float64 sum of a few float32 values is exact, so the order in which
  numpy adds them does not matter). Also checks the output's keys.

  Args:
    inputs: the averaged checkpoints' prefixes.
    output: the output checkpoint's prefix.
    sample: how many float tensors to check (spread over the sorted names).
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  readers = [tf.train.load_checkpoint(p) for p in inputs]
  output_reader = tf.train.load_checkpoint(output)
  dtypes = readers[0].get_variable_to_dtype_map()
  output_keys = set(output_reader.get_variable_to_shape_map())
  floats = sorted(n for n, d in dtypes.items() if d.is_floating)
  report: MeanReport = {
      "keys": len(output_keys), "checked": 0, "identical": 0,
      "differences": [],
      "missing": sorted(set(dtypes) - output_keys)[:10],
      "extra": sorted(output_keys - set(dtypes))[:10]}
  for name in _sample(floats, sample):
    values = np.stack([r.get_tensor(name) for r in readers])
    expected = values.astype(np.float64).mean(axis=0).astype(values.dtype)
    got = output_reader.get_tensor(name)
    report["checked"] += 1
    if _same_bits(expected, got):
      report["identical"] += 1
    else:
      report["differences"].append(_difference(name, expected, got))
  print(json.dumps(report))


# ----------------------------------------------------------------------------
# Series on disk (parent side: no numpy, no TensorFlow).


@dataclasses.dataclass(frozen=True)
class Series:
  """A generated series: checkpoint prefixes (oldest first) and their files."""
  directory: str
  prefixes: list[str]
  files: list[str]

  @property
  def total_bytes(self) -> int:
    return sum(os.path.getsize(f) for f in self.files)

  def subset(self, subdirectory: str) -> Series:
    """The checkpoints under one subdirectory (a max_shard layout)."""
    inside = os.path.join(self.directory, subdirectory) + os.sep
    return Series(inside.rstrip(os.sep),
                  [p for p in self.prefixes if p.startswith(inside)],
                  [f for f in self.files if f.startswith(inside)])


def checkpoint_files(prefix: str) -> list[str]:
  """The `.data-*` files and the `.index` of a checkpoint."""
  return sorted(glob.glob(glob.escape(prefix) + ".data-*")) + [
      prefix + ".index"]


def _load_cached(directory: str, manifest: dict) -> Optional[Series]:
  path = os.path.join(directory, "series.json")
  try:
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return None
  if cached.get("manifest") != manifest:
    return None
  for name, size in cached["files"].items():
    file_path = os.path.join(directory, name)
    if not os.path.isfile(file_path) or os.path.getsize(file_path) != size:
      return None
  return Series(directory,
                [os.path.join(directory, p) for p in cached["prefixes"]],
                [os.path.join(directory, f) for f in cached["files"]])


def _relativize_state_file(directory: str, partial: str) -> None:
  # The Saver wrote absolute paths into the temporary directory; relative
  # paths resolve against the state file's directory wherever the cache is.
  path = os.path.join(directory, "checkpoint")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(f'"{partial}{os.sep}', '"'))


def ensure(directory: str, manifest: dict, prefixes: Sequence[str],
           generate: Callable[[str], ChildRun],
           what: str) -> Series:
  """The cached series in `directory`, generated first if needed.

  Generation writes into a temporary directory that is renamed when complete,
  so an interrupted generation is never taken for a series.

  Args:
    directory: where the series is cached.
    manifest: what the series is; a cache with another manifest is replaced.
    prefixes: its checkpoint prefixes relative to `directory`, oldest first.
    generate: runs the generator (a child) into the directory it is given.
    what: names the series in messages.

  Returns:
    The series.

  Raises:
    RuntimeError: the generated series does not check out.
  """
  series = _load_cached(directory, manifest)
  if series is not None:
    print(f"Using cached series {directory}")
    return series
  print(f"Generating {what} in {directory} ...", flush=True)
  partial = directory + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  shutil.rmtree(directory, ignore_errors=True)
  run = generate(partial)
  files = [os.path.relpath(f, partial) for p in prefixes
           for f in checkpoint_files(os.path.join(partial, p))]
  with open(os.path.join(partial, "series.json"), "w",
            encoding="utf-8") as f:
    json.dump({"manifest": manifest, "prefixes": list(prefixes),
               "files": {name: os.path.getsize(os.path.join(partial, name))
                         for name in files}}, f, indent=1)
  os.rename(partial, directory)
  _relativize_state_file(directory, partial)
  budget = ("" if run.peak_rss_mib <= GENERATE_RSS_BUDGET_MIB else
            f" -- WARNING: above the {GENERATE_RSS_BUDGET_MIB} MiB budget")
  print(f"Generated in {run.wall_s:.1f} s (generator peak RSS "
        f"{run.peak_rss_mib:.0f} MiB{budget})")
  series = _load_cached(directory, manifest)
  if series is None:
    raise RuntimeError(f"generated series in {directory} does not check out")
  return series


def generate_events(*, directory: str, checkpoints: int, tf2: bool) -> None:
  """A `loss` per checkpoint step as an eval job writes it: TF1 `FileWriter`
  `simple_value`s, or TF2 `tf.summary.scalar` tensors."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  losses = {step_of(i): 2.0 + math.sin(i) for i in range(checkpoints)}
  if tf2:
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
      for step, loss in losses.items():
        tf.summary.scalar("loss", loss, step=step)
    writer.close()
    return
  with tf.Graph().as_default():  # FileWriter refuses eager mode.
    writer = tf.compat.v1.summary.FileWriter(directory)
    for step, loss in losses.items():
      summary = tf.compat.v1.Summary(
          value=[tf.compat.v1.Summary.Value(tag="loss", simple_value=loss)])
      writer.add_summary(summary, step)
    writer.close()
