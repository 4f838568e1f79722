"""cross_entropy_of_logits against fairseq's label_smoothed_nll_loss over float64 log-softmax:
values and gradients, across chunks of rows, with padding, smoothing and any incoming gradient."""
import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_rshare.kernels import cross_entropy_of_logits
from fairseq_rshare.kernels.cross_entropy import CHUNK_ELEMENTS, RowCrossEntropy

PAD = 1
# Largest gradient error over the largest reference entry: each dtype's rounding of the result.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}


def logits_and_target(N, V, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(V, (N,), generator=generator)
    target[::7] = PAD
    return logits, target


def reference(logits, target, label_smoothing):
    exact = logits.detach().double().requires_grad_()
    loss, nll = label_smoothed_nll_loss(F.log_softmax(exact, -1), target, label_smoothing, ignore_index=PAD)
    return exact, loss, nll


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_and_gradient_equal_fairseqs_over_several_chunks(dtype, label_smoothing):
    V = 1000
    N = 2 * (CHUNK_ELEMENTS // V) + 5  # three chunks, the last one short
    logits, target = logits_and_target(N, V, dtype)
    loss, nll = cross_entropy_of_logits(logits, target, label_smoothing, ignore_index=PAD)
    exact, expected_loss, expected_nll = reference(logits, target, label_smoothing)
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    assert float(nll) == pytest.approx(float(expected_nll.detach()), rel=1e-6)
    assert not nll.requires_grad
    # 2.5 x the loss: a loss scale, which the gradient computed in the forward takes as a factor.
    (grad,) = torch.autograd.grad(2.5 * loss, logits)
    (expected,) = torch.autograd.grad(2.5 * expected_loss, exact)
    assert grad.dtype == dtype
    assert (grad.double() - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()
    assert torch.all(grad[target == PAD] == 0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_any_other_incoming_gradient_is_computed_again_exactly(label_smoothing):
    """A gradient not proportional to the kept tokens' mask (here random weights per token)."""
    logits, target = logits_and_target(50, 300, torch.float32, seed=1)
    eps_i = label_smoothing / 299
    keep = target.ne(PAD)
    loss, _ = RowCrossEntropy.apply(logits, target, 1 - label_smoothing - eps_i, eps_i, keep)
    weights = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((loss.double() * weights).sum(), logits)
    exact = logits.detach().double().requires_grad_()
    lprobs = F.log_softmax(exact, -1)
    rows = -(1 - label_smoothing - eps_i) * lprobs.gather(1, target[:, None]).squeeze(1) - eps_i * lprobs.sum(-1)
    (expected,) = torch.autograd.grad((rows * weights).sum(), exact)
    assert (grad.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_without_gradients_it_only_scores():
    logits, target = logits_and_target(20, 500, torch.float32)
    with torch.no_grad():
        loss, nll = cross_entropy_of_logits(logits, target, ignore_index=PAD)
    _, expected_loss, _ = reference(logits, target, 0.0)
    assert not loss.requires_grad
    assert float(loss) == float(nll) == pytest.approx(float(expected_loss.detach()), rel=1e-6)


def test_a_second_derivative_is_refused_not_silently_wrong():
    logits, target = logits_and_target(5, 40, torch.float64)
    loss = cross_entropy_of_logits(logits, target, ignore_index=PAD)[0] + logits.pow(3).sum()
    with pytest.raises(RuntimeError, match="the logits' cross-entropy is once differentiable"):
        (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
        torch.autograd.grad(grad.pow(2).sum(), logits)
