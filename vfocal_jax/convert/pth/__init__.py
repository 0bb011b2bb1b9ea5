"""The torch-free `.pth` reader behind `vfocal_jax.convert.torch_pickle`, one module per job.

Import from `torch_pickle` (the public API); these modules are its parts:

errors          the `CheckpointLoadError` family
values          what the machine builds: placeholders, allow-listed values, `describe`
checks          keys and numbers from the file, checked before use
rebuild_data    allow-listed containers, builtins and NumPy values
rebuild_tensors allow-listed torch tensor rebuilds
allow_list      what each global resolves to
state           the limits, counters and storages of one load
source          reading bytes (files, the pickle stream)
opcodes         the pickle opcodes
machine         the pickle machine: the checked operations the opcodes use
graph           after the pickle: depth, cycles, storages, arrays in place
zip_format      the zip format (torch >= 1.6)
legacy          the legacy format
state_dict      from the unpickled object to `{key: array}`

docs/pth_loader.md describes what is accepted and refused, the limits and why
the reader is its own pickle machine rather than a `pickle.Unpickler`.
"""
