import argparse
import os
import subprocess

import pytest
import torch

import fairseq_rshare  # noqa: F401
from fairseq.data import Dictionary
from fairseq_rshare.models.rshare_lstm_lm import RShareLSTMLanguageModel, rshare_lstm_lm_architecture
from fairseq_rshare.tools import fairseq_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_rshare")
SHARED_DATA = os.environ.get("RSHARE_DATA", os.path.join(REPO, "..", "shared", "data"))
# Threads for each test and each command it runs: the cores shared among pytest-xdist's workers
# (more threads than cores would make OpenMP's workers wait on each other).
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)


def shared_corpus(name):
    """Path of a corpus in ../shared/data, or skip the test when it is not there (fail instead
    with RSHARE_REQUIRE_DATA=1, as CI sets it when the corpora exist, so none skips silently)."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        if os.environ.get("RSHARE_REQUIRE_DATA") == "1":
            pytest.fail(f"real corpus {name} not found under {SHARED_DATA}, and RSHARE_REQUIRE_DATA=1")
        pytest.skip(f"real corpus {name} not found under {SHARED_DATA} (set RSHARE_DATA)")
    return path


def fairseq(tool, *args, check=True, stdin=None, cwd=None):
    """Run a stock fairseq command-line tool; return the CompletedProcess (stdout+stderr text)."""
    command = [*fairseq_tool(tool), *map(str, args)]
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    if check and result.returncode:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def head(src, dst, lines):
    with open(src) as fin, open(dst, "w") as fout:
        for i, line in enumerate(fin):
            if i >= lines:
                break
            fout.write(line)


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """A slice of PTB, binarised by fairseq-preprocess."""
    ptb = shared_corpus("ptb")
    root = tmp_path_factory.mktemp("lm")
    for split, lines in (("train", 2000), ("valid", 200), ("test", 200)):
        head(os.path.join(ptb, f"{split}.txt"), root / f"{split}.txt", lines)
    fairseq("fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt",
            "--validpref", root / "valid.txt", "--testpref", root / "test.txt",
            "--destdir", root / "bin", "--workers", "1")
    return root / "bin"


@pytest.fixture(scope="session")
def nmt_data(tmp_path_factory):
    """A slice of Multi30k de-en, lowercased and whitespace-tokenised, with a joined dictionary."""
    multi30k = shared_corpus("multi30k")
    root = tmp_path_factory.mktemp("nmt")
    for split, name, lines in (("train", "train", 3000), ("valid", "val", 100), ("test", "test2016", 20)):
        for lang in ("de", "en"):
            head(os.path.join(multi30k, f"{name}.{lang}"), root / f"raw.{lang}", lines)
            text = (root / f"raw.{lang}").read_text().lower()
            for mark in ".,!?":
                text = text.replace(mark, f" {mark}")
            (root / f"{split}.{lang}").write_text(text)
    fairseq("fairseq-preprocess", "--source-lang", "de", "--target-lang", "en",
            "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
            "--destdir", root / "bin", "--joined-dictionary", "--thresholdsrc", "2",
            "--thresholdtgt", "2", "--workers", "1")
    return root / "bin"


def tiny_lm(**overrides):
    """A 2 x 16 rshare LSTM language model over 64 words, in eval mode; overrides are its args."""
    dictionary = Dictionary()
    for i in range(60):
        dictionary.add_symbol(f"w{i}", n=100 - i)
    args = argparse.Namespace(decoder_embed_dim=16, decoder_hidden_size=16, decoder_out_embed_dim=16,
                              decoder_layers=2, dropout=0.0, rshare_subvectors=4, rshare_ratio=0.5,
                              **overrides)
    rshare_lstm_lm_architecture(args)
    task = argparse.Namespace(target_dictionary=dictionary, source_dictionary=dictionary)
    torch.manual_seed(0)
    return RShareLSTMLanguageModel.build_model(args, task).eval()
