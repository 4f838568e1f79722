import argparse
import datetime

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_rshare import RShareCheckpointError


def test_checkpoints_holding_namespace_load_with_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(arch="rshare_lstm_lm"), "model": {"w": torch.ones(2)}}, path)
    state = torch.load(path)  # torch's default: weights_only=True
    assert state["args"].arch == "rshare_lstm_lm" and torch.equal(state["model"]["w"], torch.ones(2))


def test_other_pickled_objects_stay_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"args": None, "model": {}, "extra": datetime.timedelta(days=1)}, path)
    with pytest.raises(RShareCheckpointError, match="cannot read checkpoint .*Weights only load failed"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
