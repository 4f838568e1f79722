"""recipes/average_checkpoints.py on synthetic fairseq-shaped checkpoints: the average against
one computed here, memory (one checkpoint's optimizer state at a time) and the one-line errors."""
import os
import subprocess
import sys
import weakref

import pytest
import torch

from conftest import REPO
from recipes import average_checkpoints

SCRIPT = os.path.join(REPO, "recipes", "average_checkpoints.py")


def checkpoint(epoch, **model_changes):
    """A checkpoint shaped as fairseq saves one: float32 and float16 weights that differ by
    epoch, an rshare integer buffer equal in all, Adam state twice the size of the weights."""
    generator = torch.Generator().manual_seed(epoch)
    model = {"encoder.weight": torch.randn(6, 4, generator=generator),
             "decoder.bias": torch.randn(5, generator=generator).half(),
             "encoder.rshare.mapping_fingerprint": torch.tensor([7, 2**62 - 3])}
    model.update(model_changes)
    adam = {index: {"exp_avg": torch.randn(value.shape, generator=generator),
                    "exp_avg_sq": torch.rand(value.shape, generator=generator)}
            for index, value in enumerate(model.values()) if value.is_floating_point()}
    return {"model": model, "cfg": {"common": {"seed": 1}, "epoch": epoch},
            "optimizer_history": [{"num_updates": 10 * epoch}], "extra_state": {"epoch": epoch},
            "last_optimizer_state": {"state": adam, "param_groups": [{"lr": 0.1}]}}


@pytest.fixture
def run(tmp_path):
    """A --save-dir with epoch checkpoints 1-4 and a checkpoint_last.pt."""
    folder = tmp_path / "run"
    folder.mkdir()
    for epoch in range(1, 5):
        torch.save(checkpoint(epoch), folder / f"checkpoint{epoch}.pt")
    torch.save(checkpoint(4), folder / "checkpoint_last.pt")
    return folder


def error_line(*args):
    """The message the script (run in this process) stops with."""
    with pytest.raises(SystemExit) as stop:
        average_checkpoints.main([*map(str, args)])
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
    assert stop.value.code.startswith("average_checkpoints: error: ")
    return stop.value.code


def test_the_average_is_the_mean_of_the_last_epochs_weights(run, tmp_path):
    output = tmp_path / "new" / "folder" / "average.pt"  # a missing folder is created
    result = subprocess.run([sys.executable, SCRIPT, run, "--last", "3", "--output", output],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    averaged = torch.load(output, weights_only=True)
    models = [checkpoint(epoch)["model"] for epoch in (2, 3, 4)]
    for key in ("encoder.weight", "decoder.bias"):
        expected = torch.stack([model[key].double() for model in models]).mean(0)
        assert averaged["model"][key].dtype == models[0][key].dtype
        assert torch.allclose(averaged["model"][key].double(), expected, rtol=1e-3 if key == "decoder.bias" else 1e-6)
    assert torch.equal(averaged["model"]["encoder.rshare.mapping_fingerprint"], torch.tensor([7, 2**62 - 3]))
    assert averaged["cfg"]["epoch"] == 4 and averaged["optimizer_history"] == [{"num_updates": 40}]
    assert "last_optimizer_state" not in averaged
    assert averaged["averaged_checkpoints"] == ["checkpoint2.pt", "checkpoint3.pt", "checkpoint4.pt"]
    assert sorted(os.listdir(output.parent)) == ["average.pt"]


def test_one_checkpoints_optimizer_state_and_weights_at_a_time(run, monkeypatch):
    """Every tensor of a checkpoint but the running sums is freed before the next one is read."""
    loaded = []
    load = torch.load

    def tracked_load(path, **kwargs):
        assert all(tensor() is None for tensor in loaded), f"an earlier checkpoint is alive while reading {path}"
        state = load(path, **kwargs)
        adam = state["last_optimizer_state"]["state"].values()
        loaded.extend(weakref.ref(tensor) for moments in adam for tensor in moments.values())
        loaded.extend(weakref.ref(tensor) for tensor in state["model"].values() if tensor.is_floating_point())
        return state

    monkeypatch.setattr(torch, "load", tracked_load)
    paths = [str(run / f"checkpoint{epoch}.pt") for epoch in range(1, 5)]
    averaged = average_checkpoints.average(paths)
    assert len(loaded) == 4 * 6 and "last_optimizer_state" not in averaged


def test_checkpoints_with_other_weights_are_one_line_naming_both(run, tmp_path):
    torch.save(checkpoint(3, **{"decoder.extra": torch.zeros(2)}), run / "checkpoint3.pt")
    line = error_line(run, "--last", "3", "--output", tmp_path / "average.pt")
    assert f"{run / 'checkpoint2.pt'} and {run / 'checkpoint3.pt'} hold different weights" in line
    assert "first differing key: decoder.extra" in line
    assert not (tmp_path / "average.pt").exists()


def test_weights_of_another_shape_are_one_line(run, tmp_path):
    torch.save(checkpoint(4, **{"encoder.weight": torch.zeros(6, 5)}), run / "checkpoint4.pt")
    line = error_line(run, "--last", "2", "--output", tmp_path / "average.pt")
    assert f"encoder.weight has shape [6, 4] in {run / 'checkpoint3.pt'} but [6, 5] in {run / 'checkpoint4.pt'}" in line


def test_the_output_cannot_be_an_input(run):
    before = (run / "checkpoint4.pt").read_bytes()
    line = error_line(run, "--last", "2", "--output", run / "." / "checkpoint4.pt")
    assert "is one of the checkpoints averaged" in line
    assert (run / "checkpoint4.pt").read_bytes() == before


def test_an_unwritable_output_is_one_line_and_leaves_no_partial_file(run, tmp_path):
    (tmp_path / "a-file").write_text("")
    line = error_line(run, "--last", "2", "--output", tmp_path / "a-file" / "average.pt")
    assert f"cannot write {tmp_path / 'a-file' / 'average.pt'}" in line
    assert sorted(os.listdir(tmp_path)) == ["a-file", "run"]
