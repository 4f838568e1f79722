"""fairseq-rshare-export: tiny rshare models trained with the real fairseq CLI, exported, then
loaded by stock fairseq (and CTranslate2) in processes that never import the plugin."""
import argparse
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, USER_DIR, fairseq, head, shared_corpus
from fairseq_rshare.cli.export import export as export_checkpoint
from fairseq_rshare.errors import RShareConfigError
from fairseq_rshare.tools import eval_lm_perplexity

# One worker trains the module's shared models (xdist_group) once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export")]

COMMON = ["--user-dir", USER_DIR, "--cpu", "--max-tokens", "2048", "--no-progress-bar",
          "--log-format", "simple", "--no-epoch-checkpoints", "--seed", "1", "--disable-validation"]
ADAM = ["--optimizer", "adam", "--lr", "0.01"]
LM_TASK = ["--task", "language_modeling", "--tokens-per-sample", "32"]
# README's language model: stateful_lm, trained with SGD (whose options fairseq keeps as an
# argparse.Namespace), windows of 20 tokens.
STATEFUL_LM_TASK = ["--task", "stateful_lm", "--batch-size", "20", "--tokens-per-sample", "20"]
NMT_TASK = ["--task", "translation", "--source-lang", "de", "--target-lang", "en"]
TINY_TRANSFORMER = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
                    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2", "--rshare-subvectors", "4"]

# One case per family, named by its parent arch, each with its own tying: the untied LSTM LM
# has an output bias (the parent's fc_out.bias), the transformer LM ties its output layer to its
# input table, the LSTM shares all three tables, the transformer has three separate ones (and
# trains 60 updates, enough to end its translations, for the CTranslate2 comparison).  All train
# with Adam but lstm_lm-stateful, README's model on a smaller scale.
SMALL_LSTM_LM = ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32", "--decoder-hidden-size", "32",
                 "--decoder-out-embed-dim", "32", "--rshare-output-bias", "--max-update", "30"]
CASES = {
    "lstm_lm": (LM_TASK, [*ADAM, *SMALL_LSTM_LM]),
    "lstm_lm-stateful": (STATEFUL_LM_TASK, ["--optimizer", "sgd", "--lr", "20", "--clip-norm", "0.25",
                                            "--criterion", "rshare_cross_entropy", *SMALL_LSTM_LM]),
    "transformer_lm": (LM_TASK, [*ADAM, "--arch", "rshare_transformer_lm", "--decoder-layers", "1",
                                 "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                                 "--decoder-attention-heads", "2",
                                 "--share-decoder-input-output-embed", "--max-update", "30"]),
    "lstm": (NMT_TASK, [*ADAM, "--arch", "rshare_lstm", "--encoder-embed-dim", "32",
                        "--encoder-hidden-size", "32", "--decoder-embed-dim", "32",
                        "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
                        "--share-all-embeddings", "--max-update", "30"]),
    "transformer": (NMT_TASK, [*ADAM, "--arch", "rshare_transformer", *TINY_TRANSFORMER,
                               "--max-update", "60"]),
}


def parent(case):
    return case.split("-")[0]


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
            data = nmt_data if task is NMT_TASK else lm_data
            fairseq("fairseq-train", data, *COMMON, *task, *flags, "--save-dir", save_dir)
            rshare, dense = save_dir / "checkpoint_last.pt", save_dir / "exported.pt"
            result = export(rshare, dense)
            assert result.returncode == 0, result.stderr
            assert f"a stock {parent(case)} checkpoint" in result.stdout
            cache[case] = rshare, dense
        return cache[case]

    return get


LOG_PROBS = """
import argparse, sys, torch
if sys.argv[3] == "plugin":  # an rshare checkpoint holds fairseq's argparse options
    import fairseq_rshare
    torch.serialization.add_safe_globals([argparse.Namespace])
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
    assert state["cfg"]["model"]["_name"] == parent(case)
    assert state["cfg"]["task"]["_name"] in ("language_modeling", "translation")
    assert not [key for key in state["cfg"]["model"] if key.startswith("rshare_")]
    assert state["cfg"]["common"]["user_dir"] is None and "last_optimizer_state" not in state
    assert not [key for key in state["model"] if "pool" in key or "fingerprint" in key]
    expected = log_probs(rshare, tmp_path / "rshare.pt", plugin=True)
    actual = log_probs(dense, tmp_path / "dense.pt", plugin=False)
    assert actual.shape == expected.shape and expected.shape[-1] > 1000
    assert (actual - expected).abs().max().item() <= 1e-5


def eval_lm(data, checkpoint, *flags):
    """fairseq-eval-lm's (tokens evaluated, loss and perplexity line) on the test split."""
    result = fairseq("fairseq-eval-lm", data, "--path", checkpoint, "--gen-subset", "test", "--cpu",
                     "--required-batch-size-multiple", "1", *flags)
    log = result.stdout + result.stderr
    return re.findall(r"Evaluated ([\d,]+) tokens", log), re.findall(r"Loss \(base 2\): [\d.]+, Perplexity: [\d.]+", log)


# docs/export.md's evaluation of an exported stateful LM: the whole test split as one sample
STOCK_WHOLE_SPLIT = ["--task", "language_modeling", "--tokens-per-sample", "100000",
                     "--max-tokens", "100000", "--softmax-batch", "1024"]


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
        window = ("--tokens-per-sample", "32")
        perplexity = eval_lm(lm_data, rshare, "--user-dir", USER_DIR, *window)
        assert len(perplexity[1]) == 1 and eval_lm(lm_data, dense, *window) == perplexity
    elif CASES[case][0] is STATEFUL_LM_TASK:  # the state carried over the test split, one stream
        stateful = ("--task", "stateful_lm", "--batch-size", "1", "--tokens-per-sample", "35")
        (tokens, [expected]), (stock_tokens, [actual]) = (
            eval_lm(lm_data, rshare, "--user-dir", USER_DIR, *stateful), eval_lm(lm_data, dense, *STOCK_WHOLE_SPLIT))
        assert stock_tokens == tokens and len(tokens) == 1
        assert eval_lm_perplexity(actual) == pytest.approx(eval_lm_perplexity(expected), rel=1e-4)
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


STOCK_LOAD = """
import argparse, sys, torch
from fairseq import checkpoint_utils
assert argparse.Namespace not in torch.serialization.get_safe_globals()
for path in sys.argv[1:]:
    torch.load(path)  # weights_only, as fairseq loads
    [model], cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    print(type(task).__name__, cfg.model.arch, model.max_positions())
assert "fairseq_rshare" not in sys.modules
"""


def test_checkpoints_of_every_fairseq_optimizer_export_to_what_stock_fairseq_loads(exported, lm_data, tmp_path):
    """fairseq keeps the options of an optimizer without a dataclass (sgd, adagrad, ...) as an
    argparse.Namespace of the whole command line, which torch's safe loading refuses: the
    README's stateful LM checkpoint, with the optimizer options each optimizer gives it."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim import OPTIMIZER_REGISTRY
    from omegaconf import OmegaConf

    rshare, _ = exported("lstm_lm-stateful")
    state = torch.load(rshare, weights_only=False)
    paths = []
    for name in sorted(OPTIMIZER_REGISTRY):
        command_line = [str(lm_data), "--user-dir", USER_DIR, *STATEFUL_LM_TASK, *SMALL_LSTM_LM, "--optimizer", name]
        args = options.parse_args_and_arch(options.get_training_parser(), command_line)
        state["cfg"]["optimizer"] = OmegaConf.to_container(convert_namespace_to_omegaconf(args))["optimizer"]
        torch.save(state, tmp_path / f"{name}.pt")
        paths.append(tmp_path / f"{name}-exported.pt")
        export_checkpoint(tmp_path / f"{name}.pt", paths[-1])
    assert isinstance(torch.load(rshare, weights_only=False)["cfg"]["optimizer"], argparse.Namespace)
    result = subprocess.run([sys.executable, "-c", STOCK_LOAD, *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["LanguageModelingTask lstm_lm 100000"] * len(paths)


def test_export_onto_its_own_input_fails_with_one_line(exported, tmp_path):
    rshare = tmp_path / "checkpoint.pt"
    shutil.copy(exported("lstm_lm")[0], rshare)
    content = rshare.read_bytes()
    (tmp_path / "link.pt").symlink_to(rshare)
    for output in (rshare, tmp_path / "link.pt", os.path.join(tmp_path, ".", "checkpoint.pt")):
        assert_one_line_error(export(rshare, output), f"{output} is the checkpoint being exported")
    assert rshare.read_bytes() == content


def test_interrupted_export_leaves_no_partial_file(exported, tmp_path, monkeypatch):
    def disk_full(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RShareConfigError, match=f"cannot write {tmp_path / 'out.pt'}: No space left on device"):
        export_checkpoint(exported("lstm_lm")[0], tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def sentencepiece_transformer(tmp_path_factory):
    """A tiny rshare transformer on a Multi30k slice in joint sentencepiece BPE pieces, made as
    recipes/translation.sh makes its data, exported and converted for CTranslate2: returns the
    sentencepiece model, the CTranslate2 model and the binarised data."""
    pytest.importorskip("ctranslate2")
    pytest.importorskip("sentencepiece")
    multi30k, root = shared_corpus("multi30k"), tmp_path_factory.mktemp("sentencepiece")
    for split, name, lines in (("train", "train", 3000), ("valid", "val", 100)):
        for lang in ("de", "en"):
            head(os.path.join(multi30k, f"{name}.{lang}"), root / f"{split}.{lang}", lines)
    subwords = [sys.executable, os.path.join(REPO, "recipes", "subwords.py")]
    subprocess.run([*subwords, "train", "--model-prefix", root / "spm", "--vocab-size", "1000",
                    root / "train.de", root / "train.en"], check=True)
    for split in ("train", "valid"):
        for lang in ("de", "en"):
            subprocess.run([*subwords, "encode", "--model", root / "spm.model", root / f"{split}.{lang}",
                            root / f"pieces.{split}.{lang}"], check=True)
    fairseq("fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
            "--trainpref", root / "pieces.train", "--validpref", root / "pieces.valid",
            "--destdir", root / "bin", "--workers", "1")
    fairseq("fairseq-train", root / "bin", *COMMON, *NMT_TASK, *ADAM, "--arch", "rshare_transformer",
            *TINY_TRANSFORMER, "--share-all-embeddings", "--max-update", "60", "--save-dir", root)
    result = export(root / "checkpoint_last.pt", root / "model.pt")
    assert result.returncode == 0, result.stderr
    fairseq("ct2-fairseq-converter", "--model_path", root / "model.pt", "--data_dir", root / "bin",
            "--output_dir", root / "ct2")
    return root / "spm.model", root / "ct2", root / "bin"


DOCUMENTED_SPM_MODEL = "work/translation-multi30k-cpu/subwords/spm.model"


def test_the_documented_ctranslate2_snippet_translates_as_fairseq_interactive(sentencepiece_transformer, capsys):
    """docs/export.md's Python snippet, run on a tiny model: text in, detokenised text out, the
    same as fairseq-interactive with the sentencepiece model as its --bpe."""
    spm_model, ct2, data = sentencepiece_transformer
    with open(os.path.join(REPO, "docs", "export.md")) as f:
        [snippet] = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert DOCUMENTED_SPM_MODEL in snippet and '"ct2"' in snippet
    snippet = snippet.replace(DOCUMENTED_SPM_MODEL, str(spm_model)).replace('"ct2"', repr(str(ct2)))
    variables = {}
    exec(snippet, variables)
    translations = capsys.readouterr().out.splitlines()
    result = fairseq("fairseq-interactive", data, "--path", data.parent / "model.pt", "--source-lang", "de",
                     "--target-lang", "en", "--bpe", "sentencepiece", "--sentencepiece-model", spm_model,
                     "--beam", "5", "--lenpen", "1", "--cpu", stdin="\n".join(variables["sentences"]) + "\n")
    expected = [line.split("\t")[2] for line in result.stdout.splitlines() if line.startswith("D-")]
    assert len(translations) == len(variables["sentences"]) >= 2 and all(translations)
    assert translations == expected

