"""The GPU check script runs end to end where no GPU is: its checks pass on the CPU, its GPU-only
parts say they were skipped, and its JSON holds every section (bench/gpu_check.py); the
tokenizing benchmark runs with 1 and 2 processes."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_its_gpu_parts_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"environment", "checks", "training", "generation", "quickstart"}
    assert all(check["ok"] for check in result["checks"].values()), result["checks"]
    assert result["training"][0]["tokens_per_s"] > 0 and 0 < result["training"][0]["mfu"] <= 1
    assert "skipped: no CUDA device" in run.stderr and "skipped" in result["quickstart"]
    assert "\"benchmark\": \"gpu_check\"" in run.stdout  # the JSON, after the trainer's log lines


@pytest.mark.slow
def test_tokenize_bench_runs_one_and_two_processes():
    """The figures exist and are positive (their values are the machine's, never asserted)."""
    sys.path.insert(0, ROOT)
    from bench.tokenize_throughput import bench_shards
    result = bench_shards(images=48)
    for name in ("1_process", "2_processes"):
        assert result[f"shards_seconds_{name}"] > 0 and result[f"shards_startup_seconds_{name}"] > 0
        assert result[f"shards_images_per_s_{name}"] > 0
    assert result["shards_2_vs_1_processes"] > 0
