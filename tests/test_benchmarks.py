"""Smoke runs of the benchmarks: they keep working (no timing is asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_layer_benchmark_smoke_run_writes_json_and_table(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_layers.py"), "--smoke",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    rows = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert {row["layer"] for row in rows} == {"output", "input"}
    for row in rows:
        for variant in ("dense", "rshare"):
            assert math.isfinite(row[variant]["seconds"]) and row[variant]["seconds"] > 0
            assert row[variant]["peak_rss_mb"] > 0
        assert row["dense"]["params"] == row["V"] * row["H"]
    assert "| output | 2,000 | 64 |" in (tmp_path / "layers.md").read_text()
