"""Video input pipeline: shards or tfds -> per-host NumPy batches.

TensorFlow lives here and in data/ only; nothing here knows the model or JAX.
"""
from vfocal_jax.input_pipeline.pipeline import (DatasetInfo, EvalIterator, TrainIterator,
                                                create_eval_iterator, create_train_iterator,
                                                eval_views_from_frames, get_dataset_info)
from vfocal_jax.input_pipeline.video_io import VideoDecodeError, decode_video_file

__all__ = [
    "DatasetInfo", "EvalIterator", "TrainIterator", "VideoDecodeError", "create_eval_iterator",
    "create_train_iterator", "decode_video_file", "eval_views_from_frames",
    "get_dataset_info",
]
