"""fairseq-rshare-compress: the least-squares fit, the k-means mappings, the stored mapping, and
real compressions of dense models trained by the fairseq CLI."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils

from conftest import USER_DIR, fairseq, tiny_lm
from fairseq_rshare.checkpoints import FAIRSEQ_GLOBALS
import fairseq_rshare.compress as compression
from fairseq_rshare.compress import balanced_assignment, fit_pool, kmeans, learned_mapping, reconstruct, relative_error
from fairseq_rshare.errors import RShareConfigError
from fairseq_rshare.mapping import fingerprint, learned_mapping_size, make_mapping
from fairseq_rshare.modules import RandomSharedEmbedding
from fairseq_rshare.modules.random_shared_embedding import fingerprint_parts
from fairseq_rshare.tools import eval_lm_perplexity
from recipes import record_result

# One worker trains the module's shared models (xdist_group) once.
pytestmark = pytest.mark.xdist_group("compress")


def test_pool_fit_is_the_least_squares_solution():
    """Against numpy's lstsq on the linear system D = A pool, with a row left out of the fit."""
    V, H, K, M = 14, 6, 3, 12
    d = H // K
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(V, H, generator=generator, dtype=torch.float64)
    mapping = torch.from_numpy(make_mapping(V, K, M, seed=5))
    rows = torch.ones(V, dtype=torch.bool)
    rows[1] = False
    system = np.zeros((V * H, M * d))
    for w in range(V):
        for k in range(K):
            for i in range(d):
                system[w * H + k * d + i, mapping[w, k] * d + i] = 1
    counted = np.repeat(rows.numpy(), H)
    solution = np.linalg.lstsq(system[counted], dense.numpy().reshape(-1)[counted], rcond=None)[0]
    pool, scales = fit_pool(dense, mapping, M, rows=rows)
    assert scales is None
    assert np.allclose(pool.numpy(), solution.reshape(M, d), atol=1e-12)


def test_word_scales_lower_the_error_at_every_step_down_to_a_stationary_point():
    V, H, K, M = 30, 8, 2, 8
    dense = torch.randn(V, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mapping = torch.from_numpy(make_mapping(V, K, M))
    plain = relative_error(dense, reconstruct(fit_pool(dense, mapping, M)[0], mapping))

    def error_after(alternations):
        pool, scales = fit_pool(dense, mapping, M, True, alternations)
        return relative_error(dense, reconstruct(pool, mapping, scales))

    errors = [error_after(n) for n in range(12)]
    assert errors[0] == pytest.approx(plain)  # no alternation yet: scales of 1, the plain fit
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.9 * plain
    pool, scales = fit_pool(dense, mapping, M, True, 2000)
    pool.requires_grad_()
    scales.requires_grad_()
    ((dense - reconstruct(pool, mapping, scales)) ** 2).sum().backward()
    assert pool.grad.abs().max() < 1e-6 and scales.grad.abs().max() < 1e-6


def planted(sizes, dim=5, spread=10.0, noise=0.05, seed=0):
    """Points around len(sizes) random centers, sizes[i] of them around center i, shuffled;
    returns (points, the center of each)."""
    generator = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(len(sizes), dim, generator=generator)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(len(labels), generator=generator)]
    return centers[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


@pytest.mark.parametrize("balanced", [False, True])
def test_kmeans_recovers_planted_clusters(balanced):
    points, labels = planted([25] * 40)
    centroids, assignment = kmeans(points, 40, seed=3, balanced=balanced)
    assert len(set(zip(labels.tolist(), assignment.tolist()))) == 40  # each planted cluster whole
    assert len(set(assignment.tolist())) == 40  # and apart from every other
    for cluster in range(40):
        assert torch.allclose(centroids[cluster], points[assignment == cluster].mean(0), atol=1e-5)


@pytest.mark.parametrize("sizes", [[1003], [900, 60, 30, 13]], ids=["uniform", "skewed"])
def test_balanced_kmeans_gives_every_cluster_floor_or_ceil_of_the_points(sizes):
    points, _ = planted(sizes, noise=1.0) if len(sizes) > 1 else (torch.rand(1003, 4), None)
    floor, extra = divmod(1003, 40)
    _, assignment = kmeans(points, 40, seed=0, balanced=True)
    counts = torch.bincount(assignment, minlength=40)
    assert sorted(counts.tolist()) == [floor] * (40 - extra) + [floor + 1] * extra
    if len(sizes) > 1:  # where k-means alone is far from balanced
        assert torch.bincount(kmeans(points, 40, seed=0)[1], minlength=40).max() > 2 * (floor + 1)


@pytest.mark.parametrize("points, clusters, seed", [(500, 40, 2), (10000, 720, 0)], ids=["small", "ptb-sized"])
def test_balanced_assignment_ends_with_floor_or_ceil_of_the_points(points, clusters, seed, monkeypatch):
    """Random centroids: the shape where centroids already full were once capped again, so no
    centroid had room for the last points and the rounds never ended."""
    generator = torch.Generator().manual_seed(seed)
    points, centroids = torch.randn(points, 4, generator=generator), torch.randn(clusters, 4, generator=generator)
    rounds = []
    nearest = compression.nearest_centroids

    def one_round(*args, **kwargs):  # each round places a point, so len(points) rounds are enough
        rounds.append(1)
        assert len(rounds) <= len(points), "balanced_assignment stopped placing points"
        return nearest(*args, **kwargs)

    monkeypatch.setattr(compression, "nearest_centroids", one_round)
    counts = torch.bincount(balanced_assignment(points, centroids), minlength=clusters)
    floor, extra = divmod(len(points), clusters)
    assert sorted(counts.tolist()) == [floor] * (clusters - extra) + [floor + 1] * extra


def test_learned_mapping_size_counts_the_bits_of_a_slot():
    assert learned_mapping_size(10000, 8, 8000) == (10000 * 8 * 10, 100000)  # 1000 entries a position
    assert learned_mapping_size(10000, 8, 8000, "global") == (10000 * 8 * 13, 130000)
    assert learned_mapping_size(5, 4, 8) == (20, 3)  # 2 entries a position: 1 bit


def tables_of(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RandomSharedEmbedding)]


def with_learned_mappings(model, seed=0):
    """The model's state with a k-means mapping of a random table stored in each table."""
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, table in tables_of(model):
        dense = torch.randn(table.num_embeddings, table.embedding_dim, generator=generator)
        mapping, pool = learned_mapping(dense, table.layout, iterations=5, seed=seed)
        state[f"{name}.pool"] = pool
        state[f"{name}.stored_mapping"] = mapping.int()
        state[f"{name}.mapping_fingerprint"] = torch.tensor(fingerprint_parts(fingerprint(mapping.numpy())))
    return state


def test_a_learned_mapping_is_used_only_once_loaded_and_survives_saving(tmp_path):
    model = tiny_lm(rshare_mapping="kmeans")
    tokens = torch.randint(4, 64, (2, 7))
    with pytest.raises(RShareConfigError, match="--rshare-mapping kmeans is learned .* fairseq-rshare-compress"):
        model(tokens)
    state = with_learned_mappings(model)
    model.load_state_dict(state)
    for name, table in tables_of(model):
        assert torch.equal(table.mapping, state[f"{name}.stored_mapping"].long())
        assert table.fingerprint == fingerprint(table.mapping.numpy())
    torch.save(model.state_dict(), tmp_path / "model.pt")
    again = tiny_lm(rshare_mapping="kmeans")
    again.load_state_dict(torch.load(tmp_path / "model.pt"))
    for (_, table), (_, loaded) in zip(tables_of(model), tables_of(again)):
        assert torch.equal(table.mapping, loaded.mapping) and torch.equal(table.pool, loaded.pool)
    output = again.decoder.output_projection
    assert torch.equal(output.mapping_columns.long(), output.table.mapping)  # the output layer follows
    with torch.no_grad():
        assert torch.equal(again(tokens)[0], model(tokens)[0])


def test_a_wrong_or_missing_stored_mapping_is_refused():
    model = tiny_lm(rshare_mapping="kmeans")
    state = with_learned_mappings(model)
    tampered = dict(state)
    stored = tampered["decoder.embed_tokens.stored_mapping"].clone()
    stored[5, 1] = stored[6, 1] if stored[5, 1] != stored[6, 1] else stored[7, 1]  # another entry of position 1
    tampered["decoder.embed_tokens.stored_mapping"] = stored
    with pytest.raises(RShareConfigError, match="the stored mapping does not match its fingerprint"):
        tiny_lm(rshare_mapping="kmeans").load_state_dict(tampered)
    with pytest.raises(RShareConfigError, match="saved before its learned mapping was loaded"):
        tiny_lm(rshare_mapping="kmeans").load_state_dict(tiny_lm(rshare_mapping="kmeans").state_dict())
    with pytest.raises(RShareConfigError, match="has no stored mapping"):
        tiny_lm(rshare_mapping="kmeans").load_state_dict(tiny_lm().state_dict())
    with pytest.raises(RShareConfigError, match="holds a mapping learned by fairseq-rshare-compress"):
        tiny_lm().load_state_dict(state)


def test_frequent_words_need_the_random_mapping():
    with pytest.raises(RShareConfigError, match="--rshare-mapping kmeans learns every word's entries: drop one"):
        tiny_lm(rshare_mapping="kmeans", rshare_frequent_words=3)


# Real compressions: dense models trained by fairseq-train, compressed by the command.

COMMON = ["--cpu", "--optimizer", "adam", "--lr", "0.01", "--no-progress-bar", "--log-format", "simple",
          "--no-epoch-checkpoints", "--seed", "1", "--disable-validation", "--log-interval", "1"]
STATEFUL = ["--task", "stateful_lm", "--batch-size", "8", "--tokens-per-sample", "35"]
LSTM_LM = ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32", "--decoder-hidden-size", "32",
           "--decoder-out-embed-dim", "32"]
KMEANS = ["--rshare-ratio", "0.1", "--rshare-mapping", "kmeans", "--rshare-output-bias",
          "--rshare-output-path", "materialize"]


def compress(*args):
    """Run the compress command; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "fairseq_rshare.cli.compress", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(result, message, prefix="fairseq-rshare-compress: error: "):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix) and message in last, last


def load(path, **overrides):
    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        [model], _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides)
    return model.eval(), task


def perplexities(report):
    return [float(x) for x in re.findall(r"perplexity ([\d.]+)", report)]


@pytest.fixture(scope="module")
def dense_lstm_lm(lm_data, tmp_path_factory):
    """A dense LSTM LM (--rshare-tables none) trained 40 updates on the PTB slice."""
    save_dir = tmp_path_factory.mktemp("dense_lstm_lm")
    fairseq("fairseq-train", lm_data, "--user-dir", USER_DIR, *COMMON, *STATEFUL, *LSTM_LM,
            "--rshare-tables", "none", "--max-update", "40", "--save-dir", save_dir)
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def kmeans_lstm_lm(dense_lstm_lm, lm_data, tmp_path_factory):
    """(path, report) of the dense LSTM LM compressed with a k-means mapping."""
    output = tmp_path_factory.mktemp("kmeans_lstm_lm") / "compressed.pt"
    result = compress(dense_lstm_lm, output, "--data", lm_data, *KMEANS)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


@pytest.mark.slow
def test_compressed_lstm_lm_holds_the_fitted_tables_and_the_dense_weights(dense_lstm_lm, kmeans_lstm_lm):
    path, report = kmeans_lstm_lm
    dense, _ = load(dense_lstm_lm)
    model, _ = load(path)
    assert model.decoder.embed_tokens.mapping_kind == "kmeans"
    dense_weights = {"decoder.embed_tokens": dense.decoder.embed_tokens.weight,
                     "decoder.output_projection.table": dense.decoder.fc_out.weight}
    for name, table in tables_of(model):
        rows = torch.ones(table.num_embeddings, dtype=torch.bool)
        if name == "decoder.embed_tokens":
            rows[table.padding_idx] = False  # the input's pad vector is never used
        D = dense_weights[name].detach()

        def fitted(mapping):
            return reconstruct(fit_pool(D, mapping, table.pool_size, rows=rows)[0], mapping)

        with torch.no_grad():
            assert torch.allclose(table.materialized_weight()[rows], fitted(table.mapping)[rows].float(), atol=1e-6)
        error = relative_error(D, fitted(table.mapping), rows)
        random_mapping = torch.from_numpy(make_mapping(table.num_embeddings, 8, table.pool_size))
        assert error < relative_error(D, fitted(random_mapping), rows)  # learned beats random
        _, size = learned_mapping_size(table.num_embeddings, 8, table.pool_size)
        assert f"{name}: V={table.num_embeddings} H=32 K=8 M={table.pool_size} (position)" in report
        assert f"mapping {size:,} bytes" in report and f"relative error {error:.4f}" in report
    compressed, original = model.state_dict(), dense.state_dict()
    for key in compressed.keys() - {"decoder.output_projection.bias"}:
        if not key.startswith(("decoder.embed_tokens.", "decoder.output_projection.table.")):
            assert torch.equal(compressed[key], original[key]), key
    assert torch.equal(compressed["decoder.output_projection.bias"], original["decoder.fc_out.bias"])
    state = torch.load(path, weights_only=False)
    assert "last_optimizer_state" not in state and state["optimizer_history"][-1]["num_updates"] == 0
    assert state["cfg"]["model"].rshare_mapping == "kmeans" and state["cfg"]["model"].rshare_tables == "all"


@pytest.mark.slow
def test_eval_lm_gives_the_validation_perplexities_compress_reported(dense_lstm_lm, kmeans_lstm_lm, lm_data):
    """Both perplexities were computed over the valid stream with the LSTM state carried from
    batch to batch, as fairseq-eval-lm computes them."""
    path, report = kmeans_lstm_lm
    reported = perplexities(report)
    assert len(reported) == 2 and reported[0] < reported[1]  # dense, then compressed
    for checkpoint, expected in zip((dense_lstm_lm, path), reported):
        result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--cpu", *STATEFUL,
                         "--path", checkpoint, "--gen-subset", "valid")
        assert eval_lm_perplexity(result.stdout + result.stderr) == pytest.approx(expected, abs=0.01)


@pytest.mark.slow
def test_the_recipes_record_what_compress_reported(kmeans_lstm_lm, tmp_path):
    path, report = kmeans_lstm_lm
    log = tmp_path / "compress.log"
    log.write_text(report)
    recorded = record_result.compression_report(str(log), 12.0)["compressed"]
    model, _ = load(path)
    assert set(recorded["relative_errors"]) == {name for name, _ in tables_of(model)}
    for name, error in recorded["relative_errors"].items():
        assert re.search(rf"^{re.escape(name)}: V=.*relative error {error:.4f}$", report, re.MULTILINE)
    assert [recorded["teacher_valid_ppl"], recorded["valid_ppl"]] == perplexities(report)
    assert recorded["seconds"] == 12.0
    log.write_text(report.replace("relative error", "error"))
    with pytest.raises(SystemExit, match="names no fitted table"):
        record_result.compression_report(str(log), None)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_compressed_model(kmeans_lstm_lm, lm_data, tmp_path):
    path, _ = kmeans_lstm_lm
    result = fairseq("fairseq-train", lm_data, "--user-dir", USER_DIR, *COMMON, *STATEFUL, *LSTM_LM, *KMEANS,
                     "--finetune-from-model", path, "--max-update", "3", "--save-dir", tmp_path)
    log = result.stdout + result.stderr
    assert f"Loaded checkpoint {path} (epoch 1 @ 0 updates)" in log
    losses = [float(x) for x in re.findall(r"\| train_inner \|.*? loss=([\d.]+)", log)]
    assert len(losses) == 3 and losses[0] < 11  # log2(V) = 12.3 from scratch
    tuned = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)["model"]
    assert torch.equal(tuned["decoder.embed_tokens.stored_mapping"],
                       torch.load(path, weights_only=False)["model"]["decoder.embed_tokens.stored_mapping"])


@pytest.mark.slow
def test_kmeans_model_exports_and_both_output_paths_agree(kmeans_lstm_lm, tmp_path):
    path, _ = kmeans_lstm_lm
    model, _ = load(path)
    result = subprocess.run([sys.executable, "-m", "fairseq_rshare.cli.export", path, tmp_path / "stock.pt"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = torch.load(tmp_path / "stock.pt")["model"]
    with torch.no_grad():
        assert torch.equal(exported["decoder.embed_tokens.weight"], model.decoder.embed_tokens.materialized_weight())
        assert torch.equal(exported["decoder.fc_out.weight"], model.decoder.output_projection.table.materialized_weight())
    tokens = torch.randint(4, len(model.decoder.dictionary), (3, 9), generator=torch.Generator().manual_seed(0))
    log_probs = []
    for output_path in ("pool-scores", "materialize"):
        model, _ = load(path, rshare_output_path=output_path)
        with torch.no_grad():
            log_probs.append(model.get_normalized_probs(model(tokens), log_probs=True))
    assert torch.allclose(*log_probs, atol=1e-5)


@pytest.mark.slow
def test_stock_tied_lstm_lm_becomes_one_fitted_table(lm_data, tmp_path):
    """A stock lstm_lm (no plugin) with tied tables, compressed with word scales: one fit."""
    fairseq("fairseq-train", lm_data, *COMMON, "--task", "language_modeling", "--tokens-per-sample", "32",
            "--max-tokens", "2048", "--arch", "lstm_lm", "--decoder-embed-dim", "32", "--decoder-hidden-size", "32",
            "--decoder-out-embed-dim", "32", "--share-decoder-input-output-embed", "--max-update", "20",
            "--save-dir", tmp_path)
    result = compress(tmp_path / "checkpoint_last.pt", tmp_path / "compressed.pt", "--rshare-ratio", "0.2",
                      "--rshare-word-scale", "--rshare-output-path", "materialize")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("relative error") == 1
    assert "decoder.embed_tokens = decoder.output_projection.table: " in result.stdout
    assert "an rshare_lstm_lm checkpoint" in result.stdout
    dense, _ = load(tmp_path / "checkpoint_last.pt")
    model, _ = load(tmp_path / "compressed.pt")
    table = model.decoder.embed_tokens
    assert model.decoder.output_projection.table is table and table.word_scale is not None
    pool, scales = fit_pool(dense.decoder.embed_tokens.weight.detach(), table.mapping, table.pool_size, True, 10)
    assert torch.allclose(table.pool, pool.float(), atol=1e-6) and torch.allclose(table.word_scale, scales.float(), atol=1e-6)
    assert model.decoder.output_projection.bias is None
    compressed, original = model.state_dict(), dense.state_dict()
    assert compressed.keys() - original.keys() == {f"{prefix}.{suffix}" for prefix in (
        "decoder.embed_tokens", "decoder.output_projection.table") for suffix in (
        "pool", "word_scale", "mapping_fingerprint", "mapping_version")}
    for key in original.keys() - {"decoder.embed_tokens.weight"}:
        assert torch.equal(compressed[key], original[key]), key


@pytest.mark.slow
def test_transformer_nmt_compresses_with_a_balanced_mapping_and_translates(nmt_data, tmp_path):
    fairseq("fairseq-train", nmt_data, *COMMON, "--task", "translation", "--source-lang", "de",
            "--target-lang", "en", "--max-tokens", "2048", "--arch", "transformer", "--encoder-layers", "1",
            "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
            "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--max-update", "20", "--save-dir", tmp_path)
    result = compress(tmp_path / "checkpoint_last.pt", tmp_path / "compressed.pt", "--data", nmt_data,
                      "--rshare-ratio", "0.2", "--rshare-subvectors", "4", "--rshare-mapping", "kmeans-balanced",
                      "--kmeans-iterations", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("relative error") == 3 and len(perplexities(result.stdout)) == 2
    model, _ = load(tmp_path / "compressed.pt")
    for _, table in tables_of(model):
        per_position = table.pool_size // table.num_subvectors
        floor, extra = divmod(table.num_embeddings, per_position)
        for k in range(table.num_subvectors):
            counts = torch.bincount(table.mapping[:, k] - k * per_position, minlength=per_position)
            assert sorted(counts.tolist()) == [floor] * (per_position - extra) + [floor + 1] * extra
    generated = fairseq("fairseq-generate", nmt_data, "--user-dir", USER_DIR, "--path", tmp_path / "compressed.pt",
                        "--gen-subset", "test", "--beam", "2", "--batch-size", "8", "--cpu",
                        "--required-batch-size-multiple", "1")
    assert len([line for line in generated.stdout.splitlines() if line.startswith("H-")]) == 20


@pytest.mark.slow
def test_bad_requests_fail_with_one_line(dense_lstm_lm, kmeans_lstm_lm, lm_data, tmp_path):
    before = dense_lstm_lm.read_bytes()
    assert_one_line_error(compress(dense_lstm_lm, dense_lstm_lm, *KMEANS), "is the dense checkpoint itself")
    assert dense_lstm_lm.read_bytes() == before
    result = compress(dense_lstm_lm, tmp_path / "out.pt", "--rshare-ratio", "0.1")
    assert_one_line_error(result, "the dense output layer has a bias (decoder.fc_out.bias): add --rshare-output-bias")
    path, _ = kmeans_lstm_lm
    assert_one_line_error(compress(path, tmp_path / "out.pt"), "already random-shares a table")
    assert not (tmp_path / "out.pt").exists()
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.embed_tokens.stored_mapping"][10, 0] += 1
    torch.save(state, tmp_path / "tampered.pt")
    result = fairseq("fairseq-eval-lm", lm_data, "--user-dir", USER_DIR, "--cpu", *STATEFUL,
                     "--path", tmp_path / "tampered.pt", check=False)
    assert_one_line_error(result, "the stored mapping does not match its fingerprint", "fairseq_rshare: error: ")
    result = fairseq("fairseq-train", lm_data, "--user-dir", USER_DIR, *COMMON, *STATEFUL, *LSTM_LM, *KMEANS,
                     "--max-update", "2", "--save-dir", tmp_path / "scratch", check=False)
    assert_one_line_error(result, "--rshare-mapping kmeans is learned from a trained dense model by "
                                  "fairseq-rshare-compress", "fairseq_rshare: error: ")
    assert "Start iterating over samples" not in result.stdout + result.stderr  # before any batch is read
