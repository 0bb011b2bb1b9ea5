"""Dataset tooling: the shard writer, the demo dataset, tfds builders."""
