"""The input pipeline's entry points, gathered from the modules that hold them (by job):

  sources.py     where records come from: shard files (local or gs://, split per
                 host) or a tfds dataset
  records.py     one record -> a clip or the eval views; bad records skipped and counted
  datasets.py    the tf.data datasets: per-host train batches, padded eval batches
  iterators.py   NumPy iterators (checkpointable for training), label checks,
                 views of decoded frames (predict)

Nothing here knows the model or JAX.
"""
from vfocal_jax.input_pipeline.datasets import (DatasetInfo, build_eval_dataset, build_train_dataset,
                                                get_dataset_info)
from vfocal_jax.input_pipeline.iterators import (EvalIterator, LabelOutOfRangeError, TrainIterator,
                                                 check_labels, create_eval_iterator, create_train_iterator,
                                                 eval_views_from_frames)

__all__ = [
    "DatasetInfo", "EvalIterator", "LabelOutOfRangeError", "TrainIterator", "build_eval_dataset",
    "build_train_dataset", "check_labels", "create_eval_iterator", "create_train_iterator",
    "eval_views_from_frames", "get_dataset_info",
]
