import argparse
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

from fairseq_rshare import RShareCheckpointError, checkpoints


def test_checkpoints_holding_namespace_load_with_weights_only(tmp_path):
    """The plugin's loader allows argparse.Namespace for its load only: afterwards torch's
    safe loading refuses it again."""
    path = tmp_path / "ok.pt"
    torch.save({"args": None, "cfg": {"model": argparse.Namespace(arch="rshare_lstm_lm")},
                "model": {"w": torch.ones(2)}, "extra_state": {},
                "optimizer_history": [{"optimizer_name": "SGD", "lr_scheduler_state": {}, "num_updates": 0}]}, path)
    state = checkpoints.load_checkpoint_to_cpu(str(path))  # torch.load with weights_only=True
    assert state["cfg"].model.arch == "rshare_lstm_lm" and torch.equal(state["model"]["w"], torch.ones(2))
    with pytest.raises(Exception, match="Unsupported global: GLOBAL argparse.Namespace"):
        torch.load(path)


class RunsACommand:
    """Pickles as a call of `function` with `argument`, the way a malicious checkpoint runs code."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function, message", [
    (os.system, "it holds code (posix.system) that torch's safe loading (weights_only) refused to run"),
    (eval, "it holds a pickled eval that torch's safe loading (weights_only) refuses"),
])
def test_checkpoint_that_runs_code_is_refused_as_such(function, message, tmp_path):
    marker = tmp_path / "marker"
    command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "malicious.pt"
    torch.save({"args": None, "model": {}, "extra": RunsACommand(function, command)}, path)
    with pytest.raises(RShareCheckpointError) as raised:
        checkpoints.load_checkpoint_to_cpu(str(path))
    assert message in str(raised.value) and "load only checkpoints you trust" in str(raised.value)
    assert "truncated" not in str(raised.value) and not marker.exists()


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
import json, logging, sys, warnings
import torch
from fairseq import checkpoint_utils

def process_state():
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return {
        "safe globals": repr(torch.serialization.get_safe_globals()),
        "logging handlers": repr({logger.name: logger.handlers for logger in loggers
                                  if getattr(logger, "handlers", None)}),
        "root logging level": logging.getLogger().level,
        "warnings filters": repr(warnings.filters),
        "checkpoint loader": repr(checkpoint_utils.load_checkpoint_to_cpu),
        "excepthook": repr(sys.excepthook),
    }

before = process_state()
import fairseq_rshare
print(json.dumps([before, process_state()]))
"""


def test_importing_the_plugin_in_a_program_changes_nothing_process_wide():
    result = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, check=True)
    before, after = json.loads(result.stdout.splitlines()[-1])
    assert after == before


def test_command_line_tools_are_recognised():
    from fairseq_rshare.cli import running_a_command_line_tool

    assert running_a_command_line_tool("/venv/bin/fairseq-train")
    assert running_a_command_line_tool("/venv/lib/python3.11/site-packages/fairseq_cli/train.py")
    assert not running_a_command_line_tool("/venv/bin/pytest")
    assert not running_a_command_line_tool("")


def test_a_stored_mapping_counts_in_its_tables_parameters():
    """A learned mapping cannot be regenerated, so its packed bytes count, over 4, as float32
    parameters of the table that stores it; a random mapping counts nothing."""
    from fairseq_rshare import RandomSharedEmbedding

    def model_with(mapping_kind):
        model = torch.nn.Module()
        model.decoder = torch.nn.Module()
        model.decoder.embed_tokens = RandomSharedEmbedding(1000, 32, 1, num_subvectors=8, pool_size=800,
                                                           mapping_kind=mapping_kind)
        return model

    plain = checkpoints.count_by_component(model_with("random"), "rshare_lstm_lm")
    learned = checkpoints.count_by_component(model_with("kmeans"), "rshare_lstm_lm")
    assert plain == {"input": 800 * 4, "output": 0, "body": 0}
    # 1000 x 8 slots, each one of 100 entries of its position: 7 bits, 7000 bytes, 1750 floats
    assert learned == {"input": 800 * 4 + 1750, "output": 0, "body": 0}
