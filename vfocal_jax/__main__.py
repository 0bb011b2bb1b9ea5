"""`python -m vfocal_jax COMMAND ...`: the same as `vfocal` and `main.py`."""
from vfocal_jax.cli import run

run()
