"""Smoke runs of the benchmarks: they keep working (no timing is asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, shared_corpus

pytestmark = pytest.mark.slow


def test_every_benchmark_runs_from_one_command_in_smoke_mode(tmp_path):
    shared_corpus("ptb")  # the stages benchmark trains on it
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
    stages = json.loads((tmp_path / "stages.json").read_text())["rows"]
    assert [row["stage"] for row in stages] == [
        "scratch", "scratch", "k-means codes + fine-tune", "k-means codes + fine-tune + distillation"]
    for row in stages:  # the compress command runs for the compressed starts only
        assert row["seconds_per_update"] > 0
        assert (row["compress_seconds"] is not None) == ("k-means" in row["stage"]), row


def test_the_gpu_session_runs_every_part_on_the_cpu_in_smoke_mode(tmp_path):
    from conftest import SHARED_DATA, shared_corpus

    for corpus in ("ptb", "wikitext2", "multi30k"):
        shared_corpus(corpus)
    out = tmp_path / "out"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_session.py"), "--cpu-smoke",
                    "--out", str(out), "--work", str(tmp_path / "work"), "--data", SHARED_DATA, "--budget", "400"],
                   check=True, capture_output=True)
    files = sorted(path.name for path in out.iterdir())
    assert files == ["layers.json", "logs.tar.gz", "precision.json", "recipes.json", "speed.json", "tests.json",
                     "vocabulary.json"]  # at most 8 files come back from the GPU machine
    parts = {name[:-5]: json.loads((out / name).read_text()) for name in files if name.endswith(".json")}
    assert parts["tests"]["exit_status"] == 0 and "passed" in parts["tests"]["summary"]
    for row in parts["layers"]["rows"]:
        assert row["auto"] in ("pool-scores", "materialize")
        assert all(row[variant]["ms"] > 0 for variant in ("dense", "rshare pool-scores", "rshare materialize"))
    runs = parts["precision"]["runs"]
    assert runs["float32"]["finite"] and runs["bfloat16"]["finite"] and "gap_to_float32" in runs["bfloat16"]
    assert "--fp16 trains on a CUDA GPU only" in runs["float16"]["error"]  # no GPU here
    assert all(run["updates"] > 0 and run["words_per_second"] > 0 for run in parts["speed"]["runs"])
    assert parts["vocabulary"]["largest dense"] > 0 and parts["vocabulary"]["largest rshare 1 %"] > 0
    assert [run["exit_status"] for run in parts["recipes"]["runs"]] == [0, 0]
    assert all("result" in run for run in parts["recipes"]["runs"])
