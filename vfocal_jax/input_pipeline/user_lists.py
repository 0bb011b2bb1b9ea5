"""Lists a user hands ``predict`` / ``visualize``: ``--video=list.csv`` and ``--labels=FILE``, read and checked.

Read like every file the pipeline reads (``tf.io.gfile``: local or ``gs://``);
a damaged list is one ``BadFileError`` naming the file and the line
(docs/data.md, "Files handed to predict / visualize").
"""
from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from vfocal_jax import errors, file_checks
from vfocal_jax.input_pipeline.sources import expand, is_url, parent

__all__ = ["read_user_text", "read_video_list", "read_class_names", "VIDEO_LIST_HEADERS", "MAX_CLASSES"]


def read_user_text(path: str) -> str:
  """A text file the user named, whole.

  Missing -> ``MissingFileError``; binary, non-UTF-8 or over 64 MiB -> ``BadFileError`` naming it.

  A leading UTF-8 byte order mark (spreadsheets write one) is dropped.
  """
  if not tf.io.gfile.exists(path):
    raise errors.MissingFileError(path)
  if tf.io.gfile.isdir(path):
    raise errors.MissingFileError(path, "a directory, expected a file")
  with tf.io.gfile.GFile(path, "rb") as f:
    text = file_checks.decode_text(f.read(file_checks.MAX_TEXT_BYTES + 1), path)
  return text[1:] if text.startswith("\ufeff") else text


def _is_number(cell: str) -> bool:
  try:
    float(cell)
  except ValueError:
    return False
  return True


VIDEO_LIST_HEADERS = ("path", "video", "filename", "file", "video_path")


def read_video_list(path: str) -> list[str]:
  """The video paths of a list file (``--video=list.csv``): checked, one path per row.

  The path is the first column, or the column whose header (first row) is
  one of ``VIDEO_LIST_HEADERS``; more columns (``path,label``) and ``path
  label`` rows are fine; blank rows and ``#`` comments are skipped. Relative
  paths are relative to the list's directory; lists and videos may be local
  or ``gs://``. ``BadFileError`` (naming the file and line): no paths at all;
  binary, non-UTF-8 or over 64 MiB; not CSV; a first row that is a header
  without a path column; a row whose path cell is empty; control characters
  or a path over 4,096 characters. A path listed again is predicted once,
  and a warning says which lines repeat it.
  """
  path = expand(path)
  rows = file_checks.csv_rows(read_user_text(path), path)
  column = 0
  if rows:
    line, first = rows[0]
    lowered = [c.lower() for c in first]
    named = [i for i, c in enumerate(lowered) if c in VIDEO_LIST_HEADERS]
    if named:
      column = named[0]
      rows = rows[1:]
    elif len(first) > 1 and not any(("." in c or "/" in c or _is_number(c)) for c in first):
      raise file_checks.BadFileError(path, f"line {line} looks like a header ({', '.join(first)[:80]}) without a "
                                           f"path column; name that column one of {', '.join(VIDEO_LIST_HEADERS)}")
  base = parent(path) if is_url(path) else os.path.dirname(os.path.abspath(path))
  found: list[str] = []
  seen: dict[str, int] = {}
  repeated: list[str] = []
  for line, row in rows:
    cell = row[column] if column < len(row) else ""
    if len(row) == 1 and len(cell.split()) > 1:  # "path label" lists: the label an index, or the path has a dot.
      head, last = cell.rsplit(None, 1)
      cell = head if last.isdigit() else cell.split()[0] if "." in cell.split()[0] else cell
    if not cell:
      raise file_checks.BadFileError(path, f"line {line} has no video path in column {column + 1} "
                                           f"({','.join(row)[:60]!r})")
    video = file_checks.printable(cell, path, line, "video path")
    if is_url(base) and not (is_url(video) or os.path.isabs(video)):
      video = f"{base.rstrip('/')}/{video}"  # normpath would fold gs:// to gs:/.
    elif not is_url(video):
      video = os.path.normpath(video if os.path.isabs(video) else os.path.join(base, video))
    if video in seen:
      repeated.append(f"line {line} repeats line {seen[video]}")
      continue
    seen[video] = line
    found.append(video)
  if not found:
    raise file_checks.BadFileError(path, "no video paths (expected one per line, or a CSV whose first column, or "
                                         f"the column headed {VIDEO_LIST_HEADERS[0]!r}, is the path)")
  if repeated:
    logging.warning("%s: %d repeated video path(s) (%s%s); each video is predicted once.", path, len(repeated),
                    "; ".join(repeated[:3]), " ..." if len(repeated) > 3 else "")
  return found


MAX_CLASSES = 1 << 20


def read_class_names(path: str) -> list[str | None]:
  """Class names of a ``--labels`` file: one per line (line i is class i), or the official ``id,name`` CSV.

  Returns the name of each class index (None for an id the table skips;
  a warning lists those). ``BadFileError`` naming the file and line: no
  names; binary, non-UTF-8 or over 64 MiB; an id that is not an integer in
  [0, 2**20) or appears twice; an empty name; control characters.
  Names that appear twice are shown as they are, and a warning says so.
  """
  path = expand(path)
  rows = file_checks.csv_rows(read_user_text(path), path)
  if not rows:
    raise file_checks.BadFileError(path, "no class names (expected one per line, or id,name rows)")
  names: list[str | None]
  if [c.lower() for c in rows[0][1][:2]] == ["id", "name"]:
    table: dict[int, tuple[int, str]] = {}
    for line, row in rows[1:]:
      try:
        index = int(row[0])
      except ValueError:
        raise file_checks.BadFileError(path, f"line {line}: the id {row[0][:40]!r} is not an integer") from None
      if not 0 <= index < MAX_CLASSES:
        raise file_checks.BadFileError(path, f"line {line}: the id {index} is not in [0, {MAX_CLASSES})")
      if index in table:
        raise file_checks.BadFileError(path, f"id {index} appears twice (lines {table[index][0]} and {line})")
      table[index] = (line, file_checks.printable(",".join(row[1:]).strip(), path, line, "class name"))
    if not table:
      raise file_checks.BadFileError(path, "no class names after the id,name header")
    names = [table[i][1] if i in table else None for i in range(max(table) + 1)]
    gaps = [str(i) for i, n in enumerate(names) if n is None]
    if gaps:
      logging.warning("%s has no name for class id(s) %s%s: shown as indices.", path, ", ".join(gaps[:10]),
                      " ..." if len(gaps) > 10 else "")
    lines = {i: table[i][0] for i in table}
  else:
    if len(rows) > MAX_CLASSES:
      raise file_checks.BadFileError(path, f"{len(rows):,} class names, at most {MAX_CLASSES:,} expected")
    names = [file_checks.printable(",".join(row).strip(), path, line, "class name") for line, row in rows]
    lines = {i: line for i, (line, _) in enumerate(rows)}
  for i, name in enumerate(names):
    if name == "":
      raise file_checks.BadFileError(path, f"line {lines[i]}: empty class name")
  seen: dict[str, int] = {}
  twice = []
  for i, name in enumerate(names):
    if name is not None and name in seen:
      twice.append(f"{name[:40]!r} (lines {lines[seen[name]]} and {lines[i]})")
    elif name is not None:
      seen[name] = i
  if twice:
    logging.warning("%s: class names that appear twice: %s", path, ", ".join(twice[:5]))
  return names
