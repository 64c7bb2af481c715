"""Writes testdata/: a tiny T2T-shaped training run, with checkpoints and eval events.

Usage (from the repository root, in its virtualenv):

  python scripts/make_testdata.py                  # rewrites testdata/train/
  python scripts/make_testdata.py --output_dir=/tmp/td

What it writes, all with TensorFlow's own TF1 writers as T2T 1.15 training
does (graph mode `tf.compat.v1.train.Saver`, `tf.compat.v1.summary.FileWriter`):

  train/model.ckpt-{1000..5000}.{index,data-00000-of-00001}
      a one-layer Transformer's variables under T2T's names (hidden size 8,
      vocabulary 64), their Adam slots, `beta1_power`/`beta2_power`,
      `global_step` (int64) and `train_stats/problem_0_steps` (int32).
      No `.meta` graphs: they would be most of the bytes and nothing reads
      them.
  train/checkpoint
      the state file, with paths relative to train/ (the directory can be
      checked out anywhere).
  train/flags.txt, train/flags_t2t.txt, train/hparams.json
      as T2T's `t2t_trainer` writes them.
  train/eval/events.out.tfevents.1700000000.t2t-testdata
      one eval per checkpoint step, as Estimator/T2T write it: an event of
      `simple_value`s (`loss` and `metrics-translate_ende_wmt32k/targets/
      {approx_bleu_score,neg_log_perplexity,accuracy}`), then an event with
      the `checkpoint_path` string tensor.

The last checkpoint (step 5000) is degraded: its parameters took a large
step, and its eval has a higher loss and a lower BLEU than step 4000's.

Everything is deterministic (fixed seeds, fixed event wall times, a fixed
event file name) except the `checkpoint` state file's timestamps and the
event file's first (`file_version`) record's wall time.
"""
import argparse
import json
import os
import shutil
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEED = 20240611
STEPS = (1000, 2000, 3000, 4000, 5000)
HIDDEN = 8
FILTER = 16
VOCAB = 64
PROBLEM = "translate_ende_wmt32k"
METRICS = f"metrics-{PROBLEM}/targets"
EVENT_FILE = "events.out.tfevents.1700000000.t2t-testdata"
WALL_TIME_START = 1700000000.0
SECONDS_PER_STEP = 0.25

# Eval results per checkpoint step: a run that improves, then degrades at the
# last checkpoint. All exactly representable in float32 (simple_value).
EVALS = {
    1000: dict(loss=4.25, approx_bleu_score=0.0625, accuracy=0.3125),
    2000: dict(loss=3.5, approx_bleu_score=0.125, accuracy=0.40625),
    3000: dict(loss=3.125, approx_bleu_score=0.1875, accuracy=0.453125),
    4000: dict(loss=3.0, approx_bleu_score=0.21875, accuracy=0.46875),
    5000: dict(loss=3.75, approx_bleu_score=0.09375, accuracy=0.375),
}
DEGRADED_STEP = STEPS[-1]


def eval_scalars(step: int) -> dict:
  """{tag: value} of the eval at a checkpoint step, as T2T logs it."""
  e = EVALS[step]
  return {
      "loss": e["loss"],
      f"{METRICS}/accuracy": e["accuracy"],
      f"{METRICS}/approx_bleu_score": e["approx_bleu_score"],
      # T2T's neg_log_perplexity is minus the per-token loss.
      f"{METRICS}/neg_log_perplexity": -e["loss"],
  }


def _attention(scope: str) -> dict:
  shapes = {f"{scope}/multihead_attention/{name}/kernel": (HIDDEN, HIDDEN)
            for name in ("q", "k", "v", "output_transform")}
  shapes.update(_layer_norm(scope))
  return shapes


def _layer_norm(scope: str) -> dict:
  prefix = f"{scope}/layer_prepostprocess/layer_norm/layer_norm"
  return {f"{prefix}_scale": (HIDDEN,), f"{prefix}_bias": (HIDDEN,)}


def _ffn(scope: str) -> dict:
  shapes = {f"{scope}/conv1/kernel": (HIDDEN, FILTER),
            f"{scope}/conv1/bias": (FILTER,),
            f"{scope}/conv2/kernel": (FILTER, HIDDEN),
            f"{scope}/conv2/bias": (HIDDEN,)}
  shapes.update(_layer_norm(scope))
  return shapes


def model_shapes() -> dict:
  """{name: shape} of the trainable variables, named as T2T's Transformer."""
  body = "transformer/body"
  shapes = {f"transformer/symbol_modality_{VOCAB}_{HIDDEN}/shared/weights_0":
                (VOCAB, HIDDEN)}
  shapes.update(_attention(f"{body}/encoder/layer_0/self_attention"))
  shapes.update(_ffn(f"{body}/encoder/layer_0/ffn"))
  shapes.update(_layer_norm(f"{body}/encoder"))
  shapes.update(_attention(f"{body}/decoder/layer_0/self_attention"))
  shapes.update(_attention(f"{body}/decoder/layer_0/encdec_attention"))
  shapes.update(_ffn(f"{body}/decoder/layer_0/ffn"))
  shapes.update(_layer_norm(f"{body}/decoder"))
  return shapes


def _initial(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
  if name.endswith("_scale"):
    return np.ones(shape, np.float32)
  if name.endswith("_bias") or name.endswith("/bias"):
    return np.zeros(shape, np.float32)
  fan_in = shape[0] if len(shape) > 1 else 1
  if "symbol_modality" in name:
    fan_in = shape[1]  # T2T: embeddings ~ N(0, hidden_size^-0.5)
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def checkpoint_values() -> dict:
  """{step: {variable name: value}} of every checkpoint, from a fixed seed."""
  rng = np.random.default_rng(SEED)
  shapes = model_shapes()
  params = {name: _initial(name, shape, rng)
            for name, shape in sorted(shapes.items())}
  series = {}
  for step in STEPS:
    # Each interval moves the parameters a little; the last takes a big step.
    scale = 0.25 if step == DEGRADED_STEP else 0.02
    values = {}
    for name in sorted(shapes):
      params[name] = (params[name] + scale * rng.standard_normal(
          shapes[name])).astype(np.float32)
      values[name] = params[name]
      values[name + "/Adam"] = (1e-3 * rng.standard_normal(
          shapes[name])).astype(np.float32)
      values[name + "/Adam_1"] = (1e-6 * np.abs(rng.standard_normal(
          shapes[name]))).astype(np.float32)
    values["beta1_power"] = np.float32(0.9) ** np.float32(step)
    values["beta2_power"] = np.float32(0.997) ** np.float32(step)
    values["train_stats/problem_0_steps"] = np.int32(step)
    series[step] = values
  return series


def _write_checkpoints(train_dir: str) -> None:
  """One TF1 `Saver` checkpoint per step, as T2T (Estimator) training saves."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf1 = tf.compat.v1
  series = checkpoint_values()
  first = series[STEPS[0]]
  with tf.Graph().as_default():
    placeholders, assigns = {}, []
    for name, value in sorted(first.items()):
      var = tf1.get_variable(name, shape=value.shape,
                             dtype=tf.as_dtype(value.dtype),
                             initializer=tf1.zeros_initializer(),
                             trainable=False, use_resource=False)
      placeholders[name] = tf1.placeholder(var.dtype.base_dtype, value.shape)
      assigns.append(var.assign(placeholders[name]))
    global_step = tf1.train.get_or_create_global_step()
    step_placeholder = tf1.placeholder(tf.int64, ())
    assigns.append(global_step.assign(step_placeholder))
    saver = tf1.train.Saver(max_to_keep=len(STEPS), save_relative_paths=True)
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      for step in STEPS:
        feed = {placeholders[n]: v for n, v in series[step].items()}
        feed[step_placeholder] = step
        sess.run(assigns, feed)
        saver.save(sess, os.path.join(train_dir, "model.ckpt"),
                   global_step=step, write_meta_graph=False)


def _write_eval_events(eval_dir: str) -> None:
  """The eval events, as Estimator's evaluate writes them for T2T."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel
  tf1 = tf.compat.v1
  os.makedirs(eval_dir, exist_ok=True)
  # FileWriter names its file after the clock and the host: write into a
  # scratch directory, then move the file under a fixed name.
  scratch = tempfile.mkdtemp(dir=eval_dir)
  with tf.Graph().as_default():
    writer = tf1.summary.FileWriter(scratch)
    for step in STEPS:
      wall_time = WALL_TIME_START + step * SECONDS_PER_STEP
      scalars = tf1.Summary(value=[
          tf1.Summary.Value(tag=tag, simple_value=value)
          for tag, value in eval_scalars(step).items()])
      writer.add_event(event_pb2.Event(step=step, wall_time=wall_time,
                                       summary=scalars))
      # Estimator's _write_checkpoint_path_to_summary: a string tensor. T2T
      # trains with an absolute --output_dir; this one is illustrative.
      path = tf.make_tensor_proto(
          f"/tmp/t2t_train/{PROBLEM}/model.ckpt-{step}", dtype=tf.string)
      writer.add_event(event_pb2.Event(
          step=step, wall_time=wall_time + 0.5,
          summary=tf1.Summary(value=[tf1.Summary.Value(
              tag="checkpoint_path", tensor=path)])))
    writer.close()
  [name] = os.listdir(scratch)
  shutil.move(os.path.join(scratch, name), os.path.join(eval_dir, EVENT_FILE))
  os.rmdir(scratch)


def hparams() -> dict:
  """A subset of transformer_tiny's hparams at this size, as T2T saves them."""
  return {
      "attention_dropout": 0.1, "batch_size": 1024, "daisy_chain_variables":
      True, "filter_size": FILTER, "hidden_size": HIDDEN,
      "initializer": "uniform_unit_scaling", "initializer_gain": 1.0,
      "label_smoothing": 0.1, "layer_postprocess_sequence": "da",
      "layer_preprocess_sequence": "n", "layer_prepostprocess_dropout": 0.1,
      "learning_rate_constant": 2.0, "learning_rate_schedule":
      "constant*linear_warmup*rsqrt_decay*rsqrt_hidden_size",
      "learning_rate_warmup_steps": 8000, "max_length": 256,
      "num_decoder_layers": 1, "num_encoder_layers": 1, "num_heads": 2,
      "num_hidden_layers": 1, "optimizer": "adam",
      "optimizer_adam_beta1": 0.9, "optimizer_adam_beta2": 0.997,
      "optimizer_adam_epsilon": 1e-09, "relu_dropout": 0.1,
      "shared_embedding_and_softmax_weights": True,
      "symbol_modality_num_shards": 1, "vocab_divisor": 1,
  }


T2T_FLAGS = (
    ("t2t_usr_dir", ""), ("random_seed", "None"), ("tpu_num_shards", "8"),
    ("iterations_per_loop", "100"), ("use_tpu", "False"),
    ("schedule", "continuous_train_and_eval"), ("eval_steps", "100"),
    ("keep_checkpoint_max", "20"), ("local_eval_frequency", "1000"),
    ("save_checkpoints_secs", "0"), ("eval_throttle_seconds", "600"),
)


def _write_metadata(train_dir: str) -> None:
  """flags.txt, flags_t2t.txt and hparams.json, as t2t_trainer.save_metadata."""
  t2t_flags = "\n".join(f"--{name}={value}" for name, value in T2T_FLAGS)
  run_flags = "\n".join([
      f"--problem={PROBLEM}", "--model=transformer",
      "--hparams_set=transformer_tiny",
      f"--hparams=hidden_size={HIDDEN},filter_size={FILTER},"
      "num_hidden_layers=1,num_heads=2",
      "--data_dir=/tmp/t2t_data", f"--output_dir=/tmp/t2t_train/{PROBLEM}",
      "--train_steps=5000", "--worker_gpu=1"]) + "\n" + t2t_flags + "\n"
  with open(os.path.join(train_dir, "flags.txt"), "w", encoding="utf-8") as f:
    f.write(run_flags)
  with open(os.path.join(train_dir, "flags_t2t.txt"), "w",
            encoding="utf-8") as f:
    f.write(t2t_flags)
  with open(os.path.join(train_dir, "hparams.json"), "w",
            encoding="utf-8") as f:
    f.write(json.dumps(hparams(), indent=0, sort_keys=True))


def write_testdata(output_dir: str) -> str:
  """Writes `<output_dir>/train/` (replacing it); returns its path."""
  train_dir = os.path.join(output_dir, "train")
  if os.path.isdir(train_dir):
    shutil.rmtree(train_dir)
  os.makedirs(train_dir)
  _write_checkpoints(train_dir)
  _write_eval_events(os.path.join(train_dir, "eval"))
  _write_metadata(train_dir)
  return train_dir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", default=os.path.join(REPO, "testdata"),
                      help="where train/ goes (default: the repo's testdata/)")
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  train_dir = write_testdata(args.output_dir)
  files, total = 0, 0
  for root, _, names in os.walk(train_dir):
    for name in names:
      files += 1
      total += os.path.getsize(os.path.join(root, name))
  print(f"Wrote {files} files, {total / 1024:.1f} KiB in all, to {train_dir}")


if __name__ == "__main__":
  main()
