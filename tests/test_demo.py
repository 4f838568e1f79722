import os
import subprocess
import sys

import pytest

from fairseq_rshare.cli.demo import make_corpus, training_speed
from fairseq_rshare.tools import fairseq_tool

DEMO = [sys.executable, "-m", "fairseq_rshare.cli.demo"]


def test_generated_corpus_is_zipfian_and_split(tmp_path):
    make_corpus(tmp_path, vocab_size=500, sentences=(2000, 100, 100))
    train = (tmp_path / "train.txt").read_text().split()
    counts = sorted((train.count(w) for w in set(train)), reverse=True)
    assert all((tmp_path / f"{s}.txt").exists() for s in ("train", "valid", "test"))
    assert counts[0] > 10 * counts[len(counts) // 2]


def test_training_speed_covers_the_whole_run():
    log = (
        "| INFO | train | epoch 001 | loss 9 | wps 1000 | ups 0.2 | wpb 4000 | bsz 64 | num_updates 100 | lr 0.003\n"
        "| INFO | train | epoch 002 | loss 8 | wps 4000 | ups 1 | wpb 2000 | bsz 32 | num_updates 150 | lr 0.003\n"
    )
    # 400,000 words in 400 s, then 100,000 words in 25 s
    assert training_speed(log) == (150, 500_000 / 425)
    # a run resumed from a checkpoint saved at an epoch's end logs that epoch again, empty
    resumed_at_the_end = "| INFO | train | epoch 003 | loss 8 | wps 0 | ups 0 | wpb 0 | bsz 0 | num_updates 150 | lr 0.003\n"
    assert training_speed(log + resumed_at_the_end) == (150, 500_000 / 425)


def test_fairseq_tools_are_found_beside_the_running_python(monkeypatch, tmp_path):
    (tmp_path / "fairseq-train").write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert fairseq_tool("fairseq-train") == [str(tmp_path / "fairseq-train")]
    assert fairseq_tool("fairseq-eval-lm") == [str(tmp_path / "python"), "-m", "fairseq_cli.eval_lm"]


def test_missing_data_files_fail_with_one_clear_message(tmp_path):
    (tmp_path / "train.txt").write_text("a b c\n")
    result = subprocess.run([*DEMO, "--data", str(tmp_path), "--work-dir", str(tmp_path / "w")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "lacks valid.txt, test.txt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_script_trains_both_models_equally_without_the_venv_on_path(tmp_path):
    """The installed console script, by its full path, with the virtualenv's bin off PATH (not
    activated): the fairseq tools are found beside its Python."""
    script = os.path.join(os.path.dirname(sys.executable), "fairseq-rshare-demo")
    assert os.path.exists(script), f"{script} missing: pip install -e . first"
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d != os.path.dirname(sys.executable))
    result = subprocess.run(
        [script, "--work-dir", str(tmp_path), "--max-update", "3", "--hidden", "32"],
        capture_output=True, text=True, env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    columns = [cell.strip() for cell in header.split("|")]
    rows = {cells[0]: dict(zip(columns, cells)) for line in lines if line.startswith(("dense ", "rshare "))
            for cells in [[cell.strip() for cell in line.split("|")]]}
    assert set(rows) == {"dense", "rshare"}
    assert rows["dense"]["updates"] == rows["rshare"]["updates"] == "3"
    assert all(1 < float(row["test ppl"]) < 3000 for row in rows.values())
    assert int(rows["rshare"]["input params"].replace(",", "")) < int(rows["dense"]["input params"].replace(",", "")) / 10
    assert rows["dense"]["speed"] == "1.00x"
    assert "after 3 updates each" in result.stdout
