"""On real text, a short run of the rshare LSTM LM beats the unigram model by far."""
import collections
import math
import os
import re

import pytest

from conftest import USER_DIR, fairseq, shared_corpus

pytestmark = pytest.mark.slow


def unigram_perplexity(train_path, eval_path):
    """Perplexity of the maximum-likelihood unigram model of train (one </s> a line) on eval."""
    def tokens(path):
        with open(path) as f:
            for line in f:
                yield from line.split()
                yield "</s>"

    counts = collections.Counter(tokens(train_path))
    total = sum(counts.values())
    eval_tokens = list(tokens(eval_path))
    log_likelihood = sum(math.log(counts[t] / total) for t in eval_tokens)
    return math.exp(-log_likelihood / len(eval_tokens))


def test_rshare_lstm_lm_beats_unigram_perplexity_on_ptb(tmp_path):
    ptb = shared_corpus("ptb")
    splits = {s: os.path.join(ptb, f"{s}.txt") for s in ("train", "valid")}
    fairseq("fairseq-preprocess", "--only-source", "--trainpref", splits["train"],
            "--validpref", splits["valid"], "--destdir", tmp_path / "bin", "--workers", "2")
    result = fairseq(
        "fairseq-train", tmp_path / "bin", "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", "rshare_lstm_lm", "--decoder-embed-dim", "128", "--decoder-hidden-size", "128",
        "--decoder-out-embed-dim", "128", "--dropout", "0.0", "--rshare-ratio", "0.1",
        "--optimizer", "adam", "--lr", "0.01", "--clip-norm", "0.5", "--max-tokens", "1120",
        "--tokens-per-sample", "35", "--max-update", "300", "--cpu", "--no-save",
        "--required-batch-size-multiple", "1", "--validate-interval-updates", "300",
        "--no-progress-bar", "--log-format", "simple",
    )
    valid_ppl = float(re.findall(r"valid on 'valid' subset \| loss [\d.]+ \| ppl ([\d.]+)",
                                 result.stderr + result.stdout)[-1])
    unigram_ppl = unigram_perplexity(splits["train"], splits["valid"])
    print(f"PTB valid perplexity: rshare LSTM LM {valid_ppl:.1f}, unigram {unigram_ppl:.1f}")
    assert 600 < unigram_ppl < 800
    assert valid_ppl < 0.6 * unigram_ppl  # a third of an epoch beats the unigram model by far
