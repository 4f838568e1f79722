import pathlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.data import Dictionary

import fairseq_rshare
from fairseq_rshare import RandomSharedEmbedding, RandomSharedOutput, RShareConfigError
from fairseq_rshare.kernels import extension, log_softmax_of_words, logsumexp_of_words, stock_word_logits
from fairseq_rshare.mapping import POOL_LAYOUTS, PoolLayout, fingerprint, make_mapping
from fairseq_rshare.modules import pool_scores_is_cheaper
from fairseq_rshare.models.rshare_flags import RShareConfig
from fairseq_rshare.models.rshare_tables import most_frequent_words

from conftest import tiny_lm

GOLDEN_FINGERPRINTS = {
    (10, 4, 8, "position", 1): "508325ab1362e31",
    (10, 4, 8, "global", 1): "2cb1708d1220455",
    (1000, 8, 800, "position", 1): "2fd7caaa87f519c",
    (1000, 8, 800, "global", 1): "9286a2d308b7464",
    (33278, 8, 26616, "position", 7): "b3492db92290dfd",
    (12345, 4, 1000, "global", 123): "65a73c57560a9ec",
}


@pytest.mark.parametrize("config", sorted(GOLDEN_FINGERPRINTS))
def test_mapping_matches_golden_fingerprint(config):
    assert fingerprint(make_mapping(*config)) == GOLDEN_FINGERPRINTS[config]


@pytest.mark.parametrize("V,K,M", [(1000, 8, 800), (997, 4, 40), (50, 5, 35), (12345, 4, 1000)])
def test_global_pool_is_balanced(V, K, M):
    counts = np.bincount(make_mapping(V, K, M, "global", seed=3).ravel(), minlength=M)
    share = V * K / M
    assert counts.sum() == V * K
    assert np.all(np.abs(counts - share) <= 1)


@pytest.mark.parametrize("V,K,M", [(1000, 8, 800), (997, 4, 40), (50, 5, 35), (12345, 4, 1000)])
def test_position_pools_are_balanced_and_private(V, K, M):
    mapping = make_mapping(V, K, M, "position", seed=3)
    per_position = M // K
    for k in range(K):
        column = mapping[:, k]
        assert column.min() >= k * per_position and column.max() < (k + 1) * per_position
        counts = np.bincount(column - k * per_position, minlength=per_position)
        assert np.all(np.abs(counts - V / per_position) <= 1)


@pytest.mark.parametrize("kind", ["position", "global"])
def test_private_words_get_private_entries_and_the_rest_stay_balanced(kind):
    V, K, M, F = 1000, 4, 400, 60
    private_words = np.random.default_rng(0).choice(V, F, replace=False)
    mapping = make_mapping(V, K, M, kind, seed=3, private_words=private_words)
    private, shared = mapping[private_words], np.delete(mapping, private_words, axis=0)
    assert len(np.unique(private)) == F * K
    assert not np.isin(shared, private).any()
    counts = np.bincount(shared.ravel(), minlength=M)[np.setdiff1d(np.arange(M), private)]
    assert np.all(np.abs(counts - (V - F) * K / (M - F * K)) <= 1)
    if kind == "position":
        assert np.array_equal(mapping // (M // K), np.broadcast_to(np.arange(K), (V, K)))


def test_frequent_words_are_chosen_by_count_and_never_special():
    dictionary = Dictionary()
    for word, count in [("rare", 1), ("common", 50), ("middle", 7), ("often", 50), ("once", 1)]:
        dictionary.add_symbol(word, n=count)
    dictionary.count[dictionary.pad()] = dictionary.count[dictionary.eos()] = 10**6
    ids = [dictionary.index(word) for word in ("common", "often", "middle", "rare")]
    assert most_frequent_words(dictionary, 4) == ids
    assert most_frequent_words(dictionary, 0) == []
    with pytest.raises(RShareConfigError, match="--rshare-frequent-words 6 is more than the 5 words"):
        most_frequent_words(dictionary, 6)
    with pytest.raises(RShareConfigError, match="--rshare-frequent-words must be 0 or more"):
        most_frequent_words(dictionary, -1)


def test_mapping_depends_on_seed_and_is_repeatable():
    first = make_mapping(500, 4, 200, "position", seed=1)
    assert np.array_equal(first, make_mapping(500, 4, 200, "position", seed=1))
    assert not np.array_equal(first, make_mapping(500, 4, 200, "position", seed=2))


def make_output(V=37, H=12, K=4, M=16, kind="position", bias=False, path="pool-scores"):
    torch.manual_seed(0)
    table = RandomSharedEmbedding(V, H, padding_idx=1, num_subvectors=K, pool_size=M, pool_kind=kind)
    output = RandomSharedOutput(table, bias=bias, path=path).double()
    if bias:
        torch.nn.init.normal_(output.bias)
    return output


@pytest.mark.parametrize("kind", ["position", "global"])
@pytest.mark.parametrize("bias", [False, True])
def test_output_logits_equal_materialized_matrix(kind, bias):
    output = make_output(V=301, H=24, K=6, M=60, kind=kind, bias=bias)
    features = torch.randn(3, 5, 24, dtype=torch.float64)
    weight = torch.stack(
        [torch.cat([output.table.pool[j] for j in row]) for row in output.table.mapping.tolist()]
    )
    expected = torch.log_softmax(features @ weight.t() + (output.bias if bias else 0), dim=-1)
    assert torch.allclose(output(features), expected, atol=1e-5, rtol=0)
    assert torch.allclose(output.materialized_forward(features), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["position", "global"])
@pytest.mark.parametrize("bias", [False, True])
def test_output_gradients_pass_gradcheck(kind, bias):  # float64: the stock-ops path
    output = make_output(kind=kind, bias=bias)
    features = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    pool = output.table.pool.detach().clone().requires_grad_()
    names = ["table.pool"] + (["bias"] if bias else [])
    extra = [output.bias.detach().clone().requires_grad_()] if bias else []

    def logits(x, *params):
        return functional_call(output, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(logits, (features, pool, *extra))


@pytest.mark.parametrize("kind", ["position", "global"])
def test_output_gradients_equal_materialized_gradients(kind):
    output = make_output(V=211, H=16, K=4, M=40, kind=kind, bias=True)
    features = torch.randn(9, 16, dtype=torch.float64)
    targets = torch.randint(211, (9,))
    grads = []
    for forward in (output, output.materialized_forward):
        output.zero_grad()
        F.nll_loss(forward(features), targets).backward()
        grads.append((output.table.pool.grad.clone(), output.bias.grad.clone()))
    for fast, reference in zip(*grads):
        assert torch.allclose(fast, reference, atol=1e-10)


@pytest.mark.parametrize(
    "V,H,K,M,path",
    [(10_000, 200, 8, 16_000, "materialize"), (10_000, 200, 8, 1_600, "pool-scores"),
     (10_000, 1024, 8, 800, "pool-scores"), (33_000, 512, 8, 2_640, "pool-scores"),
     (1000, 64, 4, 400, "materialize")],
)
def test_auto_path_picks_by_the_cost_model(V, H, K, M, path):
    output = RandomSharedOutput(RandomSharedEmbedding(V, H, 1, K, M))
    assert output.path == path
    assert pool_scores_is_cheaper(V, H, K, M) == (path == "pool-scores")
    # No pool-scores kernel off the CPU: auto takes the materialised matrix there.
    assert output.path_on("cuda") == "materialize" and not pool_scores_is_cheaper(V, H, K, M, "cuda")


@pytest.mark.parametrize("path", ["pool-scores", "materialize"])
def test_a_forced_path_is_kept_on_every_device(path):
    output = RandomSharedOutput(RandomSharedEmbedding(10_000, 200, 1, 8, 16_000), path=path)
    assert output.path == output.path_on("cpu") == output.path_on("cuda") == path


@pytest.mark.parametrize("kind", ["position", "global"])
def test_both_paths_give_the_same_log_probs_and_gradients(kind):
    features = torch.randn(7, 16, dtype=torch.float64)
    targets = torch.randint(211, (7,))
    results = []
    for path in ("pool-scores", "materialize"):
        output = make_output(V=211, H=16, K=4, M=40, kind=kind, bias=True, path=path)
        torch.nn.init.normal_(output.bias)
        lprobs = output(features)
        F.nll_loss(lprobs, targets).backward()
        results.append((lprobs, output.table.pool.grad, output.bias.grad))
    for first, second in zip(*results):
        assert torch.allclose(first, second, atol=1e-10)


def test_unknown_output_path_names_the_flag():
    with pytest.raises(RShareConfigError, match="path must be one of"):
        RandomSharedOutput(RandomSharedEmbedding(100, 16, 1, 4, 40), path="fast")


@pytest.mark.parametrize("kind", ["position", "global"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_kernels_match_stock_ops_in_float32(kind, bias):
    assert extension() is not None, "the fused kernels did not compile"
    output = make_output(V=3001, H=64, K=8, M=400, kind=kind, bias=bias).float()
    scores = torch.randn(37, output.column_uses.numel(), requires_grad=True)  # 37: not a whole tile
    targets = torch.randint(3001, (37,))
    weights = torch.rand(37)
    params = [scores] + ([output.bias] if bias else [])
    fused = [
        (lprobs := log_softmax_of_words(scores, output.mapping_columns, output.bias),
         *torch.autograd.grad(F.nll_loss(lprobs, targets), params)),
        (lse := logsumexp_of_words(scores, output.mapping_columns, output.bias),
         *torch.autograd.grad((lse * weights).sum(), params)),
    ]

    def logits():
        return stock_word_logits(scores, output.mapping_columns, output.bias)

    stock = [
        (lprobs := F.log_softmax(logits(), -1), *torch.autograd.grad(F.nll_loss(lprobs, targets), params)),
        (lse := torch.logsumexp(logits(), -1), *torch.autograd.grad((lse * weights).sum(), params)),
    ]
    for fused_results, stock_results in zip(fused, stock):
        for a, b in zip(fused_results, stock_results):
            assert torch.allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # stock ops, fused kernels
@pytest.mark.parametrize("kind,bias", [("position", False), ("global", True)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_equals_fairseq_label_smoothed_loss_over_log_probs(dtype, kind, bias, label_smoothing):
    output = make_output(V=501, H=32, K=4, M=80, kind=kind, bias=bias).to(dtype)
    features = torch.randn(3, 7, 32, dtype=dtype, requires_grad=True)
    targets = torch.randint(501, (3, 7))
    targets[0, -2:] = 1  # padding: no loss, no gradient
    results = []
    for fused in (True, False):
        if fused:
            loss, nll = output.loss(features, targets, label_smoothing, ignore_index=1)
        else:
            lprobs = output.materialized_forward(features).reshape(-1, 501)
            loss, nll = label_smoothed_nll_loss(lprobs, targets.reshape(-1), label_smoothing, ignore_index=1)
        grads = torch.autograd.grad(loss, [features, output.table.pool] + ([output.bias] if bias else []))
        results.append((loss, nll, *grads))
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    for fast, reference in zip(*results):
        assert torch.allclose(fast, reference, atol=tolerance, rtol=tolerance)


def test_eval_mode_reuses_the_materialized_matrix_until_the_pool_changes():
    output = make_output(path="materialize").eval()
    features = torch.randn(2, 12, dtype=torch.float64)
    with torch.no_grad():
        first = output(features)
        assert output.materialized_weight() is output.materialized_weight()
        output.table.pool.mul_(2.0)
        assert not torch.allclose(output(features), first)
        assert torch.allclose(torch.log_softmax(output(features), -1), output.materialized_forward(features))
        kept = output._weight
        output.eval()  # as fairseq's valid_step does before every batch
        output(features)
        assert output._weight is kept
    output.train()
    assert output._weight is None


def test_embedding_concatenates_pool_rows_and_zeroes_padding():
    table = RandomSharedEmbedding(50, 12, padding_idx=1, num_subvectors=3, pool_size=30)
    tokens = torch.tensor([[0, 1, 2], [49, 1, 7]])
    vectors = table(tokens)
    assert vectors.shape == (2, 3, 12)
    assert torch.equal(vectors[:, 1], torch.zeros(2, 12))
    for word in (0, 2, 49, 7):
        rows = [table.pool[j] for j in table.mapping[word].tolist()]
        position = (tokens == word).nonzero()[0].tolist()
        assert torch.equal(vectors[tuple(position)], torch.cat(rows))


@pytest.mark.parametrize("kind,private", [("position", ()), ("global", ()), ("position", (5, 6))])
def test_materialized_matrix_gradient_sums_each_pool_row_over_its_slots(kind, private):
    table = RandomSharedEmbedding(40, 12, 1, 4, 24, kind, private_words=private).double()
    upstream = torch.randn(40, 12, dtype=torch.float64)
    (table.materialized_weight() * upstream).sum().backward()
    slots = upstream.view(40, 4, 3)
    expected = torch.stack([slots[table.mapping == row].sum(0) for row in range(24)])
    torch.testing.assert_close(table.pool.grad, expected)


def test_padding_gets_no_gradient():
    table = RandomSharedEmbedding(20, 8, padding_idx=1, num_subvectors=2, pool_size=10)
    table(torch.tensor([1, 1, 1])).sum().backward()
    assert torch.count_nonzero(table.pool.grad) == 0


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_is_pool_plus_bias(bias):
    V, H, K, M = 1000, 64, 8, 400
    output = RandomSharedOutput(RandomSharedEmbedding(V, H, 1, K, M), bias=bias)
    trainable = sum(p.numel() for p in output.parameters() if p.requires_grad)
    assert trainable == M * H // K + (V if bias else 0)
    assert set(output.state_dict()) == {"table.pool", "table.mapping_fingerprint", "table.mapping_version"} | (
        {"bias"} if bias else set()
    )


@pytest.mark.parametrize(
    "V,H,K,M,kind,message",
    [
        (100, 30, 4, 40, "position", "not divisible by num_subvectors"),
        (100, 8, 16, 32, "position", "larger than the embedding dim"),
        (100, 16, 4, 2, "global", "smaller than num_subvectors"),
        (100, 16, 4, 42, "position", "use 40 or 44"),
        (100, 16, 4, 400, "position", "no compression"),
        (100, 16, 0, 40, "position", "num_subvectors must be positive"),
        (100, 16, 4, -4, "position", "pool_size must be positive"),
        (100, 16, 4, 4, "position", "every word would get the same vector"),
        (2**29, 16, 4, 64, "position", "more than the 2147483647 supported"),
        (100, 16, 4, 40, "shared", "pool_kind must be one of"),
    ],
)
def test_invalid_tables_name_the_argument(V, H, K, M, kind, message):
    with pytest.raises(RShareConfigError, match=message):
        RandomSharedEmbedding(V, H, 1, K, M, pool_kind=kind)


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"rshare_pool_size": 42}, "^--rshare-pool-size 42 is not divisible by --rshare-subvectors 4 "
                                   r"\(per-position pools\): use 40 or 44, or --rshare-pool-kind global$"),
        ({"rshare_pool_size": 40, "rshare_frequent_words": 9},
         r"^--rshare-frequent-words 9 leaves .* use at most 8 \(or a larger --rshare-pool-size\)$"),
        ({"rshare_input_ratio": 0.999}, "^--rshare-input-ratio 0.999, a pool of 256 gives no compression"),
        ({"rshare_word_scale": True, "rshare_output_path": "pool-scores"},
         "^--rshare-word-scale runs on the materialize output path only: use --rshare-output-path materialize or auto$"),
    ],
)
def test_the_builder_names_the_flags(flags, message):
    with pytest.raises(RShareConfigError, match=message):
        tiny_lm(**flags)


def test_the_flags_offer_every_pool_layout():
    choices = {field.name: field.type for field in RShareConfig.__dataclass_fields__.values()}
    assert set(choices["rshare_pool_kind"]._member_names_) == set(POOL_LAYOUTS) >= {"position", "global"}


@pytest.mark.parametrize("kind", sorted(POOL_LAYOUTS))
def test_a_pool_layout_places_every_slot_in_its_entries_and_score_columns(kind):
    V, K, M = 50, 4, 40
    layout = POOL_LAYOUTS[kind](V, K, M)
    assert isinstance(layout, PoolLayout)
    mapping = torch.from_numpy(layout.random_mapping(seed=3, private_words=np.array([], dtype=np.int64)))
    low, high = layout.entry_bounds()
    assert bool(((mapping >= low) & (mapping < high)).all())
    columns = layout.mapping_columns(mapping)
    assert 0 <= int(columns.min()) and int(columns.max()) < layout.score_columns()
    pool, slices = torch.randn(M, 3, dtype=torch.float64), torch.randn(K, 2, 3, dtype=torch.float64)
    scores = layout.pool_scores(slices, pool).transpose(0, 1).reshape(2, -1)
    expected = torch.einsum("ktd,vkd->tvk", slices, pool[mapping]).sum(-1)  # token t, word v
    assert torch.allclose(scores[:, columns.long()].sum(-1), expected)


def test_no_module_below_the_models_names_a_flag():
    package = pathlib.Path(fairseq_rshare.__file__).parent
    below = [*(package / "modules").glob("*.py"), *(package / "kernels").glob("*.py"),
             package / "mapping.py", package / "compress.py"]
    assert [path.name for path in below if "--rshare" in path.read_text()] == []


def test_only_the_kernel_registry_names_a_device_type():
    """What runs where is the kernels' registry's knowledge; the modules ask it."""
    package = pathlib.Path(fairseq_rshare.__file__).parent
    naming = [str(path.relative_to(package)) for path in package.rglob("*.py")
              if path.parent.name != "kernels" and re.search(r"""["']cpu["']""", path.read_text())]
    assert naming == []


@pytest.mark.parametrize("count", [9, 100])
def test_too_many_private_words_are_refused(count):
    with pytest.raises(RShareConfigError, match="private_words .*use at most 8"):
        RandomSharedEmbedding(100, 16, 1, 4, 40, private_words=range(count))


def test_loading_weights_of_another_mapping_is_an_error():
    trained = RandomSharedEmbedding(100, 16, 1, 4, 40, seed=1)
    other_seed = RandomSharedEmbedding(100, 16, 1, 4, 40, seed=2)
    with pytest.raises(RShareConfigError, match="mapping fingerprint"):
        other_seed.load_state_dict(trained.state_dict())
    same = RandomSharedEmbedding(100, 16, 1, 4, 40, seed=1)
    same.load_state_dict(trained.state_dict())
    assert torch.equal(same.pool, trained.pool)


def test_word_scale_weighs_each_sub_vector_in_the_embedding_and_the_output():
    V, H, K, M = 40, 12, 3, 30
    table = RandomSharedEmbedding(V, H, padding_idx=1, num_subvectors=K, pool_size=M, word_scale=True)
    with torch.no_grad():
        table.word_scale.uniform_(-2.0, 2.0)
    output = RandomSharedOutput(table, bias=True, path="auto")
    assert output.path == "materialize"
    pool, mapping, scale = table.pool.detach().numpy(), table.mapping.numpy(), table.word_scale.detach().numpy()
    dense = np.stack([np.concatenate([scale[w, k] * pool[mapping[w, k]] for k in range(K)]) for w in range(V)])
    tokens = torch.tensor([[0, 5, 39], [7, 1, 2]])
    vectors = table(tokens).detach().numpy()
    for position, word in np.ndenumerate(tokens.numpy()):
        expected = np.zeros(H) if word == 1 else dense[word]
        assert np.allclose(vectors[position], expected, atol=1e-6)
    features = torch.randn(5, H)
    expected = torch.log_softmax(features @ torch.from_numpy(dense).t() + output.bias, -1)
    assert torch.allclose(output(features), expected, atol=1e-5)
    output(features).sum().backward()
    assert table.word_scale.grad is not None and torch.count_nonzero(table.word_scale.grad) > 0


@pytest.mark.parametrize("init_std", [None, 0.5])
def test_pools_start_normal_with_the_std_of_rshare_init_std(init_std):
    model = tiny_lm(rshare_init_std=init_std)
    expected = 16**-0.5 if init_std is None else init_std
    for table in (model.decoder.embed_tokens, model.decoder.output_projection.table):
        pool = table.pool.detach()
        assert abs(pool.mean()) < 0.1 * expected
        assert abs(pool.std() / expected - 1) < 0.15


def test_word_scale_refuses_the_pool_scores_path():
    table = RandomSharedEmbedding(40, 12, 1, 3, 30, word_scale=True)
    with pytest.raises(RShareConfigError, match="word_scale runs on the materialize output path only"):
        RandomSharedOutput(table, path="pool-scores")


def average_like_fairseq(state_dicts):
    """The arithmetic of fairseq's scripts/average_checkpoints.py (not shipped in its wheel):
    every tensor summed over the checkpoints, then floats divided and integers floor-divided."""
    total = {key: value.clone() for key, value in state_dicts[0].items()}
    for state in state_dicts[1:]:
        for key, value in state.items():
            total[key] += value
    return {key: value / len(state_dicts) if value.is_floating_point() else value // len(state_dicts)
            for key, value in total.items()}


def test_sixteen_averaged_checkpoints_load():
    # A seed whose fingerprint is at least 2**59: sixteen copies of it overflow int64.
    seed = next(s for s in range(100) if int(RandomSharedEmbedding(100, 16, 1, 4, 40, seed=s).fingerprint, 16) >= 2**59)
    tables = [RandomSharedEmbedding(100, 16, 1, 4, 40, seed=seed) for _ in range(16)]
    averaged = average_like_fairseq([table.state_dict() for table in tables])
    fresh = RandomSharedEmbedding(100, 16, 1, 4, 40, seed=seed)
    fresh.load_state_dict(averaged)
    assert torch.allclose(fresh.pool, torch.stack([t.pool for t in tables]).mean(0))
    one_number = torch.tensor(int(fresh.fingerprint, 16))
    assert int(average_like_fairseq([{"f": one_number}] * 16)["f"]) != int(one_number)  # the old form


def test_checkpoints_with_the_fingerprint_as_one_number_still_load():
    trained = RandomSharedEmbedding(100, 16, 1, 4, 40, seed=3)
    old_form = {"pool": trained.pool.detach().clone(), "mapping_fingerprint": torch.tensor(int(trained.fingerprint, 16))}
    fresh = RandomSharedEmbedding(100, 16, 1, 4, 40, seed=3)
    fresh.load_state_dict(old_form)
    assert torch.equal(fresh.pool, trained.pool)
    with pytest.raises(RShareConfigError, match="mapping fingerprint"):
        RandomSharedEmbedding(100, 16, 1, 4, 40, seed=4).load_state_dict(dict(old_form))


def test_a_newer_mapping_version_is_refused():
    state = RandomSharedEmbedding(100, 16, 1, 4, 40).state_dict()
    state["mapping_version"] = torch.tensor(2)
    with pytest.raises(RShareConfigError, match="mapping algorithm v2; this fairseq_rshare has v1"):
        RandomSharedEmbedding(100, 16, 1, 4, 40).load_state_dict(state)
