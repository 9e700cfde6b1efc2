"""The benchmark scripts still run (smoke checks on CPU; their numbers are not asserted:
speed and memory targets live in benchmarks/RESULTS.md, measured on the named machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "UNDO_NO_PROGRESS": "1"}


def test_gpu_benchmark_smoke_run_reports_throughput(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--json", str(out)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert {row["workload"] for row in rows} == {"train", "distill"}
    assert all(row["tokens_per_s"] > 0 and row["model_flops_per_s"] > 0 for row in rows), rows


def test_memory_benchmark_reports_a_peak_per_workload(tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(BENCH / "memory.py"), "--preset", "tiny", "--batch-size", "2",
                    "--seq-len", "32", "--cpu", "--json", str(out)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert {row["workload"] for row in rows} == {"train", "distill", "rmu"}
    assert all(row["peak_mb"] >= row["weights_mb"] > 0 for row in rows), rows


def test_methods_throughput_smoke_run_reports_ours_and_the_padded_baseline(tmp_path):
    out = tmp_path / "methods.json"
    subprocess.run([sys.executable, str(BENCH / "methods_throughput.py"), "--task", "arithmetic",
                    "--methods", "graddiff", "npo", "--seq-len", "64", "--steps", "3", "--warmup", "1",
                    "--repeats", "1", "--json", str(out)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["graddiff", "npo"]
    for row in rows:
        assert row["ours"]["tokens_per_s"] > 0 and row["baseline"]["tokens_per_s"] > 0
        assert row["ours"]["useful_share"] > row["baseline"]["useful_share"]  # bucketed / packed vs padded
