"""Two processes joined by jax.distributed on 127.0.0.1 give the same losses and params as one."""
import json

import numpy as np

from helpers import free_port, start_worker


def _launch(out, num_processes, process_id, devices, port):
  # The device count is the worker's flag; conftest's cheap XLA flags are inherited (the same for both runs).
  return start_worker(f"--num_processes={num_processes}", f"--process_id={process_id}", f"--port={port}",
                      f"--devices_per_process={devices}", "--mesh=2,2", "--steps=2", f"--out={out}")


def test_two_processes_equal_one(tmp_path):
  port = free_port()
  procs = [_launch(tmp_path / "multi.json", 2, i, 2, port) for i in range(2)]
  single = _launch(tmp_path / "single.json", 1, 0, 4, 0)
  for p in procs + [single]:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
  multi = json.load(open(tmp_path / "multi.json"))
  one = json.load(open(tmp_path / "single.json"))
  assert (multi["process_count"], multi["device_count"]) == (2, 4)
  assert (one["process_count"], one["device_count"]) == (1, 4)
  np.testing.assert_allclose(multi["losses"], one["losses"], rtol=1e-5)
  for key, value in one["params"].items():
    np.testing.assert_allclose(multi["params"][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
