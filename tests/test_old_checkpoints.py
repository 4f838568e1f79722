"""Checkpoints written by an earlier release keep loading, and keep giving the same outputs: one
tiny checkpoint of each model family (tests/data/old_checkpoints/make.py wrote them), loaded
through fairseq and run on the batch whose log-probabilities were saved beside it."""
import os

import pytest
import torch
from fairseq import checkpoint_utils

import fairseq_rshare  # noqa: F401
from conftest import REPO
from fairseq_rshare.checkpoints import FAIRSEQ_GLOBALS

OLD = os.path.join(REPO, "tests", "data", "old_checkpoints")
FAMILIES = {"lstm_lm": "lm", "transformer_lm": "lm", "lstm": "nmt", "transformer": "nmt"}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_old_checkpoint_loads_and_gives_its_saved_outputs(family):
    kind = FAMILIES[family]
    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):  # fairseq 0.12 saves argparse.Namespace
        [model], _ = checkpoint_utils.load_model_ensemble(
            [os.path.join(OLD, f"{family}.pt")], arg_overrides={"data": os.path.join(OLD, kind)})
    model.eval()
    expected = torch.load(os.path.join(OLD, f"{family}.expected.pt"))
    tokens = expected["tokens"]
    with torch.no_grad():
        if kind == "lm":
            output = model(tokens)
        else:
            output = model(tokens, torch.tensor([tokens.shape[1]] * tokens.shape[0]), tokens.flip(1))
        lprobs = model.get_normalized_probs(output, log_probs=True)
    torch.testing.assert_close(lprobs, expected["lprobs"], rtol=1e-5, atol=1e-5)
