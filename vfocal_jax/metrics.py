"""clu metric collections for training, the window of steps between two reports, and the exact eval counts.

(clu's ``Std`` is broken with jax 0.10 — it calls ``jnp.clip(a_min=...)`` — so
none is used here.)
"""

from typing import Any

import flax
import jax
import numpy as np
from clu import metrics
from flax import serialization


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Averaged over the steps between two reports (computed inside the jitted step)."""
  loss: metrics.Average.from_output("loss")
  top1: metrics.Average.from_output("top1")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  non_finite: metrics.Average.from_output("non_finite")


class MetricWindow:
  """The train metrics of the steps since the last report, merged on the device.

  Its sums travel in checkpoints (``state_dict`` / ``load_state_dict``, plain
  JSON), so after a resume the window that was open at the checkpoint goes on
  from the same sums: the reported windows, and their values, are those of an
  uninterrupted run. (float32 sums stored as Python floats come back exact.)
  """

  def __init__(self):
    self.pending: "TrainMetrics | None" = None
    self.num_steps = 0

  def add(self, step_metrics: TrainMetrics) -> None:
    self.pending = step_metrics if self.pending is None else self.pending.merge(step_metrics)
    self.num_steps += 1

  def non_finite(self) -> bool:
    """Whether a step of the window had a non-finite loss or gradient (waits for those steps)."""
    if self.pending is None:
      return False
    return float(np.asarray(jax.device_get(self.pending.non_finite.total))) > 0

  def flush(self) -> "dict[str, float] | None":
    """The window's means (host floats) and a new, empty window; None when empty."""
    if self.pending is None:
      return None
    values = {k: float(np.asarray(jax.device_get(v))) for k, v in self.pending.compute().items()}
    self.pending, self.num_steps = None, 0
    return values

  def state_dict(self) -> dict[str, Any]:
    if self.pending is None:
      return {"num_steps": 0, "sums": None}
    sums = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).tolist(), serialization.to_state_dict(self.pending))
    return {"num_steps": self.num_steps, "sums": sums}

  def load_state_dict(self, state: "dict[str, Any] | None") -> None:
    self.pending, self.num_steps = None, 0
    if not state or state.get("sums") is None:
      return
    template = TrainMetrics.empty()
    dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, serialization.to_state_dict(template))
    sums = jax.tree.map(lambda v, d: np.asarray(v, d), state["sums"], dtypes)
    self.pending = serialization.from_state_dict(template, sums)
    self.num_steps = int(state["num_steps"])


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
