"""Every registered architecture through the stock fairseq command-line tools, on real data."""
import math
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from fairseq.data import Dictionary

from conftest import USER_DIR, fairseq
from fairseq_rshare.models.rshare_config import RShareConfig
from fairseq_rshare.tools import eval_lm_perplexity

# One worker trains the module's shared models (xdist_group) once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli")]

COMMON = ["--user-dir", USER_DIR, "--cpu", "--optimizer", "adam", "--lr", "0.005",
          "--max-tokens", "1024", "--no-progress-bar", "--log-format", "simple",
          "--log-interval", "10", "--no-epoch-checkpoints", "--seed", "1"]
TINY_TRANSFORMER = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
                    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2"]
SMALL_LSTM = ["--encoder-embed-dim", "32", "--encoder-hidden-size", "32",
              "--decoder-embed-dim", "32", "--decoder-hidden-size", "32",
              "--decoder-out-embed-dim", "32", "--encoder-layers", "1", "--decoder-layers", "1"]

LM_CASES = {
    "lstm_lm": ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32",
                "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32"],
    "lstm_lm_tied_global_bias": ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32",
                                 "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
                                 "--share-decoder-input-output-embed", "--rshare-pool-kind", "global",
                                 "--rshare-output-bias"],
    "lstm_lm_ratios_scale": ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32",
                             "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
                             "--rshare-input-ratio", "0.05", "--rshare-output-ratio", "0.3",
                             "--rshare-word-scale", "--rshare-output-bias"],
    "lstm_lm_ptb_small": ["--arch", "rshare_lstm_lm_ptb_small", "--rshare-tables", "decoder-output"],
    "transformer_lm": ["--arch", "rshare_transformer_lm", "--decoder-layers", "1",
                       "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                       "--decoder-attention-heads", "2", "--share-decoder-input-output-embed"],
}
NMT_CASES = {
    "lstm_share_all": ["--arch", "rshare_lstm", *SMALL_LSTM, "--share-all-embeddings"],
    "transformer": ["--arch", "rshare_transformer", *TINY_TRANSFORMER, "--rshare-subvectors", "4"],
    "transformer_iwslt_de_en": ["--arch", "rshare_transformer_iwslt_de_en", "--max-update", "2"],
}


def train(data, save_dir, task_flags, model_flags, max_update=30, extra=()):
    # model_flags after --max-update: a case may train fewer updates (the full-size transformer)
    return fairseq("fairseq-train", data, *COMMON, *task_flags, "--max-update", max_update,
                   *model_flags, "--save-dir", save_dir, *extra)


def lm_task(tokens=32):
    return ["--task", "language_modeling", "--tokens-per-sample", str(tokens)]


NMT_TASK = ["--task", "translation", "--source-lang", "de", "--target-lang", "en"]


@pytest.fixture(scope="module")
def trained(lm_data, nmt_data, tmp_path_factory):
    """Train each case once (on first use); return its checkpoint directory."""
    cache = {}

    def get(case):
        if case not in cache:
            save_dir = tmp_path_factory.mktemp(case)
            if case in LM_CASES:
                result = train(lm_data, save_dir, lm_task(), LM_CASES[case])
            else:
                result = train(nmt_data, save_dir, NMT_TASK, NMT_CASES[case])
            assert "done training" in result.stderr + result.stdout
            cache[case] = save_dir
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_lm_arch_trains_and_eval_lm_scores(case, trained, lm_data):
    checkpoint = trained(case) / "checkpoint_last.pt"
    result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", checkpoint,
                     "--gen-subset", "test", "--tokens-per-sample", "32", "--cpu",
                     "--required-batch-size-multiple", "1")
    perplexity = eval_lm_perplexity(result.stderr + result.stdout)
    vocabulary = len(open(lm_data / "dict.txt").readlines()) + 4
    assert math.isfinite(perplexity) and perplexity < vocabulary / 2


@pytest.mark.parametrize("case", sorted(NMT_CASES))
def test_nmt_arch_trains_and_generates_with_beam_search(case, trained, nmt_data):
    checkpoint = trained(case) / "checkpoint_last.pt"
    result = fairseq("fairseq-generate", nmt_data, "--user-dir", USER_DIR, "--path", checkpoint,
                     "--gen-subset", "test", "--beam", "4", "--batch-size", "8", "--cpu",
                     "--required-batch-size-multiple", "1", "--max-len-a", "1.2", "--max-len-b", "10")
    hypotheses = [line for line in result.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 20
    assert re.search(r"BLEU4 = [\d.]+", result.stdout)


def test_interactive_translates_with_incremental_beam_search(trained, nmt_data):
    checkpoint = trained("transformer") / "checkpoint_last.pt"
    result = fairseq("fairseq-interactive", nmt_data, "--user-dir", USER_DIR, "--path", checkpoint,
                     "--source-lang", "de", "--target-lang", "en", "--beam", "4", "--cpu",
                     stdin="ein mann fährt fahrrad .\nzwei hunde spielen im schnee .\nxyzzy quux .\n")
    hypotheses = [line for line in result.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 3 and all(h.split("\t")[2].strip() for h in hypotheses)
    assert "S-2\t<unk> <unk> ." in result.stdout


def with_path(path):
    return ["--model-overrides", "{'rshare_output_path': '%s'}" % path]


def test_eval_lm_and_generate_agree_on_both_output_paths(trained, lm_data, nmt_data):
    """End to end through the fused kernels: eval-lm and beam search give what the
    materialised V x H matrix gives."""
    checkpoint = trained("lstm_lm") / "checkpoint_last.pt"
    perplexities = []
    for path in ("pool-scores", "materialize"):
        result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", checkpoint,
                         "--gen-subset", "test", "--tokens-per-sample", "32", "--cpu",
                         "--required-batch-size-multiple", "1", *with_path(path))
        perplexities.append(eval_lm_perplexity(result.stderr + result.stdout))
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-4)
    checkpoint = trained("transformer") / "checkpoint_last.pt"
    hypotheses = []
    for path in ("pool-scores", "materialize"):
        result = fairseq("fairseq-generate", nmt_data, "--user-dir", USER_DIR, "--path", checkpoint,
                         "--gen-subset", "test", "--beam", "4", "--batch-size", "8", "--cpu",
                         "--required-batch-size-multiple", "1", *with_path(path))
        hypotheses.append(sorted(line.split("\t")[2] for line in result.stdout.splitlines() if line.startswith("H-")))
    assert len(hypotheses[0]) == 20 and hypotheses[0] == hypotheses[1]


LOGITS_SCRIPT = """
import sys, torch, fairseq_rshare
from fairseq import checkpoint_utils
from fairseq.models import FairseqEncoderDecoderModel
from fairseq_rshare.checkpoints import FAIRSEQ_GLOBALS
with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
    [model], _ = checkpoint_utils.load_model_ensemble([sys.argv[1]])
model.eval()
torch.manual_seed(0)
tokens = torch.randint(4, 40, (3, 9))
with torch.no_grad():
    if isinstance(model, FairseqEncoderDecoderModel):
        logits = model(tokens, torch.full((3,), 9), tokens)[0]
    else:
        logits = model(tokens)[0]
torch.save(logits, sys.argv[2])
"""


@pytest.mark.parametrize("case", ["lstm_lm_tied_global_bias", "transformer"])
def test_reloaded_checkpoint_gives_bit_identical_outputs(case, trained, tmp_path):
    checkpoint = trained(case) / "checkpoint_last.pt"
    outputs = []
    for run in range(2):
        out = tmp_path / f"logits{run}.pt"
        subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(checkpoint), str(out)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": str(run + 1)})
        outputs.append(torch.load(out))
    assert outputs[0].shape[-1] > 100
    assert torch.equal(outputs[0], outputs[1])


def test_input_and_output_ratios_size_their_own_tables(trained, lm_data):
    state = torch.load(trained("lstm_lm_ratios_scale") / "checkpoint_last.pt", weights_only=False)["model"]
    V = len(open(os.path.join(lm_data, "dict.txt")).readlines()) + 4  # fairseq's 4 special symbols
    V += -V % 8  # the dictionary is padded to a multiple of 8
    K = 8
    assert state["decoder.embed_tokens.pool"].shape == (round(0.05 * V) * K, 32 // K)
    assert state["decoder.output_projection.table.pool"].shape == (round(0.3 * V) * K, 32 // K)
    assert state["decoder.embed_tokens.word_scale"].shape == (V, K)
    assert state["decoder.output_projection.table.word_scale"].shape == (V, K)
    assert not torch.equal(state["decoder.embed_tokens.word_scale"], torch.ones(V, K))


def test_resume_from_checkpoint_last(lm_data, tmp_path):
    flags = LM_CASES["lstm_lm"]
    train(lm_data, tmp_path, lm_task(), flags, max_update=10)
    resumed = train(lm_data, tmp_path, lm_task(), flags, max_update=20)
    log = resumed.stderr + resumed.stdout
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 10 updates\)", log)
    assert re.search(r"num_updates 20\b", log)


def test_hub_interface_translates(trained, nmt_data):
    import fairseq_rshare  # noqa: F401
    from fairseq_rshare.models.rshare_transformer import RShareTransformerModel

    from fairseq_rshare.checkpoints import FAIRSEQ_GLOBALS

    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        hub = RShareTransformerModel.from_pretrained(
            str(trained("transformer")), checkpoint_file="checkpoint_last.pt",
            data_name_or_path=str(nmt_data),
        )
    translation = hub.translate("ein mann fährt fahrrad .", beam=4)
    assert isinstance(translation, str) and translation.strip()


DENSE = ["--rshare-tables", "none"]
MATERIALIZE = ["--rshare-output-path", "materialize"]
POOL_SCORES = ["--rshare-output-path", "pool-scores"]
# case: (task, model flags, --label-smoothing, where rshare_cross_entropy takes the loss from)
FUSED_LOSS_CASES = {
    "lstm_lm": (lm_task(), [*LM_CASES["lstm_lm"], *POOL_SCORES], "0", "the pool scores"),
    "transformer_lm": (lm_task(), [*LM_CASES["transformer_lm"], *POOL_SCORES], "0", "the pool scores"),
    "lstm_share_all": (NMT_TASK, [*NMT_CASES["lstm_share_all"], *POOL_SCORES], "0.1", "the pool scores"),
    "transformer": (NMT_TASK, [*NMT_CASES["transformer"], *POOL_SCORES], "0.1", "the pool scores"),
    "lstm_lm_materialize": (lm_task(), [*LM_CASES["lstm_lm"], *MATERIALIZE], "0", "the output layer's logits"),
    "transformer_materialize": (NMT_TASK, [*NMT_CASES["transformer"], *MATERIALIZE], "0.1",
                                "the output layer's logits"),
    "lstm_lm_dense": (lm_task(), [*LM_CASES["lstm_lm"], *DENSE], "0", "the logits"),
    "transformer_dense": (NMT_TASK, [*NMT_CASES["transformer"], *DENSE], "0.1", "the logits"),
}


@pytest.mark.parametrize("case", sorted(FUSED_LOSS_CASES))
def test_rshare_cross_entropy_trains_as_label_smoothed_cross_entropy(case, lm_data, nmt_data, tmp_path):
    """Same seed, same updates: the criterion that never builds tokens x V log-probabilities
    logs the training and validation losses fairseq's own criterion logs."""
    task, flags, smoothing, route = FUSED_LOSS_CASES[case]
    data = lm_data if task[1] == "language_modeling" else nmt_data
    losses = []
    for criterion in ("label_smoothed_cross_entropy", "rshare_cross_entropy"):
        result = train(data, tmp_path / criterion, task, flags, max_update=4, extra=(
            "--criterion", criterion, "--label-smoothing", smoothing, "--log-interval", "1", "--no-save"))
        log = result.stdout + result.stderr
        losses.append([float(x) for x in re.findall(r"\| (?:train_inner \|.*? loss=|valid \|.*? loss )([\d.]+)", log)])
    assert f"rshare_cross_entropy: loss from {route}" in log
    assert len(losses[0]) == 5  # 4 updates, 1 validation
    assert losses[0] == pytest.approx(losses[1], abs=2e-3)


def test_model_overrides_that_change_the_mapping_fail_clearly(trained, lm_data):
    checkpoint = trained("lstm_lm") / "checkpoint_last.pt"
    result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--path", checkpoint,
                     "--cpu", "--model-overrides", "{'rshare_seed': 9}", check=False)
    assert result.returncode != 0
    assert "fairseq_rshare: error:" in result.stderr and "mapping fingerprint" in result.stderr
    assert "--rshare-seed 9," in result.stderr  # the value given, not a table's seed + offset
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rshare-subvectors", "7"], "embedding dim 32 is not divisible by --rshare-subvectors 7"),
        (["--rshare-pool-size", "12"], "--rshare-pool-size 12 is not divisible"),
        (["--rshare-ratio", "1.5"], "--rshare-ratio must be between 0 and 1"),
        (["--rshare-tables", "encoder-input"], "this model's tables are decoder-input, decoder-output"),
        (["--share-decoder-input-output-embed", "--rshare-tables", "decoder-input"],
         "list both tables or neither"),
        (["--criterion", "adaptive_loss"], "use --criterion cross_entropy"),
        (["--rshare-input-ratio", "1.5"], "--rshare-input-ratio must be between 0 and 1"),
        (["--rshare-output-ratio", "0.2", "--rshare-pool-size", "64"],
         "--rshare-output-ratio and --rshare-pool-size both set the size of decoder-output"),
        (["--rshare-tables", "decoder-output", "--rshare-input-ratio", "0.1"],
         "--rshare-input-ratio is set but no input table is random-shared"),
        (["--share-decoder-input-output-embed", "--rshare-output-ratio", "0.2"],
         "makes the output reuse the input table"),
        (["--rshare-word-scale", "--rshare-output-path", "pool-scores"],
         "--rshare-word-scale runs on the materialize output path only"),
        (["--rshare-init-std", "0"], "--rshare-init-std must be above 0, got 0.0"),
        (["--decoder-embed-path", "vectors.txt"], "rshare_lstm_lm does not support --decoder-embed-path"),
        (["--share-decoder-input-output-embed", "--decoder-out-embed-dim", "16", "--rshare-tables", "none"],
         "needs --decoder-embed-dim (32) equal to --decoder-out-embed-dim (16)"),
        # 0.9999 x 4,992 words rounds to 4,992 entries per position: the dense table's size.
        (["--rshare-ratio", "0.9999"], "--rshare-ratio 0.9999, a pool of 39936 gives no compression"),
        (["--rshare-input-ratio", "0.9999"], "--rshare-input-ratio 0.9999, a pool of 39936 gives no compression"),
    ],
)
def test_bad_flags_fail_with_one_clear_message(flags, message, lm_data, tmp_path):
    result = fairseq("fairseq-train", lm_data, *COMMON, *lm_task(), *LM_CASES["lstm_lm"], *flags,
                     "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert result.returncode != 0
    assert "fairseq_rshare: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_ratio_raised_to_a_larger_pool_is_reported_in_one_warning(lm_data, tmp_path):
    result = train(lm_data, tmp_path, lm_task(), LM_CASES["lstm_lm"], max_update=1,
                   extra=["--rshare-output-ratio", "0.0001", "--disable-validation"])
    warnings = [line for line in result.stdout.splitlines() if "--rshare-output-ratio" in line]
    # 0.0001 x 4,992 words is 0.5 entries per position: raised to 2, a ratio of 2 / 4,992.
    assert len(warnings) == 1 and "| WARNING |" in warnings[0]
    assert warnings[0].endswith(
        "fairseq_rshare: --rshare-output-ratio 0.0001 gives decoder-output a ratio of 0.000401, not "
        "0.0001: 0.0001 x 4992 words is 0.499 entries per position, and a pool has a whole number "
        "of them, at least 2 (one would give every word the same vector), so 2 per position, a pool of 16")
    assert "--rshare-ratio" not in result.stdout  # the input table's 0.1 is kept (499 of 499.2)


def test_a_bad_flag_prints_its_line_alone_and_fairseqs_own_errors_still_show(lm_data, tmp_path, monkeypatch):
    # Hydra's deprecation warnings about fairseq's calls stay out also under warning options.
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    result = fairseq("fairseq-train", lm_data, *COMMON, *lm_task(), *LM_CASES["lstm_lm"],
                     "--rshare-subvectors", "7", "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "fairseq_rshare: error: embedding dim 32 is not divisible by --rshare-subvectors 7: pick a divisor of 32"
    ]
    without_batch_size = [flag for flag in COMMON if flag not in ("--max-tokens", "1024")]
    result = fairseq("fairseq-train", lm_data, *without_batch_size, *lm_task(), *LM_CASES["lstm_lm"],
                     "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "AssertionError: Must specify batch size either with --max-tokens or --batch-size" in result.stderr


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("lstm_share_all", ["--encoder-freeze-embed"], "rshare_lstm does not support --encoder-freeze-embed"),
        ("transformer", ["--encoder-embed-path", "vectors.txt"],
         "--encoder-embed-path loads a dense table, but encoder-input is random-shared"),
    ],
)
def test_parent_flags_the_arch_cannot_honour_fail_clearly(case, flags, message, nmt_data, tmp_path):
    result = fairseq("fairseq-train", nmt_data, *COMMON, *NMT_TASK, *NMT_CASES[case], *flags,
                     "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert result.returncode != 0
    assert "fairseq_rshare: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_transformer_lm_rejects_layers_to_keep(lm_data, tmp_path):
    result = fairseq("fairseq-train", lm_data, *COMMON, *lm_task(), *LM_CASES["transformer_lm"],
                     "--decoder-layers-to-keep", "0", "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert result.returncode != 0
    assert "rshare_transformer_lm does not support --decoder-layers-to-keep" in result.stderr


def test_a_dense_encoder_table_loads_its_embed_path(nmt_data, tmp_path):
    words = [line.split()[0] for line in open(os.path.join(nmt_data, "dict.de.txt"))][:3]
    vectors = {word: [float(i + 1)] * 32 for i, word in enumerate(words)}
    path = tmp_path / "vectors.txt"
    path.write_text(f"{len(words)} 32\n" + "".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vectors.items()))
    train(nmt_data, tmp_path, NMT_TASK, [*NMT_CASES["transformer"], "--rshare-tables", "decoder-output"],
          max_update=1, extra=["--encoder-embed-path", path, "--lr", "1e-9"])
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    dictionary = Dictionary.load(os.path.join(nmt_data, "dict.de.txt"))
    weight = state["model"]["encoder.embed_tokens.weight"]
    for word, vector in vectors.items():
        assert torch.allclose(weight[dictionary.index(word)], torch.tensor(vector), atol=1e-5)


def test_share_all_embeddings_with_one_dense_table_fails_clearly(nmt_data, tmp_path):
    result = fairseq("fairseq-train", nmt_data, *COMMON, *NMT_TASK, *NMT_CASES["transformer"],
                     "--share-all-embeddings", "--rshare-tables", "encoder-input,decoder-output",
                     "--max-update", "1", "--save-dir", tmp_path, check=False)
    assert result.returncode != 0
    assert "--share-all-embeddings ties encoder-input and decoder-input" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_rshare_flag_with_its_default():
    result = subprocess.run([sys.executable, "-m", "fairseq_rshare", "--help"],
                            capture_output=True, text=True, check=True)
    entries = [" ".join(entry.split()) for entry in re.split(r"\n  (?=--rshare-)", result.stdout)[1:]]
    shown = {entry.split()[0]: re.search(r"\(default: ([^)]*)\)$", entry) for entry in entries}
    expected = {"--" + option.name.replace("_", "-"): "unset" if option.default is None else str(option.default)
                for option in fields(RShareConfig) if option.name.startswith("rshare_")}
    assert {flag: found and found.group(1) for flag, found in shown.items()} == expected
