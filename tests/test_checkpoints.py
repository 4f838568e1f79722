import argparse
import datetime
import subprocess
import sys

import pytest
import torch

from fairseq_rshare import RShareCheckpointError, checkpoints


def test_checkpoints_holding_namespace_load_with_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(arch="rshare_lstm_lm"), "model": {"w": torch.ones(2)}}, path)
    state = torch.load(path)  # torch's default: weights_only=True
    assert state["args"].arch == "rshare_lstm_lm" and torch.equal(state["model"]["w"], torch.ones(2))


def test_other_pickled_objects_stay_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"args": None, "model": {}, "extra": datetime.timedelta(days=1)}, path)
    with pytest.raises(RShareCheckpointError, match="cannot read checkpoint .*Weights only load failed.*"
                                                    "pickled datetime.timedelta that torch's safe loading"):
        checkpoints.load_checkpoint_to_cpu(str(path))


def test_errors_not_about_the_file_pass_unchanged(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(checkpoints, "_fairseq_load_checkpoint_to_cpu", out_of_memory)
    with pytest.raises(RuntimeError, match="^DefaultCPUAllocator: not enough memory$") as raised:
        checkpoints.load_checkpoint_to_cpu(str(tmp_path / "any.pt"))
    assert not isinstance(raised.value, RShareCheckpointError)


IMPORT_SCRIPT = """
import sys
from fairseq import checkpoint_utils
hook, loader = sys.excepthook, checkpoint_utils.load_checkpoint_to_cpu
import fairseq_rshare
print(sys.excepthook is hook and checkpoint_utils.load_checkpoint_to_cpu is loader)
"""


def test_importing_the_plugin_in_a_program_changes_nothing_process_wide():
    result = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-1] == "True"


def test_command_line_tools_are_recognised():
    from fairseq_rshare.cli import running_a_command_line_tool

    assert running_a_command_line_tool("/venv/bin/fairseq-train")
    assert running_a_command_line_tool("/venv/lib/python3.11/site-packages/fairseq_cli/train.py")
    assert not running_a_command_line_tool("/venv/bin/pytest")
    assert not running_a_command_line_tool("")
