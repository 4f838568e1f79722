"""The stateful_lm task: streams that continue each other, carried LSTM state, eval-lm counts."""
import os
import re

import pytest
import torch

import fairseq_rshare  # noqa: F401
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq_rshare.tasks.stateful_lm import StreamWindows

from conftest import USER_DIR, fairseq, shared_corpus, tiny_lm
from fairseq_rshare.tools import eval_lm_perplexity
from recipes import variants



def windows_of(tokens, streams, window, ranks=1):
    return [StreamWindows(tokens, pad=1, eos=2, streams=streams, window=window, rank=r, ranks=ranks)
            for r in range(ranks)]


@pytest.mark.parametrize("length,streams,window,ranks", [(1000, 7, 35, 1), (999, 4, 20, 2), (50, 3, 64, 1)])
def test_batches_continue_each_other_row_by_row(length, streams, window, ranks):
    tokens = torch.randint(4, 100, (length,))
    rows = []
    for dataset in windows_of(tokens, streams, window, ranks):
        batches = [dataset.collate([dataset[i]]) for i in range(len(dataset))]
        assert [b["net_input"]["stream_start"] for b in batches] == [True] + [False] * (len(batches) - 1)
        sources = torch.cat([b["net_input"]["src_tokens"] for b in batches], dim=1)
        targets = torch.cat([b["target"] for b in batches], dim=1)
        assert torch.equal(sources[:, 1:], targets[:, :-1])  # each window's rows continue the last
        rows.extend(zip(sources, targets))
    stream_targets = torch.cat([t for _, t in rows])
    stream_sources = torch.cat([s for s, _ in rows])
    scored = stream_targets.ne(1)
    assert torch.equal(stream_targets[scored], tokens)  # every token predicted exactly once
    assert torch.equal(stream_sources[scored], torch.cat([torch.tensor([2]), tokens[:-1]]))
    assert sum(d.collate([d[i]])["ntokens"] for d in windows_of(tokens, streams, window, ranks)
               for i in range(len(d))) == length


@pytest.mark.parametrize("tables", ["all", "none"])
def test_carried_state_equals_one_long_pass(tables):
    model = tiny_lm(rshare_tables=tables)
    tokens = torch.randint(4, 64, (3, 70))
    with torch.no_grad():
        whole, _ = model(tokens, stream_start=True)
        first, _ = model(tokens[:, :35], stream_start=True)
        second, _ = model(tokens[:, 35:], stream_start=False)
        fresh, _ = model(tokens[:, 35:], stream_start=True)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-5)
    assert not torch.allclose(fresh, whole[:, 35:], atol=1e-3)  # the state really was carried


def test_carrying_path_equals_fairseqs_lstm_loop_from_a_zero_state():
    model = tiny_lm()
    tokens = torch.randint(4, 64, (3, 40))
    with torch.no_grad():
        fused, _ = model.decoder(tokens, stream_start=True, features_only=True)
        loop, _ = model.decoder(tokens, features_only=True)  # fairseq's own LSTMCell loop
    assert torch.allclose(fused, loop, atol=1e-5)


def test_training_and_evaluation_carry_separate_states():
    model = tiny_lm()
    tokens = torch.randint(4, 64, (2, 30))
    with torch.no_grad():
        model.eval()
        model(tokens[:, :15], stream_start=True)
        model.train()
        model(torch.randint(4, 64, (2, 15)), stream_start=True)  # training must not disturb eval's state
        model.eval()
        continued, _ = model(tokens[:, 15:], stream_start=False)
        whole, _ = model(tokens, stream_start=True)
    assert torch.allclose(continued, whole[:, 15:], atol=1e-5)


STATEFUL = ["--user-dir", USER_DIR, "--cpu", "--task", "stateful_lm", "--arch", "rshare_lstm_lm",
            "--decoder-embed-dim", "32", "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
            "--decoder-layers", "2", "--tokens-per-sample", "20"]


@pytest.mark.slow
def test_trains_and_eval_lm_scores_every_test_token_once(lm_data, tmp_path):
    fairseq("fairseq-train", lm_data, *STATEFUL, "--optimizer", "sgd", "--lr", "20", "--clip-norm", "0.25",
            "--batch-size", "8", "--batch-size-valid", "4", "--max-epoch", "2", "--criterion", "rshare_cross_entropy",
            "--save-dir", tmp_path, "--no-epoch-checkpoints", "--log-format", "simple", "--no-progress-bar")
    result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--cpu", "--task", "stateful_lm",
                     "--path", tmp_path / "checkpoint_best.pt", "--gen-subset", "test", "--batch-size", "3",
                     "--tokens-per-sample", "35")
    log = result.stdout + result.stderr
    test_txt = os.path.join(os.path.dirname(lm_data), "test.txt")
    with open(test_txt) as f:
        expected = sum(len(line.split()) + 1 for line in f)  # words + one end-of-line each
    assert int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", "")) == expected
    perplexity = eval_lm_perplexity(log)
    assert perplexity < 1000  # far below a uniform guess over the 3k-word dictionary of the slice


@pytest.mark.slow
def test_needs_an_lstm_a_batch_size_and_pools_to_scale(lm_data, tmp_path):
    common = [lm_data, "--user-dir", USER_DIR, "--cpu", "--task", "stateful_lm", "--optimizer", "sgd",
              "--lr", "1", "--max-update", "1", "--save-dir", tmp_path]
    result = fairseq("fairseq-train", *common, "--arch", "rshare_transformer_lm", "--batch-size", "4", check=False)
    assert result.returncode and "use --arch rshare_lstm_lm" in result.stderr
    result = fairseq("fairseq-train", *common, "--arch", "rshare_lstm_lm", "--max-tokens", "100", check=False)
    assert result.returncode and "needs --batch-size" in result.stderr
    result = fairseq("fairseq-train", *common, "--arch", "rshare_lstm_lm", "--batch-size", "4",
                     "--rshare-tables", "none", "--pool-lr-scale", "2", check=False)
    assert result.returncode and "--pool-lr-scale needs rshare tables" in result.stderr


@pytest.mark.parametrize("arch, run_name, dropout, tied", [
    ("rshare_lstm_lm_ptb_slim", "rshare-0.45-bias-h320-drop0.3", 0.3, False),
    ("rshare_lstm_lm_ptb_tied", "rshare-0.15-bias-scale-tied", 0.0, True),
])
def test_named_ptb_arch_is_the_model_of_its_run_name(arch, run_name, dropout, tied, tmp_path):
    """A named PTB arch, parsed as fairseq-train parses it, builds the model the recipes' run name
    gives the small model flag by flag: the same parameters, table by table."""
    dictionary = Dictionary()  # as fairseq-preprocess builds it from PTB's training text
    with open(os.path.join(shared_corpus("ptb"), "train.txt")) as train:
        for line in train:
            dictionary.encode_line(line, add_if_not_exist=True)
    dictionary.finalize(padding_factor=8)
    dictionary.save(str(tmp_path / "dict.txt"))

    def build(*flags):
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, [str(tmp_path), "--user-dir", USER_DIR, "--task", "stateful_lm",
                                                    "--batch-size", "20", *flags])
        model = tasks.setup_task(args).build_model(args)
        decoder = model.decoder
        inputs = {id(p): p for p in decoder.embed_tokens.parameters()}
        outputs = [p for p in decoder.output_projection.parameters() if id(p) not in inputs]
        counts = (sum(p.numel() for p in inputs.values()), sum(p.numel() for p in outputs),
                  sum(p.numel() for p in model.parameters()))
        return model, counts

    model, counts = build("--arch", arch)
    _, expected = build("--arch", "rshare_lstm_lm_ptb_small",
                        *variants.flags("lm", run_name, len(dictionary)).split())
    assert counts == expected
    decoder = model.decoder
    assert (decoder.output_projection.table is decoder.embed_tokens) == tied
    assert decoder.dropout_out_module.p == dropout and decoder.output_projection.bias is not None
