"""fairseq-rshare-export: tiny rshare models trained with the real fairseq CLI, exported, then
loaded by stock fairseq (and CTranslate2) in processes that never import the plugin."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import USER_DIR, fairseq

pytestmark = pytest.mark.slow

COMMON = ["--user-dir", USER_DIR, "--cpu", "--optimizer", "adam", "--lr", "0.01",
          "--max-tokens", "2048", "--no-progress-bar", "--log-format", "simple",
          "--no-epoch-checkpoints", "--seed", "1", "--disable-validation"]
LM_TASK = ["--task", "language_modeling", "--tokens-per-sample", "32"]
NMT_TASK = ["--task", "translation", "--source-lang", "de", "--target-lang", "en"]
TINY_TRANSFORMER = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
                    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2", "--rshare-subvectors", "4"]

# One case per family, named by its parent arch, each with its own tying: the untied LSTM LM
# has an output bias (the parent's fc_out.bias), the transformer LM ties its output layer to its
# input table, the LSTM shares all three tables, the transformer has three separate ones (and
# trains 60 updates, enough to end its translations, for the CTranslate2 comparison).
CASES = {
    "lstm_lm": (LM_TASK, ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32",
                          "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
                          "--rshare-output-bias", "--max-update", "30"]),
    "transformer_lm": (LM_TASK, ["--arch", "rshare_transformer_lm", "--decoder-layers", "1",
                                 "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                                 "--decoder-attention-heads", "2",
                                 "--share-decoder-input-output-embed", "--max-update", "30"]),
    "lstm": (NMT_TASK, ["--arch", "rshare_lstm", "--encoder-embed-dim", "32",
                        "--encoder-hidden-size", "32", "--decoder-embed-dim", "32",
                        "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
                        "--share-all-embeddings", "--max-update", "30"]),
    "transformer": (NMT_TASK, ["--arch", "rshare_transformer", *TINY_TRANSFORMER,
                               "--max-update", "60"]),
}


def export(*args):
    """Run the export command; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "fairseq_rshare.cli.export", *map(str, args)],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def exported(lm_data, nmt_data, tmp_path_factory):
    """Train each case once (on first use) and export it; return (rshare, exported) paths."""
    cache = {}

    def get(case):
        if case not in cache:
            task, flags = CASES[case]
            save_dir = tmp_path_factory.mktemp(case)
            data = lm_data if task is LM_TASK else nmt_data
            fairseq("fairseq-train", data, *COMMON, *task, *flags, "--save-dir", save_dir)
            rshare, dense = save_dir / "checkpoint_last.pt", save_dir / "exported.pt"
            result = export(rshare, dense)
            assert result.returncode == 0, result.stderr
            assert f"a stock {case} checkpoint" in result.stdout
            cache[case] = rshare, dense
        return cache[case]

    return get


LOG_PROBS = """
import sys, torch
if sys.argv[3] == "plugin":
    import fairseq_rshare
from fairseq import checkpoint_utils
from fairseq.models import FairseqEncoderDecoderModel
[model], _ = checkpoint_utils.load_model_ensemble([sys.argv[1]])
model.eval()
torch.manual_seed(0)
tokens = torch.randint(4, len(model.decoder.dictionary), (3, 9))
with torch.no_grad():
    if isinstance(model, FairseqEncoderDecoderModel):
        output = model(tokens, torch.full((3,), 9), tokens)
    else:
        output = model(tokens)
    log_probs = model.get_normalized_probs(output, log_probs=True)
assert ("fairseq_rshare" in sys.modules) == (sys.argv[3] == "plugin")
torch.save(log_probs, sys.argv[2])
"""


def log_probs(checkpoint, out, plugin):
    subprocess.run([sys.executable, "-c", LOG_PROBS, str(checkpoint), str(out),
                    "plugin" if plugin else "stock"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return torch.load(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_checkpoint_loads_without_the_plugin_with_the_same_log_probs(case, exported, tmp_path):
    rshare, dense = exported(case)
    state = torch.load(dense)  # weights_only: what stock fairseq does
    assert state["cfg"]["model"]["_name"] == case  # the parent arch
    assert not [key for key in state["cfg"]["model"] if key.startswith("rshare_")]
    assert state["cfg"]["common"]["user_dir"] is None and "last_optimizer_state" not in state
    assert not [key for key in state["model"] if "pool" in key or "fingerprint" in key]
    expected = log_probs(rshare, tmp_path / "rshare.pt", plugin=True)
    actual = log_probs(dense, tmp_path / "dense.pt", plugin=False)
    assert actual.shape == expected.shape and expected.shape[-1] > 1000
    assert (actual - expected).abs().max().item() <= 1e-5


def eval_lm(data, checkpoint, *plugin):
    result = fairseq("fairseq-eval-lm", data, *plugin, "--path", checkpoint, "--gen-subset", "test",
                     "--tokens-per-sample", "32", "--cpu", "--required-batch-size-multiple", "1")
    return re.findall(r"Loss \(base 2\): [\d.]+, Perplexity: [\d.]+", result.stdout + result.stderr)


def generate(data, checkpoint, *flags):
    """fairseq-generate's hypotheses on the test split: {sentence id: (base-2 score, tokens)}."""
    result = fairseq("fairseq-generate", data, *flags, "--path", checkpoint, "--gen-subset", "test",
                     "--beam", "5", "--lenpen", "1", "--batch-size", "8", "--cpu",
                     "--required-batch-size-multiple", "1")
    lines = [line.split("\t") for line in result.stdout.splitlines() if line.startswith("H-")]
    return {int(key[2:]): (float(score), tokens) for key, score, tokens in lines}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fairseq_tools_without_the_plugin_give_the_same_output(case, exported, lm_data, nmt_data):
    rshare, dense = exported(case)
    if CASES[case][0] is LM_TASK:
        perplexity = eval_lm(lm_data, rshare, "--user-dir", USER_DIR)
        assert len(perplexity) == 1 and eval_lm(lm_data, dense) == perplexity
    else:
        short = ("--max-len-a", "1.2", "--max-len-b", "10")
        expected = generate(nmt_data, rshare, "--user-dir", USER_DIR, *short)
        actual = generate(nmt_data, dense, *short)
        assert len(expected) == 20 and actual.keys() == expected.keys()
        for i, (score, tokens) in expected.items():
            assert actual[i][1] == tokens and actual[i][0] == pytest.approx(score, abs=1e-4)


def test_ctranslate2_translates_the_exported_transformer_as_fairseq_generate(exported, nmt_data, tmp_path):
    """Same beam (5), length normalisation (CTranslate2's length_penalty=1 divides by the length
    with </s>, as fairseq's --lenpen 1 does) and start token (</s>, which the converter sets)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    _, dense = exported("transformer")
    for model, quantization in (("ct2", []), ("ct2-int8", ["--quantization", "int8"])):
        fairseq("ct2-fairseq-converter", "--model_path", dense, "--data_dir", nmt_data,
                "--output_dir", tmp_path / model, *quantization)
    expected = generate(nmt_data, dense)
    assert len(expected) == 20 and max(len(tokens.split()) for _, tokens in expected.values()) < 50
    source = [line.split() for line in (nmt_data.parent / "test.de").read_text().splitlines()]
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", intra_threads=1)
    results = translator.translate_batch(source, beam_size=5, length_penalty=1, return_scores=True)
    assert [" ".join(r.hypotheses[0]) for r in results] == [expected[i][1] for i in range(20)]
    for i, r in enumerate(results):  # fairseq prints base-2 scores
        assert r.scores[0] / math.log(2) == pytest.approx(expected[i][0], abs=1e-3)
    int8 = ctranslate2.Translator(str(tmp_path / "ct2-int8"), device="cpu", intra_threads=1)
    translations = int8.translate_batch(source, beam_size=5, length_penalty=1)
    assert len(translations) == 20 and all(r.hypotheses[0] for r in translations)


def assert_one_line_error(result, message):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("fairseq-rshare-export: error: ") and message in errors[0]


def test_missing_checkpoint_fails_with_one_line(tmp_path):
    result = export(tmp_path / "missing.pt", tmp_path / "out.pt")
    assert_one_line_error(result, f"no checkpoint at {tmp_path / 'missing.pt'}")


def test_non_rshare_checkpoint_fails_with_one_line(exported, tmp_path):
    _, dense = exported("lstm_lm")  # a stock lstm_lm checkpoint
    result = export(dense, tmp_path / "out.pt")
    assert_one_line_error(result, "is not an rshare checkpoint (architecture lstm_lm)")
    assert not (tmp_path / "out.pt").exists()


def test_output_bias_without_a_place_in_the_parent_fails_with_one_line(exported, tmp_path):
    """The stock transformer's output projection has no bias: a checkpoint with one (made here
    by adding a zero bias to a trained one) cannot be exported faithfully."""
    rshare, dense = exported("transformer")
    state = torch.load(rshare, weights_only=False)  # it holds an argparse.Namespace
    state["cfg"]["model"].rshare_output_bias = True
    vocabulary = len(torch.load(dense)["model"]["decoder.output_projection.weight"])
    state["model"]["decoder.output_projection.bias"] = torch.zeros(vocabulary)
    torch.save(state, tmp_path / "bias.pt")
    result = export(tmp_path / "bias.pt", tmp_path / "out.pt")
    assert_one_line_error(result, "the stock transformer output layer has no bias")
