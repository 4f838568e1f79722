"""--rshare-output-path: auto on CPU measured on the first call of training and of evaluation,
the same on every rank; what each path hands fairseq to normalise."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fairseq_rshare import RandomSharedEmbedding, RandomSharedOutput, kernels
from fairseq_rshare.modules import path_costs
from fairseq_rshare.modules.output_path import MEASURED_STEPS, TIMED_WITHIN, PathChooser

from conftest import tiny_lm

# A shape where the cost model picks pool-scores, by too little to go untimed.
SHAPE = dict(num_embeddings=2000, embedding_dim=64, padding_idx=1, num_subvectors=8, pool_size=160)


def rigged(times):
    return lambda self, step, path: times[path]


def rigged_on_batch(times):
    return lambda self, call, path, features: (times[path], call(path, features))


def test_auto_takes_the_faster_measured_path(monkeypatch, caplog):
    monkeypatch.setattr(PathChooser, "seconds_per_step", rigged({"pool-scores": 2.0, "materialize": 1.0}))
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE))
    assert output.path == "pool-scores"  # the cost model, before any training step
    with caplog.at_level("INFO"):
        output.train()(torch.randn(3, 5, 64))
    assert output.path == "materialize"
    assert "pool-scores 2000.0 ms, materialize 1000.0 ms: taking materialize" in caplog.text


def test_training_and_evaluation_are_measured_apart_and_once(monkeypatch):
    timed = []

    def seconds_per_step(self, step, path):
        timed.append("training")
        return 1.0 if path == "pool-scores" else 2.0

    def seconds_per_call(self, call, path, features):
        timed.append("evaluation")
        return 1.0 if path == "materialize" else 2.0, call(path, features)

    monkeypatch.setattr(PathChooser, "seconds_per_step", seconds_per_step)
    monkeypatch.setattr(PathChooser, "seconds_per_call", seconds_per_call)
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
    monkeypatch.setattr(PathChooser, "seconds_per_call", rigged_on_batch(times))
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
            seconds, timed_output = output.chooser.seconds_per_call(output.logits_through, path, features)
            assert seconds > 0
            assert torch.equal(timed_output, output.logits_through(path, features))


def test_a_forced_path_is_kept(monkeypatch):
    def fail(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(PathChooser, "seconds_per_step", fail)
    monkeypatch.setattr(PathChooser, "seconds_per_call", fail)
    for path in ("pool-scores", "materialize"):
        forced = RandomSharedOutput(RandomSharedEmbedding(**SHAPE), path=path).train()
        forced(torch.randn(4, 64)).sum().backward()
        with torch.no_grad():
            forced.eval()(torch.randn(4, 64))
        assert forced.path == path


def test_a_clear_cost_model_is_not_timed(monkeypatch):
    def fail(*args):
        raise AssertionError("timed")

    monkeypatch.setattr(PathChooser, "seconds_per_step", fail)
    monkeypatch.setattr(PathChooser, "seconds_per_call", fail)
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
        assert output.chooser.seconds_per_step(output.training_step(16), path) > 0
    assert all(p.grad is None for p in output.parameters())


class FakeClock:
    """A clock that only the timed paths move: each step or call through a path takes its seconds."""

    def __init__(self, seconds):
        self.now, self.seconds = 0.0, seconds

    def __call__(self):
        return self.now

    def run(self, path, features=None):
        self.now += self.seconds[path]
        return path, features


@pytest.fixture
def no_broadcast(monkeypatch):
    """Outside a distributed run nothing may be broadcast."""
    def broadcast(*args, **kwargs):
        raise AssertionError("broadcast outside a distributed run")

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)


@pytest.mark.parametrize("faster", ["pool-scores", "materialize"])
def test_the_chooser_times_training_steps_on_its_clock(no_broadcast, faster):
    slower = {"pool-scores": "materialize", "materialize": "pool-scores"}[faster]
    clock = FakeClock({faster: 0.001, slower: 0.003})
    paths = PathChooser("auto", (2000, 64, 8, 160), "layer", timer=clock)
    assert paths.path("cpu", torch.float32, "training") == "pool-scores"  # the cost model's
    assert paths.needs_timing("cpu", torch.float32, "training")
    assert paths.seconds_per_step(clock.run, slower) == pytest.approx(0.003)
    assert clock.now == pytest.approx(0.003 * (1 + MEASURED_STEPS))  # one warm-up step, untimed
    assert paths.time_training("cpu", clock.run, 100) == faster
    assert paths.path("cpu", torch.float32, "training") == faster
    assert not paths.needs_timing("cpu", torch.float32, "training")
    assert paths.needs_timing("cpu", torch.float32, "evaluation")  # chosen apart
    assert paths.path("cpu", torch.float32, "evaluation") == "pool-scores"


@pytest.mark.parametrize("faster", ["pool-scores", "materialize"])
def test_the_chooser_times_evaluation_per_token_on_its_clock(no_broadcast, faster):
    # Seconds per call; the second batch has twice the tokens, so it is the cost per token that counts.
    clock = FakeClock({"pool-scores": 0.1, "materialize": 0.15 if faster == "materialize" else 0.25})
    paths = PathChooser("auto", (2000, 64, 8, 160), "layer", timer=clock)
    batches = [torch.randn(10, 64), torch.randn(20, 64)]
    outputs = [paths.time_evaluation("cpu", clock.run, features, len(features)) for features in batches]
    assert [path for path, _ in outputs] == ["pool-scores", "materialize"]  # one path a call, its output
    assert all(got is features for (_, got), features in zip(outputs, batches))
    assert paths.evaluation_seconds == pytest.approx(
        {"pool-scores": 0.01, "materialize": 0.0075 if faster == "materialize" else 0.0125})
    assert paths.path("cpu", torch.float32, "evaluation") == faster
    assert not paths.needs_timing("cpu", torch.float32, "evaluation")
    assert paths.path("meta", torch.float32, "evaluation") == "materialize"  # chosen on the CPU only


def test_pool_scores_only_where_a_kernel_backend_is_registered():
    output = RandomSharedOutput(RandomSharedEmbedding(**SHAPE))
    assert output.path_on("cpu") == "pool-scores" and output.path_on("meta") == "materialize"
    backend = kernels.Backend("meta", torch.float32, available=lambda: True,
                              log_softmax_of_words=None, logsumexp_of_words=None)
    kernels.register(backend)
    try:
        assert output.path_on("meta") == "pool-scores"
        assert output.double().path_on("meta") == "materialize"  # float64 pool scores: no backend
    finally:
        kernels.unregister(backend)
    assert output.float().path_on("meta") == "materialize"


def rank_choice(rank, port, folder):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # Each rank measures the opposite: only rank 0's choice may count.
    times = [{"pool-scores": 2.0, "materialize": 1.0}, {"pool-scores": 1.0, "materialize": 2.0}][rank]
    PathChooser.seconds_per_step = rigged(times)
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


@pytest.fixture
def synchronized(monkeypatch):
    """torch.cuda.synchronize, recorded instead of run (no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(str(device)))
    return calls


# Shapes from tiny to the largest vocabulary, including ones the cost model calls clear either way.
SHAPES = [(2000, 64, 8, 160), (20_000, 512, 8, 1600), (10_000, 200, 8, 16_000), (800_000, 1024, 8, 64_000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_times_stock_ops_on_a_gpu_and_takes_materialize_where_they_lose(no_broadcast, synchronized, shape):
    clock = FakeClock({"pool-scores": 0.003, "materialize": 0.001})
    paths = PathChooser("auto", shape, "layer", timer=clock)
    assert paths.needs_timing("cuda", torch.float32, "training")  # no kernel there: stock ops, timed
    assert paths.time_training("cuda", clock.run, 100) == "materialize"
    assert paths.path("cuda", torch.float32, "training") == "materialize"
    assert not paths.needs_timing("cuda", torch.float32, "training")
    # Every timed step waited for the GPU: one warm-up and MEASURED_STEPS a path.
    assert synchronized == ["cuda"] * 2 * (1 + MEASURED_STEPS)


def test_auto_takes_pool_scores_on_a_gpu_where_it_is_timed_faster(no_broadcast, synchronized):
    clock = FakeClock({"pool-scores": 0.001, "materialize": 0.003})
    paths = PathChooser("auto", (10_000, 200, 8, 16_000), "layer", timer=clock)
    assert paths.path("cuda", torch.float32, "evaluation") == "materialize"  # untimed: no kernel there
    batches = [torch.randn(10, 64), torch.randn(10, 64)]
    for features in batches:
        paths.time_evaluation("cuda", clock.run, features, len(features))
    assert paths.path("cuda", torch.float32, "evaluation") == "pool-scores"
    assert len(synchronized) == 2 * (1 + MEASURED_STEPS)  # each path: a one-token warm-up, then timed calls


def test_stock_ops_on_the_cpu_are_not_timed():
    paths = PathChooser("auto", (2000, 64, 8, 160), "layer")
    assert paths.needs_timing("cpu", torch.float32, "training")  # the fused kernels' regime
    assert not paths.needs_timing("cpu", torch.float64, "training")  # stock ops, measured to lose
    assert paths.path("cpu", torch.float64, "training") == "materialize"


def test_a_path_that_runs_out_of_device_memory_loses(no_broadcast, synchronized):
    clock = FakeClock({"pool-scores": 0.003, "materialize": 0.001})

    def step(path):
        if path == "materialize":
            raise torch.OutOfMemoryError("CUDA out of memory")
        clock.run(path)

    paths = PathChooser("auto", (800_000, 1024, 8, 64_000), "layer", timer=clock)
    assert paths.time_training("cuda", step, 100) == "pool-scores"
