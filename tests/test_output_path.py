"""--rshare-output-path: auto on CPU measured on the first call of training and of evaluation,
the same on every rank; what each path hands fairseq to normalise."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fairseq_rshare import RandomSharedEmbedding, RandomSharedOutput
from fairseq_rshare.modules import path_costs
from fairseq_rshare.modules.random_shared_output import TIMED_WITHIN

from conftest import tiny_lm

# A shape where the cost model picks pool-scores, by too little to go untimed.
SHAPE = dict(num_embeddings=2000, embedding_dim=64, padding_idx=1, num_subvectors=8, pool_size=160)


def rigged(times):
    return lambda self, path, num_tokens: times[path]


def rigged_on_batch(times):
    return lambda self, path, features: (times[path], self.logits_through(path, features))


def test_auto_takes_the_faster_measured_path(monkeypatch, caplog):
    monkeypatch.setattr(RandomSharedOutput, "time_path", rigged({"pool-scores": 2.0, "materialize": 1.0}))
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE))
    assert output.path == "pool-scores"  # the cost model, before any training step
    with caplog.at_level("INFO"):
        output.train()(torch.randn(3, 5, 64))
    assert output.path == "materialize"
    assert "pool-scores 2000.0 ms, materialize 1000.0 ms: taking materialize" in caplog.text


def test_training_and_evaluation_are_measured_apart_and_once(monkeypatch):
    timed = []

    def time_path(self, path, num_tokens):
        timed.append("training")
        return 1.0 if path == "pool-scores" else 2.0

    def time_on_batch(self, path, features):
        timed.append("evaluation")
        return 1.0 if path == "materialize" else 2.0, self.logits_through(path, features)

    monkeypatch.setattr(RandomSharedOutput, "time_path", time_path)
    monkeypatch.setattr(RandomSharedOutput, "time_on_batch", time_on_batch)
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE))
    for _ in range(2):
        output.train()(torch.randn(4, 64)).sum().backward()
        assert output.path == "pool-scores"
        with torch.no_grad():
            for _ in range(2):  # evaluation times one path on each of its first two calls
                output.eval()(torch.randn(4, 64))
        assert output.path == "materialize"
    assert timed == ["training", "training", "evaluation", "evaluation"]  # each path once a regime


@pytest.mark.parametrize("faster", ["pool-scores", "materialize"])
def test_evaluation_times_its_first_two_calls_one_path_each_then_keeps_the_faster(monkeypatch, faster):
    slower = {"pool-scores": "materialize", "materialize": "pool-scores"}[faster]
    # Seconds per call: the second batch has twice the tokens, so it is the cost per token that counts.
    times = {faster: 1.5, slower: 1.0} if faster == "materialize" else {faster: 1.0, slower: 2.5}
    monkeypatch.setattr(RandomSharedOutput, "time_on_batch", rigged_on_batch(times))
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE), bias=True).eval()
    torch.nn.init.normal_(output.bias)
    batches = [torch.randn(1, 5, 64), torch.randn(2, 5, 64), torch.randn(3, 5, 64)]
    with torch.no_grad():
        outputs = [output(features) for features in batches]
        assert (output._weight is not None) == (faster == "materialize")  # a matrix kept only if used
        for features, got, path in zip(batches, outputs, ["pool-scores", "materialize", faster]):
            assert torch.equal(got, output.logits_through(path, features))
    assert output.path == faster
    # Only the materialize path hands over raw logits, so the path taken shows in the output.
    normalised = [bool(got.logsumexp(-1).abs().max() < 1e-5) for got in outputs]
    assert normalised == [True, False, faster == "pool-scores"]


def test_timing_on_a_batch_returns_that_paths_output():
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE), bias=True).eval()
    features = torch.randn(7, 64)
    with torch.no_grad():
        for path in ("pool-scores", "materialize"):
            seconds, timed_output = output.time_on_batch(path, features)
            assert seconds > 0
            assert torch.equal(timed_output, output.logits_through(path, features))


def test_a_forced_path_is_kept(monkeypatch):
    def fail(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(RandomSharedOutput, "time_path", fail)
    monkeypatch.setattr(RandomSharedOutput, "time_on_batch", fail)
    for path in ("pool-scores", "materialize"):
        forced = RandomSharedOutput(RandomSharedEmbedding(**SHAPE), path=path).train()
        forced(torch.randn(4, 64)).sum().backward()
        with torch.no_grad():
            forced.eval()(torch.randn(4, 64))
        assert forced.path == path


def test_a_clear_cost_model_is_not_timed(monkeypatch):
    def fail(*args):
        raise AssertionError("timed")

    monkeypatch.setattr(RandomSharedOutput, "time_path", fail)
    monkeypatch.setattr(RandomSharedOutput, "time_on_batch", fail)
    # V=20k, H=512, K=8, 200 entries per position: pool-scores 5.6x cheaper by the model.
    output = RandomSharedOutput(RandomSharedEmbedding(20_000, 512, 1, 8, 1600))
    pool_scores, materialize = path_costs(20_000, 512, 8, 1600)
    assert materialize > TIMED_WITHIN * pool_scores
    output.train()(torch.randn(4, 512)).sum().backward()
    with torch.no_grad():
        output.eval()(torch.randn(4, 512))
    assert output.path == "pool-scores"
    output.train()
    assert output.path == "pool-scores"


def test_timing_touches_no_gradient():
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE), bias=True)
    for path in ("pool-scores", "materialize"):
        assert output.time_path(path, 16) > 0
    assert all(p.grad is None for p in output.parameters())


def rank_choice(rank, port, folder):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # Each rank measures the opposite: only rank 0's choice may count.
    times = [{"pool-scores": 2.0, "materialize": 1.0}, {"pool-scores": 1.0, "materialize": 2.0}][rank]
    RandomSharedOutput.time_path = rigged(times)
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE)).train()
    output(torch.randn(4, 64))
    with open(os.path.join(folder, str(rank)), "w") as f:
        f.write(output.path)
    torch.distributed.destroy_process_group()


def test_every_rank_takes_rank_zeros_choice(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_choice, args=(port, str(tmp_path)), nprocs=2)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["materialize", "materialize"]


@pytest.mark.parametrize("path", ["pool-scores", "materialize"])
def test_evaluation_log_probs_equal_training_log_probs(path):
    """Training skips fairseq's log-softmax over log-probabilities; evaluation normalises once,
    and the materialize path then hands over raw logits, not log-probabilities to normalise again."""
    model = tiny_lm(rshare_tables="all", rshare_output_bias=True, rshare_output_path=path)
    torch.nn.init.normal_(model.decoder.output_projection.bias)
    tokens = torch.randint(4, 64, (2, 9))
    with torch.no_grad():
        log_probs = {}
        for training in (True, False):
            model.train(training)
            output = model(tokens)
            log_probs[training] = model.get_normalized_probs(output, log_probs=True)
            normalised = output[0].logsumexp(-1).abs().max() < 1e-5
            assert normalised == (training or path == "pool-scores")
    assert torch.allclose(log_probs[True], log_probs[False], atol=1e-5)
