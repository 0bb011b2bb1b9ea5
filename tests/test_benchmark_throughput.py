"""benchmarks/throughput.py runs at a tiny size and writes a consistent table, JSON and CSV."""
import csv
import json


from benchmarks import throughput


def test_throughput_tiny(tmp_path):
  out_json, out_csv = str(tmp_path / "t.json"), str(tmp_path / "t.csv")
  rows = throughput.main(["--tiny", "--num_devices=1", "--modes=eval", "--batch_sizes=1,2", "--rounds=2",
                          "--warmup=1", "--dtype=float32"])
  rows += throughput.main(["--tiny", "--num_devices=1", "--modes=train", "--batch_sizes=1", "--rounds=2",
                           "--warmup=1", "--dtype=float32", f"--output_json={out_json}", f"--output_csv={out_csv}"])
  assert [(r["mode"], r["batch"]) for r in rows] == [("eval", 1), ("eval", 2), ("train", 1)]
  for r in rows:
    assert "error" not in r, r
    assert r["latency_ms"] > 0 and r["compile_s"] > 0
    assert abs(r["clips_per_s"] - r["batch"] / (r["latency_ms"] / 1e3)) < 0.01 * r["clips_per_s"] + 1e-3
    assert r["xla_gflop"] and r["xla_gflop"] > 0
    assert abs(r["achieved_tflops"] - r["xla_gflop"] / r["latency_ms"]) < 1e-3 * r["achieved_tflops"] + 1e-5
    assert r["rss_peak_mb"] > 0 and r["num_devices"] == 1
  by = {(r["mode"], r["batch"]): r for r in rows}
  # Twice the clips, about twice the work; a train step (forward + backward) costs more than a forward.
  assert 1.6 < by["eval", 2]["xla_gflop"] / by["eval", 1]["xla_gflop"] < 2.4
  assert by["train", 1]["xla_gflop"] > 1.5 * by["eval", 1]["xla_gflop"]
  saved = json.loads(open(out_json).read())
  assert saved["rows"] == rows[2:] and saved["meta"]["backend"] == "cpu"
  with open(out_csv, newline="") as f:
    assert [(r["mode"], int(r["batch"])) for r in csv.DictReader(f)] == [("train", 1)]
  assert "clips_per_s" in throughput.format_table(rows)


def test_batch_not_dividing_the_devices_is_reported_not_fatal():
  rows = throughput.main(["--tiny", "--num_devices=2", "--batch_sizes=3", "--modes=eval", "--rounds=1"])
  assert len(rows) == 1 and "does not divide" in rows[0]["error"]
