"""What a metric's name says: whether lower or higher is better."""
import pytest

from t2t_avg.metrics import points
from t2t_avg.errors import ArgumentError

T2T = "metrics-translate_ende_wmt32k/targets"


@pytest.mark.parametrize("tag, direction", [
    # T2T (GPU/CPU, then TPU without `targets/`)
    (f"{T2T}/approx_bleu_score", "max"),
    (f"{T2T}/neg_log_perplexity", "max"),
    (f"{T2T}/accuracy", "max"),
    (f"{T2T}/accuracy_per_sequence", "max"),
    (f"{T2T}/accuracy_top5", "max"),
    (f"{T2T}/rouge_2_fscore", "max"),
    (f"{T2T}/rouge_L_fscore", "max"),
    (f"{T2T}/edit_distance", "min"),
    ("metrics-translate_ende_wmt32k/approx_bleu_score", "max"),
    ("metrics-translate_ende_wmt32k/neg_log_perplexity", "max"),
    # t2t-bleu
    ("BLEU_cased", "max"),
    ("BLEU_uncased", "max"),
    # Estimator
    ("loss", "min"),
    ("eval/loss", "min"),
    # Keras
    ("epoch_loss", "min"),
    ("epoch_accuracy", "max"),
    ("val_loss", "min"),
    ("val_acc", "max"),
    ("evaluation_loss_vs_iterations", "min"),
    ("evaluation_accuracy_vs_iterations", "max"),
    # OpenNMT-tf
    ("eval/loss", "min"),
    ("eval/perplexity", "min"),
    ("eval/bleu", "max"),
    # others
    ("rougeL", "max"),
    ("sacrebleu", "max"),
    ("chrF++", "max"),
    ("val_f1", "max"),
    ("top-1-acc1", "max"),
    ("val_r_squared", "max"),
    ("log_likelihood", "max"),
    ("precision", "max"),
    ("recall", "max"),
    ("wer", "min"),
    ("dev/TER", "min"),
    ("cer", "min"),
    ("ppl", "min"),
    ("val_rmse", "min"),
    ("mse", "min"),
    ("mae", "min"),
    ("mean_squared_error", "min"),
    ("eval/accuracy/loss", "min"),  # only the last component counts
])
def test_infer_direction(tag, direction):
  assert points.infer_direction(tag) == direction


@pytest.mark.parametrize("tag", [
    "lr", "learning_rate", "global_step", "steps_per_sec", "accumulated",
    "terms", "certainty", "loss/lr"])
def test_infer_direction_unknown_asks_for_metric_mode(tag):
  with pytest.raises(ArgumentError, match=r"metric_mode=min\|max") as error:
    points.infer_direction(tag)
  assert repr(tag) in str(error.value)
  assert "--metric_mode=min|max" in error.value.message(as_flags=True)
