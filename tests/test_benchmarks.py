"""Smoke runs of the benchmarks: they keep working (no timing is asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_every_benchmark_runs_from_one_command_in_smoke_mode(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run_all.py"), "--smoke",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    rows = json.loads((tmp_path / "training.json").read_text())["rows"]
    runs = {(row["case"], variant): run for row in rows for variant, run in row["runs"].items()}
    assert len(runs) == 8
    for (case, variant), run in runs.items():
        assert run["ok"], (case, variant, run)
        assert run["words_per_second"] > 0 and run["peak_rss_mb"] > 0
        assert ("steady_words_per_second" in run) == ("1BW" not in case), (case, variant, run)  # 3 updates there
    for case in {case for case, _ in runs}:
        assert runs[(case, "rshare 1 %")]["checkpoint_bytes"] < runs[(case, "dense")]["checkpoint_bytes"]
    assert {path for _, variant in runs for path in ("pool-scores", "materialize", "auto") if variant.endswith(path)} == {
        "pool-scores", "materialize", "auto"}
    for (case, variant), run in runs.items():  # the LM runs also time fairseq-eval-lm
        assert ("eval_tokens_per_second" in run) == ("1BW" not in case), (case, variant, run)
    layers = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert {row["layer"] for row in layers} == {"output", "input"}
    for row in layers:
        for variant in ("dense", "rshare") + (("rshare-lprobs",) if row["layer"] == "output" else ()):
            assert math.isfinite(row[variant]["seconds"]) and row[variant]["seconds"] > 0
            assert row[variant]["peak_rss_mb"] > 0
        assert row["dense"]["params"] == row["V"] * row["H"]
        if row["layer"] == "output":
            assert row["bound_seconds"] > 0 and row["dense-kept"]["seconds"] > 0 and row["rshare-kept"]["seconds"] > 0
    assert "| output | 2,000 | 64 |" in (tmp_path / "layers.md").read_text()
    for name in ("layers", "training"):
        assert (tmp_path / f"{name}.md").stat().st_size > 0
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
