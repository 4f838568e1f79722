"""The fused CPU kernels at their boundary: random shapes against stock ops, checks of their
inputs, first-order gradients only, and bias gradients that do not depend on the threads."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_rshare.kernels import (Backend, extension, log_softmax_of_words, logsumexp_of_words, register,
                                    stock_word_logits, supports, unregister)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert extension() is not None, "the fused kernels did not compile"


def random_mapping(V, K, R, generator):
    return torch.randint(R, (V, K), generator=generator, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(2, 1500), st.integers(1, 9), st.integers(1, 300),
       st.booleans(), st.integers(0, 2**31))
def test_fused_kernels_equal_stock_ops_in_float32_for_random_shapes(N, V, K, R, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    mapping_columns = random_mapping(V, K, R, generator)
    scores = torch.randn(N, R, generator=generator, requires_grad=True)
    bias = torch.randn(V, generator=generator, requires_grad=True) if bias else None
    params = [scores] + ([bias] if bias is not None else [])
    exact = [p.detach().double().requires_grad_() for p in params]
    # The gradients of an NLL loss (one target per token) and of weighted normalisers.
    weights = torch.zeros(N, V, dtype=torch.float64)
    weights[torch.arange(N), torch.randint(V, (N,), generator=generator)] = 1.0
    weights[:, 0] += torch.rand(N, generator=generator, dtype=torch.float64)
    # A gradient entry sums up to V*K float32 terms of size <= 2: allow their rounding.
    tolerance = 2e-7 * V * K + 1e-5
    for fused, stock in [
        (log_softmax_of_words, lambda s, b: torch.log_softmax(stock_word_logits(s, mapping_columns, b), -1)),
        (logsumexp_of_words, lambda s, b: torch.logsumexp(stock_word_logits(s, mapping_columns, b), -1)),
    ]:
        fast = fused(scores, mapping_columns, bias)
        reference = stock(*exact) if bias is not None else stock(exact[0], None)
        assert torch.allclose(fast.double(), reference, atol=1e-5, rtol=1e-5)
        weight = weights if fast.dim() == 2 else weights[:, 0]
        for a, b in zip(torch.autograd.grad((fast.double() * weight).sum(), params),
                        torch.autograd.grad((reference * weight).sum(), exact)):
            assert torch.allclose(a.double(), b, atol=tolerance, rtol=1e-5)
    # The gradient computed in the forward pass, used when the incoming one is as expected.
    expected = weights[:, 0].float()
    fast = logsumexp_of_words(scores, mapping_columns, bias, expected_grad=expected)
    reference = torch.logsumexp(stock_word_logits(exact[0], mapping_columns, exact[1] if bias is not None else None), -1)
    for a, b in zip(torch.autograd.grad((fast * expected * 2.5).sum(), params),
                    torch.autograd.grad((reference * weights[:, 0] * 2.5).sum(), exact)):
        assert torch.allclose(a.double(), b, atol=2.5 * tolerance, rtol=1e-5)


@pytest.mark.parametrize("spread", [0.01, 40.0])
def test_fused_kernels_hold_for_nearly_equal_and_for_widely_spread_logits(spread):
    """The kernels' own exp: near 0 (every logit alike) and far below -87 (where it gives 0)."""
    generator = torch.Generator().manual_seed(1)
    mapping_columns = random_mapping(700, 4, 64, generator)
    scores = (torch.randn(13, 64, generator=generator) * spread).requires_grad_()
    exact = scores.detach().double().requires_grad_()
    for fused, stock in [(log_softmax_of_words, torch.log_softmax), (logsumexp_of_words, torch.logsumexp)]:
        fast = fused(scores, mapping_columns)
        reference = stock(stock_word_logits(exact, mapping_columns), -1)
        assert torch.allclose(fast.double(), reference, atol=1e-4, rtol=1e-5)
        weight = torch.rand(fast.shape, generator=generator, dtype=torch.float64)
        (a,) = torch.autograd.grad((fast.double() * weight).sum(), scores)
        (b,) = torch.autograd.grad((reference * weight).sum(), exact)
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4)


def test_double_backward_raises_instead_of_being_silently_wrong():
    scores = torch.randn(5, 20, requires_grad=True)
    mapping_columns = random_mapping(30, 3, 20, torch.Generator().manual_seed(0))
    for fused in (log_softmax_of_words, logsumexp_of_words):
        # The cube keeps a graph through the gradient, so a kernel's missing second
        # derivative would otherwise be dropped without a word.
        loss = fused(scores, mapping_columns).reshape(5, -1)[:, :1].sum() + scores.pow(3).sum()
        with pytest.raises(RuntimeError, match="once differentiable: no second derivative"):
            (grad,) = torch.autograd.grad(loss, scores, create_graph=True)
            torch.autograd.grad(grad.pow(2).sum(), scores)


@pytest.mark.parametrize("call,message", [
    (lambda k, s, b, c: k.logsumexp_forward(s, b + 1000, c), "mapping entries must index columns of scores"),
    (lambda k, s, b, c: k.logsumexp_forward(s, b - 1, c), "mapping entries must index columns of scores"),
    (lambda k, s, b, c: k.logsumexp_forward(s.t(), b, c), "scores must be a contiguous"),
    (lambda k, s, b, c: k.logsumexp_forward(s, b.long(), c), "mapping must be a contiguous"),
    (lambda k, s, b, c: k.logsumexp_forward(s, b, c[:5]), "bias must be empty or"),
    (lambda k, s, b, c: k.logsumexp_backward(torch.ones(3), s, b, c, torch.zeros(6)), "grad must be"),
])
def test_kernels_check_their_inputs(call, message):
    scores = torch.randn(6, 20)
    mapping_columns = random_mapping(30, 3, 20, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=message):
        call(extension(), scores, mapping_columns, torch.zeros(30))


def test_bias_gradient_does_not_depend_on_the_thread_count():
    generator = torch.Generator().manual_seed(0)
    mapping_columns = random_mapping(4000, 8, 400, generator)
    scores = torch.randn(1000, 400, generator=generator, requires_grad=True)
    bias = torch.randn(4000, generator=generator, requires_grad=True)
    weights = torch.rand(1000, generator=generator)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            loss = (logsumexp_of_words(scores, mapping_columns, bias) * weights).sum()
            grads.append(torch.autograd.grad(loss, bias)[0])
            lprobs = log_softmax_of_words(scores, mapping_columns, bias)
            grads.append(torch.autograd.grad(lprobs[:, ::7].sum(), bias)[0])
    finally:
        torch.set_num_threads(threads)
    for i, grad in enumerate(grads[2:], start=2):  # the same sums, bit for bit, at 2 and 3 threads
        assert torch.equal(grad, grads[i % 2])


def test_a_large_bias_gives_no_nan_from_the_lanes_past_the_last_token():
    mapping_columns = random_mapping(50, 2, 10, torch.Generator().manual_seed(0))
    scores = torch.randn(5, 10, requires_grad=True)  # 5 tokens: the tile of 8 has 3 empty lanes
    bias = torch.full((50,), 100.0, requires_grad=True)
    grad_scores, grad_bias = torch.autograd.grad(logsumexp_of_words(scores, mapping_columns, bias).sum(), [scores, bias])
    assert torch.isfinite(grad_scores).all() and torch.isfinite(grad_bias).all()
    assert torch.allclose(grad_bias.sum(), torch.tensor(5.0))  # each token's softmax sums to 1


def test_the_registry_supports_float32_on_the_cpu_only():
    assert supports("cpu", torch.float32) and supports(torch.device("cpu"), torch.float32)
    assert not supports("cpu", torch.float64)
    assert not supports("meta", torch.float32)


def test_a_registered_backend_serves_its_device_type_until_unregistered():
    """A backend written in Python for the "meta" device type (stock ops run there too, on shapes)."""
    calls = []

    def fused(name):
        def function(scores, *args):
            calls.append((name, scores.is_contiguous(), args))
            return name
        return function

    backend = Backend("meta", torch.float32, available=lambda: True,
                              log_softmax_of_words=fused("log_softmax"), logsumexp_of_words=fused("logsumexp"))
    scores = torch.randn(3, 20, device="meta").t().contiguous().t()  # not contiguous
    mapping_columns = random_mapping(30, 3, 20, torch.Generator().manual_seed(0)).to("meta")
    register(backend)
    try:
        assert supports("meta", torch.float32) and not supports("meta", torch.float64)
        with pytest.raises(ValueError, match="registered already"):
            register(backend)
        assert log_softmax_of_words(scores, mapping_columns) == "log_softmax"
        assert logsumexp_of_words(scores, mapping_columns) == "logsumexp"
        with torch.no_grad():
            assert logsumexp_of_words(scores, mapping_columns) == "logsumexp"
    finally:
        unregister(backend)
    (_, contiguous, (columns, bias)), (_, _, (_, _, ones)), (_, _, (_, _, none)) = calls
    assert contiguous and columns is mapping_columns and bias is None
    assert ones.shape == (3,) and none is None  # the expected gradient: ones, unless no backward follows
    assert not supports("meta", torch.float32)
    assert log_softmax_of_words(scores, mapping_columns).shape == (3, 30)  # stock ops again
    assert logsumexp_of_words(scores, mapping_columns).shape == (3,)
    assert len(calls) == 3
