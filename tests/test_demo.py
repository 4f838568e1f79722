import subprocess
import sys

import pytest

from fairseq_rshare.demo import make_corpus

DEMO = [sys.executable, "-m", "fairseq_rshare.demo"]


def test_generated_corpus_is_zipfian_and_split(tmp_path):
    make_corpus(tmp_path, vocab_size=500, sentences=(2000, 100, 100))
    train = (tmp_path / "train.txt").read_text().split()
    counts = sorted((train.count(w) for w in set(train)), reverse=True)
    assert all((tmp_path / f"{s}.txt").exists() for s in ("train", "valid", "test"))
    assert counts[0] > 10 * counts[len(counts) // 2]


def test_missing_data_files_fail_with_one_clear_message(tmp_path):
    (tmp_path / "train.txt").write_text("a b c\n")
    result = subprocess.run([*DEMO, "--data", str(tmp_path), "--work-dir", str(tmp_path / "w")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "lacks valid.txt, test.txt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_trains_both_models_and_prints_the_table(tmp_path):
    result = subprocess.run(
        [*DEMO, "--work-dir", str(tmp_path), "--minutes", "0.15", "--hidden", "32"],
        capture_output=True, text=True, check=True,
    )
    rows = {line.split("|")[0].strip(): line for line in result.stdout.splitlines()
            if line.startswith(("dense ", "rshare "))}
    assert set(rows) == {"dense", "rshare"}
    perplexities = {name: float(row.split("|")[1]) for name, row in rows.items()}
    assert all(1 < ppl < 3000 for ppl in perplexities.values())
    dense_input = int(rows["dense"].split("|")[2].replace(",", ""))
    rshare_input = int(rows["rshare"].split("|")[2].replace(",", ""))
    assert rshare_input < dense_input / 10
    assert "training dense for" in result.stdout and "training rshare for" in result.stdout
