"""Faults through the real fairseq CLI: SIGKILL and resume, distributed ranks, bad checkpoints, bad data."""
import os
import re
import signal
import socket
import subprocess

import pytest

from conftest import USER_DIR, fairseq, head, shared_corpus
from fairseq_rshare.tools import fairseq_tool

pytestmark = pytest.mark.slow


TASKS = {
    "language_modeling": ["--task", "language_modeling", "--max-tokens", "512"],
    "stateful_lm": ["--task", "stateful_lm", "--batch-size", "8", "--batch-size-valid", "4"],
}


def lm_flags(data, save_dir, *extra, task="language_modeling"):
    return [data, "--user-dir", USER_DIR, *TASKS[task], "--arch", "rshare_lstm_lm",
            "--decoder-embed-dim", "32", "--decoder-hidden-size", "32",
            "--decoder-out-embed-dim", "32", "--optimizer", "adam", "--lr", "0.005",
            "--tokens-per-sample", "32", "--cpu", "--seed", "1",
            "--log-format", "simple", "--log-interval", "1", "--no-progress-bar",
            "--required-batch-size-multiple", "1", "--save-dir", save_dir, *extra]


def final_valid_loss(log):
    return float(re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)[-1])


def start(tool, *args):
    return subprocess.Popen(
        [*fairseq_tool(tool), *map(str, args)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(lm_data, tmp_path, task):
    flags = ["--max-update", "40", "--save-interval-updates", "10", "--dropout", "0.1",
             "--no-epoch-checkpoints"]
    uninterrupted = fairseq("fairseq-train", *lm_flags(lm_data, tmp_path / "full", *flags, task=task))

    killed = start("fairseq-train", *lm_flags(lm_data, tmp_path / "killed", *flags, task=task))
    for line in killed.stdout:
        if "num_updates=25," in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL

    resumed = fairseq("fairseq-train", *lm_flags(lm_data, tmp_path / "killed", *flags, task=task))
    log = resumed.stdout + resumed.stderr
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ 20 updates\)", log)
    full_loss = final_valid_loss(uninterrupted.stdout + uninterrupted.stderr)
    # stateful_lm resumes at the next window but with the carried state back at zero, so its
    # loss is close to, not equal to, the uninterrupted run's.
    assert abs(final_valid_loss(log) - full_loss) < (1e-3 if task == "language_modeling" else 0.02 * full_loss)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_ranks(data, save_dir, rank_flags, task="language_modeling"):
    port = free_port()
    ranks = [
        start("fairseq-train", *lm_flags(data, save_dir, "--dropout", "0", "--max-update", "20",
                                         "--no-save", *extra, task=task),
              "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
              "--distributed-init-method", f"tcp://127.0.0.1:{port}",
              "--distributed-world-size", "2", "--distributed-rank", rank,
              "--distributed-no-spawn", "--device-id", "0")
        for rank, extra in enumerate(rank_flags)
    ]
    return [rank.communicate(timeout=300)[0] for rank in ranks], [rank.returncode for rank in ranks]


def test_two_gloo_ranks_train_like_one_process_with_twice_the_batch(lm_data, tmp_path):
    logs, codes = distributed_ranks(lm_data, tmp_path, [[], []])
    assert codes == [0, 0], logs[0][-3000:]
    single = fairseq("fairseq-train", *lm_flags(lm_data, tmp_path, "--dropout", "0",
                                                "--max-update", "20", "--no-save",
                                                "--update-freq", "2"))
    assert "distributed init (rank 1)" in logs[1]
    assert abs(final_valid_loss(logs[0]) - final_valid_loss(single.stdout + single.stderr)) < 1e-3


def test_two_gloo_ranks_carry_their_own_streams_like_one_process_with_all_of_them(lm_data, tmp_path):
    """Each rank takes its B of the 2B streams, so two ranks of --batch-size 8 train exactly like
    one process of --batch-size 16 (and validate on the same streams)."""
    logs, codes = distributed_ranks(lm_data, tmp_path, [[], []], task="stateful_lm")
    assert codes == [0, 0], logs[0][-3000:]
    single = fairseq("fairseq-train", *lm_flags(lm_data, tmp_path, "--dropout", "0", "--max-update", "20",
                                                "--no-save", "--batch-size", "16", "--batch-size-valid", "8",
                                                task="stateful_lm"))
    assert abs(final_valid_loss(logs[0]) - final_valid_loss(single.stdout + single.stderr)) < 1e-3


def test_ranks_with_different_mappings_stop_with_a_clear_error(lm_data, tmp_path):
    logs, codes = distributed_ranks(lm_data, tmp_path, [[], ["--rshare-seed", "2"]])
    assert codes[0] != 0 and codes[1] != 0
    for log in logs:
        assert "fairseq_rshare: error: the ranks built different rshare mappings" in log


def test_unreadable_checkpoints_fail_with_one_clear_message(lm_data, tmp_path):
    fairseq("fairseq-train", *lm_flags(lm_data, tmp_path / "good", "--max-update", "2"))
    good = (tmp_path / "good" / "checkpoint_last.pt").read_bytes()
    bad_files = {"truncated": good[: len(good) // 2], "garbage": b"not a checkpoint\n", "empty": b""}
    for name, content in bad_files.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", path,
                         "--cpu", check=False)
        assert result.returncode != 0
        assert f"fairseq_rshare: error: cannot read checkpoint {path}" in result.stderr
        assert "Traceback" not in result.stderr

    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "checkpoint_last.pt").write_bytes(bad_files["truncated"])
    result = fairseq("fairseq-train", *lm_flags(lm_data, resume_dir, "--max-update", "4"),
                     check=False)
    assert result.returncode != 0 and "cannot read checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_training_data_fails_with_one_clear_message(tmp_path):
    ptb = shared_corpus("ptb")
    (tmp_path / "train.txt").write_text("")
    fairseq("fairseq-preprocess", "--only-source", "--trainpref", tmp_path / "train.txt",
            "--validpref", os.path.join(ptb, "valid.txt"), "--destdir", tmp_path / "bin")
    result = fairseq("fairseq-train", *lm_flags(tmp_path / "bin", tmp_path / "ckpt",
                                                "--max-update", "2"), check=False)
    assert result.returncode != 0
    assert "was the training data empty?" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("task,empty", [("language_modeling", "valid"), ("stateful_lm", "valid"), ("stateful_lm", "train")])
def test_an_empty_split_fails_with_one_line_naming_it(lm_data, tmp_path, task, empty):
    """An empty text file given to fairseq-preprocess (with --srcdict, so the dictionary is not
    empty) makes an empty .bin file, which fairseq cannot map."""
    ptb = shared_corpus("ptb")
    for split in ("train", "valid"):
        head(os.path.join(ptb, f"{split}.txt"), tmp_path / f"{split}.txt", 0 if split == empty else 200)
    fairseq("fairseq-preprocess", "--only-source", "--srcdict", lm_data / "dict.txt", "--trainpref",
            tmp_path / "train.txt", "--validpref", tmp_path / "valid.txt", "--destdir", tmp_path / "bin",
            "--workers", "1")
    result = fairseq("fairseq-train", *lm_flags(tmp_path / "bin", tmp_path / "ckpt", "--max-update", "2",
                                                task=task), check=False)
    assert result.returncode != 0
    assert (f"fairseq_rshare: error: the {empty} split is empty ({tmp_path / 'bin' / empty}.bin): give "
            f"fairseq-preprocess a --{empty}pref text file with at least one line") in result.stderr
    assert "Traceback" not in result.stderr
