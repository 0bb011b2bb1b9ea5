"""The measurements behind docs/pth_loader.md#why-its-own-pickle-machine.

Own pickle machine (vfocal_jax.convert.pth) or `pickle.Unpickler` subclass with a
`pickletools.genops` pre-pass? Three measurements, from the repository root:

  .venv/bin/python benchmarks/pth_reader_choice.py corpus       # the hostile corpus, both readers
  .venv/bin/python benchmarks/pth_reader_choice.py pickle_time  # data.pkl of a Video-FocalNet-B state dict
  .venv/bin/python benchmarks/pth_reader_choice.py load_time [REV]  # whole loads, this tree vs REV's torch_pickle.py

`corpus` builds the ~1,000 files of tests/test_torch_pickle_fuzz.py and loads each
in a child process (a new child after a crash; a file that takes over 20 s wall is
killed as a hang), once with our machine and once with the Unpickler variant:
the same zip/legacy readers, limits and allow-list, but each pickle run by the C
`pickle.Unpickler` (find_class -> our allow-list, persistent_load -> our storages,
placeholders given __new__/__setstate__/__setitem__/append) after a genops pass
that counts opcodes against max_objects, refuses EXT and buffer opcodes and checks
memo indices against max_memo. It prints every file whose outcome breaks an
assertion of the fuzz test.
"""
import io, json, os, pathlib, pickle, pickletools, statistics, subprocess, sys, tempfile, time, zipfile  # noqa: E401

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

UNPICKLER_VARIANT = r'''
import io, pickle, pickletools
from vfocal_jax.convert.pth import machine, values
from vfocal_jax.convert.pth.errors import CheckpointFormatError, CheckpointLoadError, limit_error
from vfocal_jax.convert.pth.source import Truncated
_current = []
values.Global.__call__ = lambda self, *args: self.handler(_current[-1], args)
def _new(cls, *args, **kwargs):
  obj = object.__new__(cls)
  obj.new_args, obj.new_kwargs, obj.state, obj.items, obj.elements = args, kwargs, None, {}, []
  return obj
values.InertObject.__new__ = _new
values.InertObject.__setstate__ = lambda self, state: setattr(self, "state", state)
values.InertObject.__setitem__ = lambda self, k, v: self.items.__setitem__(k, v)
values.InertObject.append = lambda self, v: self.elements.append(v)
values.InertObject.extend = lambda self, vs: self.elements.extend(vs)

class _Recorder:  # what genops reads of the source is the pickle the Unpickler then runs
  def __init__(self, src): self.src, self.parts = src, []
  def _keep(self, fn, *a):
    try: data = fn(*a)
    except Truncated: raise ValueError("truncated") from None
    self.parts.append(data); return data
  def read(self, n): return self._keep(self.src.read, n)
  def readline(self): return self._keep(self.src.readline)

class _Unpickler(pickle.Unpickler):
  def __init__(self, f, m): super().__init__(f); self.m = m
  def find_class(self, module, name): return self.m.find_class(module, name)
  def persistent_load(self, pid): return self.m.persistent(pid)

def run(self):
  loader, rec, memo = self.loader, _Recorder(self.src), set()
  try:
    for op, arg, _ in pickletools.genops(rec):
      loader.charge_objects(1)
      if op.name in ("EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"):
        raise CheckpointFormatError(f"{op.name}: extension codes and buffers are not supported")
      if op.name == "PROTO" and arg > 5: raise CheckpointFormatError("unsupported pickle protocol")
      if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        index = len(memo) if op.name == "MEMOIZE" else arg
        if not 0 <= index < 2**32: raise CheckpointFormatError("memo index")
        memo.add(index)
        if len(memo) > loader.limits.max_memo:
          raise limit_error("max_memo", loader.limits.max_memo, "the pickle memo")
  except CheckpointLoadError:
    raise
  except ValueError as e:
    raise CheckpointFormatError(f"malformed pickle ({e})"[:200]) from None
  _current.append(self)
  try:
    return _Unpickler(io.BytesIO(b"".join(rec.parts)), self).load()
  except CheckpointLoadError: raise
  except Exception as e:
    raise CheckpointFormatError(f"malformed pickle: {type(e).__name__}") from None
  finally:
    _current.pop()
machine.Machine.run = run
'''

WORKER = r'''
import json, resource, sys, time
import numpy as np
manifest, out_path, start, variant = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if variant == "unpickler":
  exec(sys.argv[5])
from vfocal_jax.convert import torch_pickle as tp
entries = json.load(open(manifest))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(out_path, "a") as out:
  for i in range(start, len(entries)):
    e = entries[i]
    out.write(json.dumps({"i": i, "started": e["name"]}) + "\n"); out.flush()
    fn = tp.read_torch_file if e["fn"] == "read" else tp.load_torch_checkpoint
    t0 = time.process_time(); r = {"i": i, "name": e["name"]}
    try:
      fn(e["path"], **e["kwargs"]); r["outcome"] = "ok"
    except tp.CheckpointLoadError as err:
      r["outcome"], r["message"] = type(err).__name__, str(err)[:400]
    except BaseException as err:
      r["outcome"], r["message"] = "raw " + type(err).__name__, str(err)[:300]
    r["cpu"] = time.process_time() - t0
    r["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    out.write(json.dumps(r) + "\n"); out.flush()
'''


def _run_corpus(variant, entries, manifest, directory):
  out = directory / f"results_{variant}.jsonl"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  start = 0
  while start < len(entries):
    child = subprocess.Popen([sys.executable, "-c", WORKER, str(manifest), str(out), str(start), variant,
                              UNPICKLER_VARIANT], env=env, cwd=directory, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    seen, since = -1, time.monotonic()
    while child.poll() is None:
      time.sleep(0.5)
      n = len(out.read_text().splitlines()) if out.exists() else 0
      if n != seen:
        seen, since = n, time.monotonic()
      elif time.monotonic() - since > 20:
        child.kill()
        child.wait()
    if child.returncode == 0:
      break
    last = json.loads(out.read_text().splitlines()[-1])
    how = "hung (killed after 20 s)" if child.returncode == -9 else f"crashed (status {child.returncode})"
    with open(out, "a") as f:
      f.write(json.dumps({"i": last["i"], "name": last.get("started", last.get("name")), "outcome": how,
                          "cpu": 0, "rss_mb": 0}) + "\n")
    start = last["i"] + 1
  return [json.loads(line) for line in out.read_text().splitlines() if '"outcome"' in line]


def corpus():
  import test_torch_pickle_fuzz as fuzz  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(tempfile.mkdtemp(prefix="pth_corpus_"))
  c = fuzz.build_corpus(directory)
  manifest = directory / "manifest.json"
  manifest.write_text(json.dumps(c.entries))
  by_name = {e["name"]: e for e in c.entries}
  for variant in ("machine", "unpickler"):
    t0 = time.perf_counter()
    results, wrong, peak = _run_corpus(variant, c.entries, manifest, directory), [], 0
    for r in results:
      e, why = by_name[r["name"]], []
      if r["outcome"] not in e["expect"]:
        why.append(f"{r['outcome']}, the test expects {' or '.join(e['expect'])}")
      elif r["outcome"] != "ok" and e["names"] and e["names"] not in r.get("message", ""):
        why.append(f"the message does not name {e['names']!r}: {r['message'][-80:]!r}")
      if r["cpu"] > 2.0:
        why.append(f"{r['cpu']:.1f} s CPU")
      if r["rss_mb"] > 300 >= peak:
        why.append(f"peak RSS +{r['rss_mb']:.0f} MB")
      peak = max(peak, r["rss_mb"])
      if why:
        wrong.append(f"  {r['name']}: {'; '.join(why)}")
    print(f"{variant}: {len(results)} files in {time.perf_counter() - t0:.0f} s; marker file: "
          f"{c.marker.exists()}; {len(wrong)} break the fuzz test's assertions")
    print("\n".join(wrong))


def _b_layout_pickle():
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_video_focalnet as tvf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)  # the B layout (548 tensors) with tiny widths: the pickle is the same size
  model = tvf.VideoFocalNet(embed_dim=8, depths=(2, 2, 18, 2), num_frames=8, num_classes=400)
  buf = io.BytesIO()
  torch.save({"model": model.state_dict(), "epoch": 30, "max_accuracy": 83.6,
              "config": {"MODEL": {"TYPE": "videofocalnet_base"}}}, buf)
  with zipfile.ZipFile(buf) as z:
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def pickle_time(reps=31):
  from vfocal_jax.convert.pth.machine import Machine  # pylint: disable=import-outside-toplevel
  from vfocal_jax.convert.pth.source import Source  # pylint: disable=import-outside-toplevel
  from vfocal_jax.convert.pth.state import Limits, Load  # pylint: disable=import-outside-toplevel
  pkl = _b_layout_pickle()

  def ours():
    load = Load(Limits(2**28, 256, 10**6, 4 * 10**6, 2**40, 10**5))
    Machine(load, Source(pkl), lambda pid: load.storage(pid[2], pid[1], pid[4])).run()

  class NoOp(pickle.Unpickler):  # the C machine alone: no checks, nothing rebuilt
    def find_class(self, module, name):
      return __import__("collections").OrderedDict if name == "OrderedDict" else (lambda *a: a)

    def persistent_load(self, pid):
      return pid

  print(f"data.pkl of a Video-FocalNet-B state dict: {len(pkl):,} bytes, "
        f"{sum(1 for _ in pickletools.genops(pkl)):,} opcodes; min / median of {reps}:")
  for name, fn in [("our machine (opcodes, allow-list, checks)", ours),
                   ("pickletools.genops pass alone", lambda: [None for _ in pickletools.genops(pkl)]),
                   ("C pickle.Unpickler, no-op find_class", lambda: NoOp(io.BytesIO(pkl)).load())]:
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    print(f"  {name}: {min(times) * 1e3:.1f} / {statistics.median(times) * 1e3:.1f} ms")


LOAD_CHILD = r'''
import sys, time, importlib.util
which, path = sys.argv[1:3]
if which == "tree":
  from vfocal_jax.convert.torch_pickle import load_torch_checkpoint
else:
  spec = importlib.util.spec_from_file_location("old_torch_pickle", which)
  old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
  load_torch_checkpoint = old.load_torch_checkpoint
t = time.perf_counter(); load_torch_checkpoint(path); print(time.perf_counter() - t)
'''


def load_time(rev="HEAD~1", reps=7):
  path = os.environ.get("PTH", "/tmp/vfnet_b.pth")
  if not os.path.exists(path):  # Video-FocalNet-B: 157.4M float32 parameters (600 MB), released layout
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks import torch_video_focalnet as tvf  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    model = tvf.VideoFocalNet(embed_dim=128, depths=(2, 2, 18, 2), num_frames=8, num_classes=400)
    torch.save({"model": model.state_dict(), "epoch": 30, "max_accuracy": 83.6,
                "config": {"MODEL": {"TYPE": "videofocalnet_base"}}}, path)
  old = pathlib.Path(tempfile.mkdtemp()) / "old_torch_pickle.py"
  old.write_bytes(subprocess.run(["git", "show", f"{rev}:vfocal_jax/convert/torch_pickle.py"], cwd=ROOT,
                                 check=True, capture_output=True).stdout)
  times = {"tree": [], str(old): []}
  for _ in range(reps):
    for which in times:  # one fresh process per load, alternating
      out = subprocess.run([sys.executable, "-c", LOAD_CHILD, which, path], check=True, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
      times[which].append(float(out.split()[-1]))
  for which, label in zip(times, ("this tree", f"{rev}'s torch_pickle.py")):
    print(f"{label}: median {statistics.median(times[which]):.3f} s, min {min(times[which]):.3f} s "
          f"({', '.join(f'{t:.2f}' for t in times[which])})")


if __name__ == "__main__":
  {"corpus": corpus, "pickle_time": pickle_time, "load_time": load_time}[sys.argv[1]](*sys.argv[2:])
