"""vfocal_jax: the one entry point (the same as the `vfocal` command and `python -m vfocal_jax`).

    python main.py [COMMAND] --workdir=DIR [--config=NAME|FILE.py] [--config.FIELD=VALUE ...]

Commands and flags: `vfocal_jax/cli.py` (or `python main.py --helpfull`).
"""
from vfocal_jax.cli import run

if __name__ == "__main__":
  run()
