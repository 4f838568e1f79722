"""Cross-entropy from (N, V) logits, without the (N, V) log-probabilities fairseq's criteria take.

fairseq's criteria write log_softmax(logits) in float32, gather the targets from it and, in the
backward, read it back twice.  On the CPU at a large vocabulary that costs more than the output
layer's matmul: at 400 tokens x 33,278 words in bfloat16, forward and backward on one thread,
about 110 ms against 30 ms here.  Here the logits are read a few rows at a time, in float32
(float64 for float64 logits), and in training the forward computes in the same pass, with one
exp an element, the gradient that a summed loss sends back, which the backward then only hands on.
"""
import torch

from . import first_order_only, proportionality

# Elements of one chunk of rows: 1 MiB of float32, which stays in a core's L2 cache.  Other
# devices take all rows at once.
CHUNK_ELEMENTS = 1 << 18


def cross_entropy_of_logits(logits, target, label_smoothing=0.0, ignore_index=None):
    """(loss, nll_loss), each summed over the kept tokens, of (N, V) logits and (N,) targets: the
    values fairseq's ``label_smoothed_nll_loss`` computes from ``log_softmax(logits)``.  Only
    the loss is differentiable."""
    keep = target.ne(ignore_index) if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    eps_i = label_smoothing / (logits.shape[-1] - 1)
    loss, nll = RowCrossEntropy.apply(logits, target, 1.0 - label_smoothing - eps_i, eps_i, keep)
    return loss.masked_fill(~keep, 0.0).sum(), nll.masked_fill(~keep, 0.0).sum()


def chunk_rows(logits):
    """Rows per chunk: CHUNK_ELEMENTS on the CPU, all rows elsewhere."""
    N, V = logits.shape
    return max(1, CHUNK_ELEMENTS // V) if logits.device.type == "cpu" else max(N, 1)


def softmax_(logits):
    """(softmax, logsumexp) of each row of `logits`, a float32 or float64 copy that becomes the
    softmax: one exp an element."""
    top = logits.amax(-1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(-1, keepdim=True)
    return logits.div_(sums), (top + sums.log()).squeeze(1)


def softmax_gradient(probs, target, row_grad, nll_weight, smooth_weight):
    """The gradient of the rows' losses nll_weight * nll + smooth_weight * smooth to their
    logits, each row's scaled by row_grad, written over `probs` (their softmax):
    row_grad * ((nll_weight + V * smooth_weight) * softmax - nll_weight * onehot(target) - smooth_weight)."""
    grad = probs.mul_((row_grad * (nll_weight + probs.shape[1] * smooth_weight))[:, None])
    grad[torch.arange(grad.shape[0], device=grad.device), target] -= row_grad * nll_weight
    if smooth_weight:
        grad.sub_((row_grad * smooth_weight)[:, None])
    return grad


class RowCrossEntropy(torch.autograd.Function):
    """Per row, loss = nll_weight * nll + smooth_weight * smooth and nll (not differentiable),
    with nll = logsumexp - logit(target) and smooth = V * logsumexp - sum of the logits.

    The loss rows are expected to receive the `keep` mask as gradient (a masked sum); given
    that, up to one factor (a loss scale), the backward scales the gradient the forward
    computed, and otherwise computes it again from the logits."""

    @staticmethod
    def forward(ctx, logits, target, nll_weight, smooth_weight, keep):
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        N, V = logits.shape
        rows = chunk_rows(logits)
        expected_grad = keep.to(compute_dtype)
        log_normaliser = logits.new_empty(N, dtype=compute_dtype)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        for start in range(0, N, rows):
            chunk = slice(start, start + rows)
            chunk_logits = logits[chunk].to(compute_dtype, copy=True)
            if grad is None:
                log_normaliser[chunk] = torch.logsumexp(chunk_logits, dim=-1)
                continue
            probs, log_normaliser[chunk] = softmax_(chunk_logits)
            grad[chunk] = softmax_gradient(probs, target[chunk], expected_grad[chunk], nll_weight, smooth_weight)
        nll = log_normaliser - logits.gather(1, target[:, None]).squeeze(1).to(compute_dtype)
        loss = nll_weight * nll
        if smooth_weight:
            loss = loss + smooth_weight * (V * log_normaliser - logits.sum(-1, dtype=compute_dtype))
        ctx.mark_non_differentiable(nll)
        ctx.save_for_backward(logits, target, log_normaliser, expected_grad, grad)
        ctx.weights = nll_weight, smooth_weight
        return loss, nll

    @staticmethod
    @first_order_only("the logits' cross-entropy", "use fairseq's label_smoothed_cross_entropy for that")
    def backward(ctx, loss_grad, nll_grad):
        logits, target, log_normaliser, expected_grad, grad = ctx.saved_tensors
        if grad is not None:
            factor = proportionality(loss_grad, expected_grad)
            if factor is not None:
                return (grad if factor == 1 else grad * factor.to(grad.dtype)), None, None, None, None
        rows, grad = chunk_rows(logits), torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            chunk = slice(start, start + rows)
            probs = logits[chunk].to(log_normaliser.dtype, copy=True).sub_(log_normaliser[chunk, None]).exp_()
            grad[chunk] = softmax_gradient(probs, target[chunk], loss_grad[chunk].to(probs.dtype), *ctx.weights)
        return grad, None, None, None, None
