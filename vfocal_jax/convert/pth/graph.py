"""After the pickle: check the object graph, read the storages it needs, put arrays in place.

`finish` walks the graph once, iteratively and memoised (shared nodes are visited
once, so a "billion laughs" pickle costs its size): it refuses cycles and nesting
deeper than `max_depth` and collects the placeholders. Then the format reader
reads the storages those placeholders use, and the placeholders are replaced by
NumPy arrays (tuples are rebuilt). Nothing recurses.
"""
from __future__ import annotations

import collections
import math
import mmap
from typing import Any, Callable, Iterable

import numpy as np

from vfocal_jax.convert.pth.errors import CheckpointFormatError, limit_error
from vfocal_jax.convert.pth.state import Load
from vfocal_jax.convert.pth.values import (PLACEHOLDERS, InertObject, NumpyDtype, PendingTensor,
                                           StorageRef)

# read_storages(needed storages, dest_for) yields (storage, its bytes in dest_for(storage)).
ReadStorages = Callable[[list, Callable[[StorageRef], np.ndarray]],
                        Iterable[tuple[StorageRef, np.ndarray]]]
_MISSING = object()


def _children(obj: Any) -> Any:
  """The values nested in a container (keys and set elements are flat by construction)."""
  t = type(obj)
  if t is list or t is tuple:
    return obj
  if t is dict:
    return obj.values()
  if t is collections.OrderedDict:
    meta = obj.__dict__.get("_metadata")
    return list(obj.values()) + ([meta] if meta is not None else [])
  if isinstance(obj, InertObject):
    return (obj.new_args, obj.new_kwargs, obj.state, obj.items, obj.elements)
  return None


def walk(root: Any, max_depth: int) -> tuple[list, list]:
  """Iterative DFS: refuses cycles and nesting deeper than max_depth.

  Returns the containers in post-order and the placeholders (tensors, storages,
  NumPy stand-ins) reachable from `root`, each once. Linear in the object graph.
  """
  height: dict[int, int] = {}
  active: set[int] = set()
  post, placeholders, seen = [], [], set()

  def enter(obj, depth):
    if isinstance(obj, PLACEHOLDERS):
      if id(obj) not in seen:
        seen.add(id(obj))
        placeholders.append(obj)
      return None
    kids = _children(obj)
    if kids is None:
      return None
    if id(obj) in active:
      raise CheckpointFormatError("the pickle builds a container that contains itself")
    done = height.get(id(obj))
    if done is not None:
      if depth + done > max_depth:
        raise limit_error("max_depth", max_depth, "nesting depth")
      return None
    if depth + 1 > max_depth:
      raise limit_error("max_depth", max_depth, "nesting depth")
    active.add(id(obj))
    return [obj, iter(kids), 1]

  first = enter(root, 0)
  stack = [first] if first is not None else []
  while stack:
    frame = stack[-1]
    for child in frame[1]:
      new = enter(child, len(stack))
      if new is not None:
        stack.append(new)
        break
      done = height.get(id(child))  # containers only (live objects: ids are unique)
      if done is not None:
        frame[2] = max(frame[2], done + 1)
    else:
      obj, _, h = stack.pop()
      active.discard(id(obj))
      height[id(obj)] = h
      post.append(obj)
      if stack:
        stack[-1][2] = max(stack[-1][2], h + 1)
  return post, placeholders


def _replace(root: Any, post: list, repl: dict[int, Any]) -> Any:
  """Puts the materialised values in place of the placeholders (tuples are rebuilt)."""
  keep = []  # old objects stay alive so that their ids are not reused meanwhile
  for node in post:
    t = type(node)
    if t is list:
      for i, v in enumerate(node):
        r = repl.get(id(v), _MISSING)
        if r is not _MISSING:
          node[i] = r
    elif t is dict or t is collections.OrderedDict:
      changed = [(k, repl[id(v)]) for k, v in node.items() if id(v) in repl]
      for k, v in changed:
        node[k] = v
      meta = node.__dict__.get("_metadata") if t is collections.OrderedDict else None
      if meta is not None and id(meta) in repl:
        node._metadata = repl[id(meta)]
    elif t is tuple:
      if any(id(v) in repl for v in node):
        keep.append(node)
        repl[id(node)] = tuple(repl.get(id(v), v) for v in node)
    elif isinstance(node, InertObject):
      for name in ("new_args", "state"):
        value = getattr(node, name)
        if id(value) in repl:
          setattr(node, name, repl[id(value)])
  return repl.get(id(root), root)


def _materialize(t: PendingTensor, raw: np.ndarray) -> np.ndarray:
  if math.prod(t.size) == 0:
    return np.zeros(t.size, t.dtype)
  usable = raw.size - raw.size % t.dtype.itemsize
  flat = raw[:usable].view(t.dtype)
  if t.whole:
    return flat.reshape(t.size)
  view = np.lib.stride_tricks.as_strided(
      flat[t.offset:], shape=t.size, strides=tuple(s * t.dtype.itemsize for s in t.stride),
      writeable=False)
  return np.array(view, copy=True, order="C")


def _arena(nbytes: int) -> np.ndarray:
  """One private anonymous mapping for the storages (writable; unmapped with its last view).

  Not `np.empty`: NumPy asks for transparent huge pages on large arrays, and on a
  busy host the kernel's compaction for them made loads several times slower.
  """
  if nbytes and hasattr(mmap, "MAP_PRIVATE"):
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), np.uint8)
  return np.empty(nbytes, np.uint8)


def finish(loader: Load, root: Any, read_storages: ReadStorages) -> Any:
  """Checks the object graph, reads the storages it needs, materialises the placeholders.

  Storages that some tensor uses whole (the usual case) are read into one arena
  and those tensors are views of it (one allocation, as torch.load's tensors
  share their storages); storages used only through partial or strided views
  go to a scratch buffer and the views are copied out.
  """
  if loader.select is not None:
    root = loader.select(root)  # e.g. only the state dict: other storages are not read
  post, placeholders = walk(root, loader.limits.max_depth)
  by_storage: dict[str, list] = collections.defaultdict(list)
  repl: dict[int, Any] = {}
  for p in placeholders:
    if isinstance(p, PendingTensor):
      by_storage[p.storage.key].append(p)
    elif isinstance(p, StorageRef):
      by_storage[p.key].append(p)
    elif isinstance(p, NumpyDtype):
      repl[id(p)] = p.dtype
    elif p.array is None:
      raise CheckpointFormatError("a numpy array without data (no BUILD)")
    else:
      repl[id(p)] = p.array
  needed = [loader.storages[key] for key in by_storage]
  offsets, total = {}, 0
  for ref in needed:
    if any(isinstance(p, StorageRef) or p.whole for p in by_storage[ref.key]):
      offsets[ref.key] = total
      total += -(-ref.nbytes // 64) * 64  # 64-byte aligned, as in torch's archives
  arena = _arena(total)

  def dest_for(ref: StorageRef) -> np.ndarray:
    start = offsets.get(ref.key)
    if start is None:
      return np.empty(ref.nbytes, np.uint8)
    return arena[start:start + ref.nbytes]

  for ref, raw in read_storages(needed, dest_for):
    for p in by_storage.pop(ref.key, ()):
      if isinstance(p, StorageRef):
        repl[id(p)] = raw[:raw.size - raw.size % p.dtype.itemsize].view(p.dtype)
      else:
        repl[id(p)] = _materialize(p, raw)
  if by_storage:
    raise CheckpointFormatError("internal error: storages left unread")
  return _replace(root, post, repl)
