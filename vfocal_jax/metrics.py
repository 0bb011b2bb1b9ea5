"""clu metric collections for training, and the host-side exact evaluation counts.

(clu's ``Std`` is broken with jax 0.10 — it calls ``jnp.clip(a_min=...)`` — so
none is used here.)
"""


from typing import Any

import flax
import numpy as np
from clu import metrics


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Averaged over the steps between two reports (computed inside the jitted step)."""
  loss: metrics.Average.from_output("loss")
  top1: metrics.Average.from_output("top1")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  non_finite: metrics.Average.from_output("non_finite")


class EvalCounts:
  """Exact integer counts over a whole split (host side, summed batch by batch)."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.count = 0
    self.correct1 = 0
    self.correct5 = 0
    self.class_count = np.zeros(num_classes, np.int64)
    self.class_correct = np.zeros(num_classes, np.int64)
    self.confusion = np.zeros((num_classes, num_classes), np.int64)

  def add(self, out: dict[str, Any]) -> None:
    self.count += int(out["count"])
    self.correct1 += int(out["correct1"])
    self.correct5 += int(out["correct5"])
    self.class_count += np.asarray(out["class_count"], np.int64)
    self.class_correct += np.asarray(out["class_correct"], np.int64)
    if "confusion" in out:
      self.confusion += np.asarray(out["confusion"], np.int64)

  def result(self, class_names: list[str] | None = None) -> dict[str, Any]:
    """top-1/top-5 in percent over the videos counted, the per-class top-1 and the confusion counts."""
    n = max(self.count, 1)
    names = class_names if class_names and len(class_names) == self.num_classes else [
        str(i) for i in range(self.num_classes)]
    per_class = {names[i]: (100.0 * self.class_correct[i] / self.class_count[i])
                 for i in range(self.num_classes) if self.class_count[i] > 0}
    return {
        "top1": 100.0 * self.correct1 / n,
        "top5": 100.0 * self.correct5 / n,
        "num_videos": int(self.count),
        "num_correct_top1": int(self.correct1),
        "num_correct_top5": int(self.correct5),
        "per_class_top1": per_class,
        "mean_class_top1": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "class_names": names,
        "confusion": self.confusion.tolist(),  # [true][predicted], top-1.
    }
