"""Every checkpoint TensorFlow writes: averaged right, restorable, streamed, reproducible.

Each case is built with TF's own savers (TF1 `Saver`, `tf.train.Checkpoint`,
`tf.raw_ops.SaveV2`), averaged, and then restored the way its writer would
(`Saver.restore`, `Checkpoint.read(...).assert_consumed()`, `RestoreV2`).
Expectations come from the inputs as TF itself restores them: every float
tensor is the float64 mean cast once, every other tensor the newest input's.
"""
import hashlib
import json
import logging as std_logging
import os

import hypothesis
from hypothesis import strategies as st
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from conftest import (call_cli, error_line, float64_mean, read_checkpoint,
                      run_cli, run_legacy, write_tf1_series)
from t2t_avg import average_checkpoints
from t2t_avg.errors import AveragingError

tf1 = tf.compat.v1
STEPS = (1, 2, 3)


def _bytes(value):
  """What a tensor holds, comparable (strings by value, not by pointer)."""
  value = np.asarray(value)
  return value.tolist() if value.dtype == object else value.tobytes()


# --- quantized, complex, float8 and other dtypes -----------------------------

_RAW_DTYPES = {
    "q8": tf.qint8, "qu8": tf.quint8, "q16": tf.qint16, "qu16": tf.quint16,
    "q32": tf.qint32, "c64": tf.complex64, "c128": tf.complex128,
    "f8": tf.as_dtype("float8_e4m3fn"), "f8b": tf.as_dtype("float8_e5m2"),
    "i4": tf.as_dtype("int4"), "u64": tf.uint64, "b": tf.bool,
    "s": tf.string, "f16": tf.float16,
}


def _raw_value(dtype, step):
  if dtype == tf.string:
    return tf.constant([f"{step}-{i}".encode() * (i + step) for i in range(5)])
  if dtype == tf.bool:
    return tf.constant([step % 2 == 0, True, False, step > 1, False])
  if dtype.is_complex:
    return tf.constant(np.arange(5) * step + 0.25j * step, dtype=dtype)
  if dtype.is_quantized:
    plain = {"qint8": tf.int8, "quint8": tf.uint8, "qint16": tf.int16,
             "quint16": tf.uint16, "qint32": tf.int32}[dtype.name]
    return tf.bitcast(tf.constant(np.arange(5) + 10 * step, plain.as_numpy_dtype
                                  ), dtype)
  values = np.array([0.5, 1.25, -2, 3, step], np.float32) if (
      dtype.is_floating) else np.arange(5) + step
  return tf.constant(values.astype(dtype.as_numpy_dtype))


@pytest.fixture(scope="module")
def raw_series(tmp_path_factory):
  directory = tmp_path_factory.mktemp("raw_dtypes")
  prefixes = []
  names = sorted(_RAW_DTYPES)
  for step in STEPS:
    prefix = str(directory / f"model.ckpt-{step}")
    tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=names + ["global_step"],
        shape_and_slices=[""] * (len(names) + 1),
        tensors=[_raw_value(_RAW_DTYPES[n], step) for n in names] +
        [tf.constant(step, tf.int64)])
    prefixes.append(prefix)
  return prefixes


def _restore(prefix, names, dtypes):
  return {n: t for n, t in zip(names, tf.raw_ops.RestoreV2(
      prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
      dtypes=dtypes))}


def test_every_dtype_keeps_its_dtype_and_restores(raw_series, tmp_path):
  result = average_checkpoints(raw_series, str(tmp_path / "avg"))
  names = sorted(_RAW_DTYPES)
  dtypes = [_RAW_DTYPES[n] for n in names]
  reader = tf.train.load_checkpoint(result.output_path)
  assert {n: reader.get_variable_to_dtype_map()[n] for n in names} == (
      dict(zip(names, dtypes)))
  # RestoreV2 checks each stored dtype against the one asked for.
  ours = _restore(result.output_path, names, dtypes)
  inputs = [_restore(p, names, dtypes) for p in raw_series]
  for name, dtype in zip(names, dtypes):
    if dtype.is_floating or dtype.is_complex:
      values = [np.asarray(i[name].numpy()) for i in inputs]
      expected = float64_mean(values, dtype.as_numpy_dtype)
    else:  # Copied from the newest, bytes as stored.
      expected = inputs[-1][name].numpy()
    got = ours[name].numpy()
    assert got.dtype == expected.dtype, name
    assert _bytes(got) == _bytes(expected), name
  assert result.record["copied_variables"] == 9  # q*, i4, u64, b, s


def test_quantized_tensors_differing_in_shape_are_copied_from_the_newest(
    tmp_path):
  prefixes = []
  for step in STEPS:
    prefix = str(tmp_path / f"model.ckpt-{step}")
    tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=["q", "w"], shape_and_slices=["", ""],
        tensors=[tf.bitcast(tf.constant(np.arange(step + 1), tf.int8),
                            tf.qint8),
                 tf.constant(np.full(3, step, np.float32))])
    prefixes.append(prefix)
  result = average_checkpoints(prefixes, str(tmp_path / "out/avg"))
  got = _restore(result.output_path, ["q", "w"], [tf.qint8, tf.float32])
  assert got["q"].shape == (4,)
  np.testing.assert_array_equal(got["w"].numpy(), np.full(3, 2, np.float32))


# --- partitioned (sliced) variables ------------------------------------------

_SLICED_DTYPES = {"f32": tf.float32, "f16": tf.float16, "bf16": tf.bfloat16,
                  "f64": tf.float64, "u16": tf.uint16, "u32": tf.uint32,
                  "u64": tf.uint64, "i64": tf.int64, "s": tf.string}


def _partitioned_graph():
  """A TF1 graph of (7, 4) variables of every dtype, in 3 row partitions."""
  graph = tf.Graph()
  with graph.as_default():
    variables, placeholders, assigns = {}, {}, []
    for name, dtype in _SLICED_DTYPES.items():
      init = (tf1.constant_initializer("") if dtype == tf.string
              else tf1.zeros_initializer())
      var = tf1.get_variable(name, shape=(7, 4), dtype=dtype, initializer=init,
                             partitioner=tf1.fixed_size_partitioner(3))
      ph = tf1.placeholder(dtype, (7, 4))
      start = 0
      for part in var:
        rows = part.shape[0]
        assigns.append(part.assign(ph[start:start + rows]))
        start += rows
      variables[name], placeholders[name] = var, ph
    tf1.train.get_or_create_global_step()
    saver = tf1.train.Saver(max_to_keep=10)
    whole = {n: tf.concat(list(v), 0) for n, v in variables.items()}
  return graph, placeholders, assigns, saver, whole


def _values_for(step, rng):
  values = {}
  for name, dtype in _SLICED_DTYPES.items():
    if dtype == tf.string:
      values[name] = np.array([[f"{step}:{i},{j}".encode() for j in range(4)]
                               for i in range(7)], object)
    elif dtype.is_floating:
      values[name] = rng.standard_normal((7, 4)).astype(dtype.as_numpy_dtype)
    else:
      values[name] = rng.integers(0, 60000, (7, 4)).astype(
          dtype.as_numpy_dtype)
  return values


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
  directory = tmp_path_factory.mktemp("partitioned")
  graph, placeholders, assigns, saver, _ = _partitioned_graph()
  rng = np.random.default_rng(11)
  prefixes = []
  with graph.as_default(), tf1.Session() as sess:
    sess.run(tf1.global_variables_initializer())
    for step in STEPS:
      feed = {placeholders[n]: v for n, v in _values_for(step, rng).items()}
      sess.run(assigns, feed)
      prefixes.append(saver.save(sess, str(directory / "model.ckpt"),
                                 global_step=step))
  return prefixes


def _restored(prefix):
  """Every variable of the partitioned graph as `Saver.restore` gives it."""
  graph, _, _, saver, whole = _partitioned_graph()
  with graph.as_default(), tf1.Session() as sess:
    saver.restore(sess, prefix)
    return sess.run(whole)


def test_sliced_variables_of_every_dtype_restore_into_the_partitioned_graph(
    partitioned, tmp_path):
  # TF's whole-tensor reader refuses these slices ("Dtype half not
  # supported"): the engine reads them slice by slice instead.
  with pytest.raises(Exception, match="not supported"):
    tf.train.load_checkpoint(partitioned[0]).get_tensor("f16")
  result = call_cli(f"--checkpoints={','.join(partitioned)}",
                    f"--output_path={tmp_path}/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  ours = _restored(f"{tmp_path}/avg-0")
  inputs = [_restored(p) for p in partitioned]
  for name, dtype in _SLICED_DTYPES.items():
    if dtype.is_floating:
      expected = float64_mean([i[name] for i in inputs], dtype.as_numpy_dtype)
    else:
      expected = inputs[-1][name]
    assert ours[name].dtype == expected.dtype, name
    assert _bytes(ours[name]) == _bytes(expected), name


class _Model(tf.Module):
  """A large variable that MaxShardSizePolicy slices, and small ones."""

  def __init__(self, step):
    super().__init__()
    rng = np.random.default_rng(step)
    self.big = tf.Variable(rng.standard_normal((300, 200)).astype(np.float32))
    self.bias = tf.Variable(np.full(7, step, np.float64))
    self.table = tf.Variable(np.arange(5, dtype=np.int64) * step)
    self.sharded = tf.__internal__.distribute.ShardedVariable(
        [tf.Variable(rng.standard_normal((3, 4)).astype(np.float32))
         for _ in range(3)])


def _sharded_write(model, prefix, max_shard_size):
  options = tf.train.CheckpointOptions(
      experimental_sharding_callback=(
          tf.train.experimental.MaxShardSizePolicy(
              max_shard_size=max_shard_size)))
  return tf.train.Checkpoint(model=model).write(prefix, options=options)


def test_max_shard_size_policy_and_sharded_variables_restore(tmp_path):
  models = [_Model(step) for step in STEPS]
  prefixes = [_sharded_write(m, str(tmp_path / f"train/ckpt-{s}"), 60_000)
              for m, s in zip(models, STEPS)]
  shards = [n for n in os.listdir(tmp_path / "train") if "ckpt-1.data" in n]
  assert len(shards) > 3  # The big variable is split over several shards.
  try:
    tf.train.Checkpoint(model=_Model(99)).read(prefixes[0]).assert_consumed()
  except tf.errors.InvalidArgumentError as e:  # TF 2.16: "shape ... [3,4]"
    pytest.skip(f"TF {tf.__version__} cannot restore its own input: {e}")
  result = average_checkpoints(prefixes, str(tmp_path / "out/avg"))

  restored = _Model(99)
  tf.train.Checkpoint(model=restored).read(
      result.output_path).assert_consumed()
  for attribute in ("big", "bias"):
    expected = float64_mean([getattr(m, attribute).numpy() for m in models],
                            getattr(models[0], attribute).dtype.as_numpy_dtype)
    assert getattr(restored, attribute).numpy().tobytes() == (
        expected.tobytes()), attribute
  np.testing.assert_array_equal(restored.table.numpy(), models[-1].table)
  got = np.concatenate([v.numpy() for v in restored.sharded.variables])
  expected = float64_mean([np.concatenate([v.numpy() for v in m.sharded.variables])
                           for m in models], np.float32)
  assert got.tobytes() == expected.tobytes()


# --- state that is not weights -----------------------------------------------

def _stateful(step):
  """A float variable, a tf.data iterator and two hash tables, at `step`."""
  dataset = tf.data.Dataset.range(100).shuffle(10, seed=1).batch(3)
  iterator = iter(dataset)
  for _ in range(step):
    next(iterator)
  dense = tf.lookup.experimental.DenseHashTable(
      key_dtype=tf.int64, value_dtype=tf.float32, default_value=-1.0,
      empty_key=-1, deleted_key=-2, initial_num_buckets=8)
  mutable = tf.lookup.experimental.MutableHashTable(
      key_dtype=tf.string, value_dtype=tf.int64, default_value=-1)
  keys = tf.range(3 * step + 2, dtype=tf.int64)  # Shapes grow with step.
  dense.insert(keys, tf.cast(keys, tf.float32) * step)
  mutable.insert(tf.strings.as_string(keys), keys * step)
  weight = tf.Variable(np.full(4, step, np.float32))
  return dict(iterator=iterator, dense=dense, mutable=mutable, weight=weight)


def test_iterators_and_hash_tables_are_copied_from_the_newest(tmp_path,
                                                              caplog):
  states = [_stateful(step) for step in STEPS]
  prefixes = [tf.train.Checkpoint(**state).write(str(tmp_path / f"c-{s}"))
              for state, s in zip(states, STEPS)]
  with caplog.at_level(std_logging.INFO):
    result = average_checkpoints(prefixes, str(tmp_path / "out/avg"))
  copied = [r.getMessage() for r in caplog.records if "Copying" in
            r.getMessage()]
  assert copied and "ITERATOR_STATE" in copied[0] and "variant" in copied[0]
  assert "table-keys" in copied[0] and "not weights" in copied[0]

  target = _stateful(1)
  tf.train.Checkpoint(**target).read(result.output_path).assert_consumed()
  np.testing.assert_array_equal(target["weight"].numpy(),
                                np.full(4, 2, np.float32))
  # The iterator continues where the newest input's left off.
  assert next(target["iterator"]).numpy().tolist() == next(
      states[-1]["iterator"]).numpy().tolist()
  probe = tf.range(12, dtype=tf.int64)
  np.testing.assert_array_equal(target["dense"].lookup(probe).numpy(),
                                states[-1]["dense"].lookup(probe).numpy())
  np.testing.assert_array_equal(
      target["mutable"].lookup(tf.strings.as_string(probe)).numpy(),
      states[-1]["mutable"].lookup(tf.strings.as_string(probe)).numpy())


# --- exclusion before validation ---------------------------------------------

def test_excluded_variables_may_be_missing_or_differ(tmp_path):
  def make(step):
    values = {"body/w": np.full(3, step, np.float32),
              "extra/a": np.full(step, step, np.float32),  # shape differs
              "extra/b": np.full(2, step, np.float32 if step < 3 else
                                 np.float64)}  # dtype differs
    if step == 2:
      values["extra/only_here"] = np.zeros(1, np.float32)
    return values
  prefixes = []
  for step in STEPS:
    prefixes += write_tf1_series(str(tmp_path / f"t{step}"), [step],
                                 make)
  refused = call_cli(f"--checkpoints={','.join(prefixes)}",
                     f"--output_path={tmp_path}/bad/avg")
  assert "extra/" in error_line(refused)
  result = call_cli(f"--checkpoints={','.join(prefixes)}",
                    "--exclude_variables=^extra/",
                    f"--output_path={tmp_path}/out/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  out = read_checkpoint(f"{tmp_path}/out/avg-0")
  assert sorted(out) == ["body/w", "global_step"]
  np.testing.assert_array_equal(out["body/w"], np.full(3, 2, np.float32))


def test_excluding_every_variable_is_one_clear_line(tmp_path):
  prefixes = write_tf1_series(str(tmp_path / "t"), [1, 2],
                              lambda s: {"w": np.full(2, s, np.float32)})
  line = error_line(call_cli(f"--checkpoints={','.join(prefixes)}",
                             "--exclude_variables=.",
                             f"--output_path={tmp_path}/out/avg"))
  assert line == (f"t2t_avg: error: --exclude_variables='.' matches every "
                  f"variable of {prefixes[-1]}: nothing would be written")
  assert not os.path.exists(tmp_path / "out")


# --- steps -------------------------------------------------------------------

def test_keras_mixed_float16_step_is_the_inner_optimizers_count(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 3))
    prefixes = []
    for epoch in STEPS:
      model.fit(x, y, batch_size=4, epochs=1, verbose=0)
      checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
      prefixes.append(checkpoint.write(str(tmp_path / f"ckpt-{epoch}")))
  finally:
    keras.mixed_precision.set_global_policy("float32")
  reader = tf.train.load_checkpoint(prefixes[-1])
  assert reader.get_tensor(
      "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 0
  counter = "optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
  # The steps the inner optimizer applied: 3 batches an epoch, less any the
  # dynamic loss scale skipped (an overflow at its first, large scale).
  applied = [int(tf.train.load_checkpoint(p).get_tensor(counter))
             for p in prefixes[::-1]]
  assert applied[0] > applied[1] > applied[2] > 0
  result = average_checkpoints(prefixes[::-1], str(tmp_path / "out/avg"),
                               output_step="last")
  assert [r.step for r in result.rows] == applied
  assert {r.step_source for r in result.rows} == {counter}
  assert result.output_path.endswith(f"avg-{applied[0]}")
  # Non-float tensors come from the newest, listed first here.
  assert read_checkpoint(result.output_path)[counter] == applied[0]


def test_inputs_sharing_a_step_are_named_in_a_warning(tmp_path, caplog):
  prefixes = []
  for i, value in enumerate((1, 2, 3)):
    prefix = str(tmp_path / f"run{i}/ckpt")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["global_step", "w", "n"],
                      shape_and_slices=["", "", ""],
                      tensors=[tf.constant(5 if i else 4, tf.int64),
                               tf.constant([value] * 2, tf.float32),
                               tf.constant(value, tf.int32)])
    prefixes.append(prefix)
  with caplog.at_level(std_logging.WARNING):
    result = average_checkpoints(prefixes, str(tmp_path / "out/avg"))
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == std_logging.WARNING]
  assert any(f"{prefixes[1]}, {prefixes[2]} share step 5; taking the last "
             f"listed, {prefixes[2]}, as newest" in w for w in warnings)
  assert read_checkpoint(result.output_path)["n"] == 3


# --- V1 checkpoints ----------------------------------------------------------

def test_v1_checkpoints_average_like_legacy_into_v2(tmp_path):
  os.makedirs(tmp_path / "v1")
  graph = tf.Graph()
  with graph.as_default():
    w = tf1.get_variable("body/w", shape=(5, 3), dtype=tf.float32)
    h = tf1.get_variable("body/h", shape=(4,), dtype=tf.float64)
    tf1.train.get_or_create_global_step()
    saver = tf1.train.Saver(write_version=tf1.train.SaverDef.V1,
                            max_to_keep=5)
    rng = np.random.default_rng(3)
    prefixes = []
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      for step in STEPS:
        sess.run([w.assign(rng.standard_normal((5, 3)).astype(np.float32)),
                  h.assign(rng.standard_normal(4))])
        prefixes.append(saver.save(sess, str(tmp_path / "v1/model.ckpt"),
                                   global_step=step))
  assert not os.path.exists(prefixes[0] + ".index")
  run_legacy("avg_checkpoints", f"--checkpoints={','.join(prefixes)}",
             f"--output_path={tmp_path}/legacy/avg")
  result = call_cli("--prefix=" + str(tmp_path / "v1") + "/",
                    "--num_last_checkpoints=3",
                    f"--output_path={tmp_path}/ours/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.exists(f"{tmp_path}/ours/avg-0.index")  # V2
  ours = read_checkpoint(f"{tmp_path}/ours/avg-0")
  legacy = read_checkpoint(f"{tmp_path}/legacy/avg-0")
  assert ours["body/w"].tobytes() == legacy["body/w"].tobytes()
  assert ours["body/h"].tobytes() == legacy["body/h"].tobytes()
  assert ours["body/h"].dtype == np.float64


# --- output names, .meta, steps that do not fit ------------------------------

@pytest.mark.parametrize("name", ["avg[1]", "a*b", "what?", "sub[dir]/avg"])
def test_output_path_tf_cannot_read_back_is_refused_before_any_work(
    tmp_path, name):
  result = call_cli("--checkpoints=never_read", f"--output_path={tmp_path}/"
                    f"{name}")
  line = error_line(result)
  assert line.startswith(f"t2t_avg: error: --output_path '{tmp_path}/{name}'"
                         " contains"), line
  assert "could not read it back" in line
  assert os.listdir(tmp_path) == []


def test_write_meta_with_keys_that_collide_as_op_names(tmp_path):
  names = ["a b", "a_b", "x:0", "x_0", "A_b", "_lead"]
  prefixes = []
  for step in STEPS:
    prefix = str(tmp_path / f"t/model.ckpt-{step}")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant([float(step + i)] * 2)
                               for i in range(len(names))])
    prefixes.append(prefix)
  result = call_cli(f"--checkpoints={','.join(prefixes)}", "--write_meta",
                    f"--output_path={tmp_path}/out/avg")
  assert result.returncode == 0, result.stderr[-2000:]
  with tf.Graph().as_default(), tf1.Session() as sess:
    saver = tf1.train.import_meta_graph(f"{tmp_path}/out/avg-0.meta")
    saver.restore(sess, f"{tmp_path}/out/avg-0")
    values = {v.op.name: sess.run(v) for v in tf1.global_variables()}
  assert len(values) == len(names) + 1  # and global_step
  assert sorted(float(v[0]) for k, v in values.items()
                if k != "global_step") == [2.0 + i for i in range(6)]


def test_output_step_that_does_not_fit_global_step_is_refused(tmp_path):
  prefixes = []
  for step in STEPS:
    prefix = str(tmp_path / f"t/model.ckpt-{step}")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["global_step", "w"],
                      shape_and_slices=["", ""],
                      tensors=[tf.constant(step, tf.int32),
                               tf.constant([1.0])])
    prefixes.append(prefix)
  line = error_line(call_cli(f"--checkpoints={','.join(prefixes)}",
                             "--output_step=3000000000",
                             f"--output_path={tmp_path}/out/avg"))
  assert line == ("t2t_avg: error: --output_step=3000000000 does not fit the "
                  "global_step tensor's dtype int32 (at most 2147483647)")
  assert not os.path.exists(tmp_path / "out")


# --- reproducible output -----------------------------------------------------

def _digests(prefix):
  digests = {}
  directory = os.path.dirname(prefix)
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.endswith(".t2t_avg.json"):
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
      del record["created"]
      data = json.dumps(record, sort_keys=True).encode()
    else:
      with open(path, "rb") as f:
        data = f.read()
    digests[name] = hashlib.sha256(data).hexdigest()
  return digests


def test_the_same_inputs_give_byte_identical_outputs(partitioned, tmp_path):
  runs = []
  for _ in range(5):
    result = run_cli(f"--checkpoints={','.join(partitioned)}",
                     f"--output_path={tmp_path}/out/avg")
    assert result.returncode == 0, result.stderr[-2000:]
    runs.append(_digests(f"{tmp_path}/out/avg-0"))
  assert all(run == runs[0] for run in runs), runs
  assert "avg-0.data-00000-of-00001" in runs[0]


# --- property: random dtypes, shapes, slicing and shard sizes -----------------

_PROPERTY_DTYPES = [np.float32, np.float64, ml_dtypes.bfloat16, np.int32,
                    np.int64]


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True,
                     suppress_health_check=[
                         hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(
    specs=st.lists(st.tuples(st.sampled_from(_PROPERTY_DTYPES),
                             st.lists(st.integers(1, 24), min_size=0,
                                      max_size=3)),
                   min_size=1, max_size=5),
    shard_size=st.integers(512, 8000), count=st.integers(1, 3),
    seed=st.integers(0, 1000))
def test_random_checkpoints_average_as_tf_reads_them(tmp_path, specs,
                                                     shard_size, count, seed):
  rng = np.random.default_rng(seed)
  directory = tmp_path / f"p{seed}-{shard_size}-{count}-{len(specs)}"
  prefixes, inputs = [], []
  for i in range(count):
    module = tf.Module()
    values = {}
    for j, (dtype, shape) in enumerate(specs):
      value = (rng.standard_normal(shape) * 100).astype(dtype)
      values[f"v{j}"] = value
      setattr(module, f"v{j}", tf.Variable(value))
    prefixes.append(_sharded_write(module, str(directory / f"ckpt-{i}"),
                                   shard_size))
    inputs.append(values)
  result = average_checkpoints(prefixes, str(directory / "out/avg"))
  reader = tf.train.load_checkpoint(result.output_path)
  for j, (dtype, _) in enumerate(specs):
    key = f"model/v{j}/.ATTRIBUTES/VARIABLE_VALUE"
    got = reader.get_tensor(key)
    values = [x[f"v{j}"] for x in inputs]
    if np.dtype(dtype).kind == "f" or dtype is ml_dtypes.bfloat16:
      expected = float64_mean(values, dtype)
    else:
      expected = values[-1]
    assert got.dtype == np.dtype(dtype)
    assert got.tobytes() == expected.tobytes(), key


def test_a_corrupted_slice_is_named(partitioned, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from t2t_avg import formats  # pylint: disable=import-outside-toplevel
  copy = tmp_path / "copy"
  shutil.copytree(os.path.dirname(partitioned[0]), copy)
  prefix = str(copy / os.path.basename(partitioned[1]))
  part = formats.open_source(prefix).tensors()["f16"].parts[1]
  with open(part.file, "r+b") as f:
    f.seek(part.offset)
    f.write(b"\x00\x7c")  # float16 inf
  with pytest.raises(AveragingError, match=f"{prefix} is corrupted: variable "
                     "f16 fails its checksum"):
    average_checkpoints([str(copy / os.path.basename(p)) for p in partitioned],
                        str(tmp_path / "out/avg"))
