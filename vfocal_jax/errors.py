"""What a user can fix, as one family of exceptions.

The command line prints a ``UserError`` as one line (``error: <message>``) and
exits with its ``exit_status`` (2 unless said otherwise); any other exception
is a bug in vfocal_jax and keeps its traceback (exit status 1). So raise a
``UserError`` only for what the person running the command can change: a flag,
a config field, a file they gave us, a checkpoint that does not fit the config.
Each message names that thing first (the field, the path) and then what is
wrong and, where it is not obvious, the fix.

A class also inherits ``ValueError`` or ``OSError`` only where that is what it
is (a bad value; a file that cannot be read), so that ``except ValueError`` in
a caller's code keeps meaning what Python means by it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EXIT_USER_ERROR", "UserError", "FlagError", "ConfigError", "BadFileError", "MissingFileError",
           "OutputExistsError", "MismatchError"]

EXIT_USER_ERROR = 2


class UserError(Exception):
  """Something the user gave us is wrong: printed as one line, exit status ``exit_status``."""

  exit_status = EXIT_USER_ERROR


class FlagError(UserError, ValueError):
  """A command-line flag that is missing, or whose value we cannot use: the message names the flag."""


class ConfigError(UserError, ValueError):
  """A config field or flag with a value we cannot run: the message starts with the field's name."""


class BadFileError(UserError, ValueError):
  """A user's file that cannot be used as it is: ``<path>: <field> <what is wrong>``."""

  def __init__(self, path: Any, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path, self.problem = str(path), problem


class MissingFileError(UserError, FileNotFoundError):
  """A path the user named (a flag, a config field, a workdir) that holds no such file."""

  def __init__(self, path: Any, what: str = "no such file"):
    super().__init__(f"{path}: {what}")
    self.path = str(path)

  def __str__(self) -> str:  # OSError's own __str__ would print the args tuple.
    return self.args[0]


class OutputExistsError(UserError, FileExistsError):
  """An output path that already holds something we will not overwrite without being told to."""


class MismatchError(UserError, ValueError):
  """Two things the user gave us that do not fit together (weights and config, card and head, ...)."""
