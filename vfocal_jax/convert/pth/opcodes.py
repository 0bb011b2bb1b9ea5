"""The pickle opcodes the machine runs: one entry of `OPS` per opcode, `fn(machine)`.

Every opcode of protocols 0 to 5 is here; those that would import, call or read
outside the pickle are refused (EXT1/2/4, out-of-band buffers) or go through
the machine's checked operations (`find_class`, `call`, `new_object`, `build`,
`setitem`, `append`, the memo). Each does constant work plus the size of its
argument; opcodes that copy a mark's items charge them against `max_objects`.
"""
from __future__ import annotations

import codecs
import pickle
import pickletools
import struct

from vfocal_jax.convert.pth.checks import check_key
from vfocal_jax.convert.pth.errors import CheckpointFormatError
from vfocal_jax.convert.pth.values import describe

STOP = object()  # what the STOP opcode returns to the machine's loop
OP_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


def _length(m, fmt: str, size: int) -> int:
  (n,) = struct.unpack(fmt, m.src.read(size))
  if n < 0:
    raise CheckpointFormatError(f"negative length {n} in the pickle")
  return n


def _counted(m, fmt: str, size: int) -> bytes:
  return m.src.read(_length(m, fmt, size))


def _text(data: bytes) -> str:
  return data.decode("utf-8", "surrogatepass")


def _line_int(m) -> int:
  return int(m.src.readline()[:-1])


def _proto(m):
  if m.src.byte() > 5:
    raise CheckpointFormatError("unsupported pickle protocol")


def _stop(m):
  m.result = m.stack.pop()
  return STOP


def _mark(m):
  m.metastack.append(m.stack)
  m.stack = []


def _pop(m):
  if m.stack:
    m.stack.pop()
  else:
    m.pop_mark()


def _int(m):
  data = m.src.readline()
  m.stack.append(False if data == b"00\n" else True if data == b"01\n" else int(data, 0))


def _long(m):
  data = m.src.readline()[:-1]
  m.stack.append(int(data[:-1] if data.endswith(b"L") else data, 0))


def _string(m):
  data = m.src.readline()[:-1]
  if not (len(data) >= 2 and data[0] == data[-1] and data[:1] in (b'"', b"'")):
    raise CheckpointFormatError("the STRING opcode argument must be quoted")
  m.stack.append(codecs.escape_decode(data[1:-1])[0].decode("utf-8"))


def _refuse(message: str):
  def op(m):
    raise CheckpointFormatError(message)
  return op


def _tuple(m):
  items = m.pop_mark()
  m.units(len(items))
  m.stack.append(tuple(items))


def _list(m):
  items = m.pop_mark()
  m.units(len(items))
  m.stack.append(items)


def _empty_dict(m):
  m.units(1)
  m.stack.append({})


def _dict(m):
  items = m.pop_mark()
  if len(items) % 2:
    raise CheckpointFormatError("DICT with an odd number of items")
  m.units(len(items))
  out = {}
  for i in range(0, len(items), 2):
    check_key(items[i])
    out[items[i]] = items[i + 1]
  m.stack.append(out)


def _empty_set(m):
  m.units(4)
  m.stack.append(set())


def _frozenset(m):
  items = m.pop_mark()
  m.units(4 + len(items))
  for item in items:
    check_key(item, "set element")
  m.stack.append(frozenset(items))


def _additems(m):
  items = m.pop_mark()
  target = m.stack[-1]
  if type(target) is not set:
    raise CheckpointFormatError(f"ADDITEMS on {describe(target)} is not allowed")
  m.units(len(items))
  for item in items:
    check_key(item, "set element")
  target.update(items)


def _append(m):
  value = m.stack.pop()
  m.append(m.stack[-1], [value])


def _appends(m):
  items = m.pop_mark()
  m.units(len(items))
  m.append(m.stack[-1], items)


def _setitem(m):
  value = m.stack.pop()
  key = m.stack.pop()
  m.setitem(m.stack[-1], key, value)


def _setitems(m):
  items = m.pop_mark()
  if len(items) % 2:
    raise CheckpointFormatError("SETITEMS with an odd number of items")
  m.units(len(items))
  target = m.stack[-1]
  for i in range(0, len(items), 2):
    m.setitem(target, items[i], items[i + 1])


def _global(m):
  module = _text(m.src.readline()[:-1])
  name = _text(m.src.readline()[:-1])
  m.stack.append(m.find_class(module, name))


def _stack_global(m):
  name = m.stack.pop()
  module = m.stack.pop()
  m.stack.append(m.find_class(module, name))


def _reduce(m):
  args = m.stack.pop()
  m.stack[-1] = m.call(m.stack[-1], args)


def _build(m):
  state = m.stack.pop()
  m.build(m.stack[-1], state)


def _newobj(m):
  args = m.stack.pop()
  cls = m.stack.pop()
  m.stack.append(m.new_object(cls, args, {}))


def _newobj_ex(m):
  kwargs = m.stack.pop()
  args = m.stack.pop()
  cls = m.stack.pop()
  m.stack.append(m.new_object(cls, args, kwargs))


def _inst(m):
  module = _text(m.src.readline()[:-1])
  name = _text(m.src.readline()[:-1])
  cls = m.find_class(module, name)
  m.stack.append(m.instantiate(cls, m.pop_mark()))


def _obj(m):
  args = m.pop_mark()
  cls = args.pop(0)
  m.stack.append(m.instantiate(cls, args))


def _binpersid(m):
  m.stack[-1] = m.persistent(m.stack[-1])


def _u32(m) -> int:
  return struct.unpack("<I", m.src.read(4))[0]


_P = pickle
OPS = {op[0]: fn for op, fn in [
    # Framing and the stack.
    (_P.PROTO, _proto), (_P.FRAME, lambda m: m.src.read(8)), (_P.STOP, _stop),
    (_P.MARK, _mark), (_P.POP, _pop), (_P.POP_MARK, lambda m: m.pop_mark()),
    (_P.DUP, lambda m: m.stack.append(m.stack[-1])),
    # Constants and numbers.
    (_P.NONE, lambda m: m.stack.append(None)),
    (_P.NEWTRUE, lambda m: m.stack.append(True)),
    (_P.NEWFALSE, lambda m: m.stack.append(False)),
    (_P.INT, _int), (_P.LONG, _long),
    (_P.BININT, lambda m: m.stack.append(struct.unpack("<i", m.src.read(4))[0])),
    (_P.BININT1, lambda m: m.stack.append(m.src.byte())),
    (_P.BININT2, lambda m: m.stack.append(struct.unpack("<H", m.src.read(2))[0])),
    (_P.LONG1, lambda m: m.stack.append(
        int.from_bytes(m.src.read(m.src.byte()), "little", signed=True))),
    (_P.LONG4, lambda m: m.stack.append(
        int.from_bytes(_counted(m, "<i", 4), "little", signed=True))),
    (_P.FLOAT, lambda m: m.stack.append(float(m.src.readline()[:-1]))),
    (_P.BINFLOAT, lambda m: m.stack.append(struct.unpack(">d", m.src.read(8))[0])),
    # Text and bytes (Python 2 strings are decoded as UTF-8).
    (_P.STRING, _string),
    (_P.BINSTRING, lambda m: m.stack.append(_counted(m, "<i", 4).decode("utf-8"))),
    (_P.SHORT_BINSTRING, lambda m: m.stack.append(m.src.read(m.src.byte()).decode("utf-8"))),
    (_P.UNICODE, lambda m: m.stack.append(m.src.readline()[:-1].decode("raw-unicode-escape"))),
    (_P.SHORT_BINUNICODE, lambda m: m.stack.append(_text(m.src.read(m.src.byte())))),
    (_P.BINUNICODE, lambda m: m.stack.append(_text(_counted(m, "<I", 4)))),
    (_P.BINUNICODE8, lambda m: m.stack.append(_text(_counted(m, "<Q", 8)))),
    (_P.SHORT_BINBYTES, lambda m: m.stack.append(m.src.read(m.src.byte()))),
    (_P.BINBYTES, lambda m: m.stack.append(_counted(m, "<I", 4))),
    (_P.BINBYTES8, lambda m: m.stack.append(_counted(m, "<Q", 8))),
    (_P.BYTEARRAY8, lambda m: m.stack.append(bytearray(_counted(m, "<Q", 8)))),
    (_P.NEXT_BUFFER, _refuse("out-of-band pickle buffers are not supported")),
    (_P.READONLY_BUFFER, _refuse("out-of-band pickle buffers are not supported")),
    # Containers.
    (_P.EMPTY_TUPLE, lambda m: m.stack.append(())), (_P.TUPLE, _tuple),
    (_P.TUPLE1, lambda m: m.stack.__setitem__(-1, (m.stack[-1],))),
    (_P.TUPLE2, lambda m: m.stack.__setitem__(slice(-2, None), [(m.stack[-2], m.stack[-1])])),
    (_P.TUPLE3, lambda m: m.stack.__setitem__(
        slice(-3, None), [(m.stack[-3], m.stack[-2], m.stack[-1])])),
    (_P.EMPTY_LIST, lambda m: m.stack.append([])), (_P.LIST, _list),
    (_P.EMPTY_DICT, _empty_dict), (_P.DICT, _dict),
    (_P.EMPTY_SET, _empty_set), (_P.FROZENSET, _frozenset), (_P.ADDITEMS, _additems),
    (_P.APPEND, _append), (_P.APPENDS, _appends),
    (_P.SETITEM, _setitem), (_P.SETITEMS, _setitems),
    # Globals, calls and objects: through the allow-list.
    (_P.GLOBAL, _global), (_P.STACK_GLOBAL, _stack_global),
    (_P.EXT1, _refuse("pickle extension codes (EXT1/2/4) are not supported")),
    (_P.EXT2, _refuse("pickle extension codes (EXT1/2/4) are not supported")),
    (_P.EXT4, _refuse("pickle extension codes (EXT1/2/4) are not supported")),
    (_P.REDUCE, _reduce), (_P.BUILD, _build), (_P.NEWOBJ, _newobj),
    (_P.NEWOBJ_EX, _newobj_ex), (_P.INST, _inst), (_P.OBJ, _obj),
    (_P.PERSID, lambda m: m.stack.append(m.persistent(m.src.readline()[:-1].decode("ascii")))),
    (_P.BINPERSID, _binpersid),
    # The memo.
    (_P.GET, lambda m: m.stack.append(m.memo_get(_line_int(m)))),
    (_P.BINGET, lambda m: m.stack.append(m.memo_get(m.src.byte()))),
    (_P.LONG_BINGET, lambda m: m.stack.append(m.memo_get(_u32(m)))),
    (_P.PUT, lambda m: m.memo_put(_line_int(m), m.stack[-1])),
    (_P.BINPUT, lambda m: m.memo_put(m.src.byte(), m.stack[-1])),
    (_P.LONG_BINPUT, lambda m: m.memo_put(_u32(m), m.stack[-1])),
    (_P.MEMOIZE, lambda m: m.memo_put(len(m.memo), m.stack[-1])),
]}
