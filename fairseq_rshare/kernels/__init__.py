"""The output layers' word functions and loss, on fused kernels where a backend is
registered for the scores' device type and dtype, else on stock PyTorch ops (same values).

A word's logit is the sum of K pool scores, ``logit[n, w] = sum_k scores[n, mapping_columns[w, k]]
(+ bias[w])``, where ``mapping_columns`` is the table's mapping written as columns of the (N, R)
score table.  Two functions of it, each with its backward:

- :func:`log_softmax_of_words` writes the (N, V) log-probabilities (what fairseq's generator,
  eval-lm and stock criteria consume);
- :func:`logsumexp_of_words` returns only the (N,) log-normalisers, which with the target's
  logit is the cross-entropy: nothing of size N x V is ever written (``RandomSharedOutput.loss``).

One function of dense (N, V) logits, :func:`cross_entropy_of_logits` (``cross_entropy.py``),
gives fairseq's label-smoothed cross-entropy without the (N, V) log-probabilities: the loss of
a materialised output layer and of a dense one.

Backends: ``cpu.py`` (float32, compiled by ``build.py``).  A kernel for another device is one
module that calls :func:`register` and is imported at the end of this one.
"""
import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

# The build's public names, imported from here by the demo and the tests.
from .build import CFLAGS, LDFLAGS, build_inputs, build_key, compiler_version, extension  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Backend:
    """Fused word functions for one device type and dtype.  ``available()`` loads them (building
    them first if need be) and says whether that worked: the registry asks it before every use,
    so it must be cheap after the first call.  The functions take contiguous scores and the
    arguments of :func:`log_softmax_of_words` and :func:`logsumexp_of_words`."""
    device_type: str
    dtype: torch.dtype
    available: Callable[[], bool]
    log_softmax_of_words: Callable
    logsumexp_of_words: Callable


_backends = {}  # (device type, dtype) -> Backend


def register(backend):
    key = backend.device_type, backend.dtype
    if key in _backends:
        raise ValueError(f"fairseq_rshare: a kernel backend for {backend.device_type} {backend.dtype} is registered already")
    _backends[key] = backend


def unregister(backend):
    """Stock ops again for the backend's device type and dtype."""
    if _backends.get((backend.device_type, backend.dtype)) is backend:
        del _backends[backend.device_type, backend.dtype]


def backend_for(device, dtype):
    """The backend registered for this device (a torch.device or its name) and dtype, if it is
    available here, else None."""
    backend = _backends.get((torch.device(device).type, dtype))
    return backend if backend is not None and backend.available() else None


def supports(device, dtype):
    """Fused kernels run on this device and dtype (loading or building them on the first ask,
    so asking before timing keeps a build out of the time)."""
    return backend_for(device, dtype) is not None


# Device types where the word functions on stock ops (no fused kernel) were measured slower than
# multiplying by the materialised matrix at every shape, so the output layer's `auto` takes
# materialize there untimed.  Elsewhere (a GPU) it times both paths.
_STOCK_OPS_LOSE_ON = ("cpu",)


def stock_pool_scores_lose(device):
    """The pool-scores path on stock ops was measured to lose to materialize on this device type
    at every shape."""
    return torch.device(device).type in _STOCK_OPS_LOSE_ON


def log_softmax_of_words(scores, mapping_columns, bias=None):
    """log_softmax over words of sum_k scores[:, mapping_columns[w, k]] (+ bias); scores is (N, R),
    ``mapping_columns`` the (V, K) int32 table of score columns.  Returns (N, V)."""
    backend = backend_for(scores.device, scores.dtype)
    if backend is not None:
        return backend.log_softmax_of_words(scores.contiguous(), mapping_columns, bias)
    return F.log_softmax(stock_word_logits(scores, mapping_columns, bias), dim=-1)


def logsumexp_of_words(scores, mapping_columns, bias=None, expected_grad=None):
    """logsumexp over words of the same logits; returns (N,), never building (N, V).

    ``expected_grad`` (N,): the gradient the result will receive, up to one factor; ones (what
    ``.sum()`` sends) by default.  The fused kernels then compute the gradient in the forward
    pass, which saves the backward a second pass over the vocabulary; any other incoming
    gradient is still exact, through that second pass."""
    backend = backend_for(scores.device, scores.dtype)
    if backend is not None:
        if expected_grad is None and torch.is_grad_enabled():
            expected_grad = scores.new_ones(scores.shape[0])
        return backend.logsumexp_of_words(scores.contiguous(), mapping_columns, bias, expected_grad)
    return torch.logsumexp(stock_word_logits(scores, mapping_columns, bias), dim=-1)


def stock_word_logits(scores, mapping_columns, bias=None):
    """The (N, V) logits with stock ops: ``embedding_bag`` over the transposed score table."""
    logits = F.embedding_bag(mapping_columns, scores.t(), mode="sum").t()
    return logits + bias if bias is not None else logits


def first_order_only(what, instead):
    """For a backward with no derivative of its own: a backward pass that builds a graph
    (``create_graph=True``, for a second derivative) stops there with a message naming `what`
    and what to use `instead`; torch's ``once_differentiable`` would let it through when the
    incoming gradient is a constant, and the second derivative would silently miss that part."""
    def decorator(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"fairseq_rshare: {what} is once differentiable: no second derivative "
                                   f"(create_graph=True); {instead}")
            return backward(ctx, *grads)
        return checked
    return decorator


def proportionality(grad, expected, tolerance=1e-6):
    """The factor c with grad = c * expected (to `tolerance` of grad's largest entry), or None."""
    grad = grad.to(expected.dtype)
    norm = expected.dot(expected)
    factor = grad.dot(expected) / norm if norm > 0 else grad.new_zeros(())
    if (grad - factor * expected).abs().max() <= tolerance * grad.abs().max():
        return factor
    return None


from . import cpu  # noqa: E402,F401  (registers itself; after the registry it needs)
from .cross_entropy import cross_entropy_of_logits  # noqa: E402,F401  (after the helpers it needs)
