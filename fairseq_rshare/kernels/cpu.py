"""The fused CPU kernels (float32), registered for device type "cpu".

The kernels take 8 tokens at a time with their scores interleaved (R x 8), so that one loaded
slot index and one 32-byte load serve all 8 tokens, and walk the vocabulary in chunks that
stay in cache.  In training, the log-normalisers compute their gradient in the forward pass,
keeping each tile's logits (V x 8 floats a thread) between the two; every other backward
recomputes the logits instead of storing them.  They are available where :func:`extension`
builds or loads them.
"""
import torch

from . import Backend, first_order_only, proportionality, register
from .build import extension

first_order_kernels = first_order_only("the fused output kernels' backward", "use float64 inputs (stock ops) for that")


def _bias_or_empty(scores, bias):
    return bias.float().contiguous() if bias is not None else scores.new_empty(0)


class FusedLogSoftmaxOfWords(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mapping_columns, bias):
        bias = _bias_or_empty(scores, bias)
        lprobs = extension().log_softmax_forward(scores, mapping_columns, bias)
        ctx.save_for_backward(lprobs, scores, mapping_columns, bias)
        return lprobs

    @staticmethod
    @first_order_kernels
    def backward(ctx, grad):
        lprobs, scores, mapping_columns, bias = ctx.saved_tensors
        grad_scores, grad_bias = extension().log_softmax_backward(grad.contiguous(), lprobs, scores, mapping_columns, bias)
        return grad_scores, None, grad_bias if bias.numel() else None


class FusedLogSumExpOfWords(torch.autograd.Function):
    """The log-normalisers.  Given the gradient they are expected to receive (up to one
    factor), the forward computes that gradient in the same pass over the vocabulary; the
    backward scales it when the incoming gradient is proportional to the expected one, and
    otherwise recomputes the logits."""

    @staticmethod
    def forward(ctx, scores, mapping_columns, bias, expected_grad):
        bias = _bias_or_empty(scores, bias)
        ctx.precomputed = expected_grad is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[2])
        if ctx.precomputed:
            expected_grad = expected_grad.float().contiguous()
            lse, grad_scores, grad_bias = extension().logsumexp_forward_backward(
                scores, mapping_columns, bias, expected_grad)
            ctx.save_for_backward(scores, mapping_columns, bias, lse, expected_grad, grad_scores, grad_bias)
        else:
            lse = extension().logsumexp_forward(scores, mapping_columns, bias)
            ctx.save_for_backward(scores, mapping_columns, bias, lse)
        return lse

    @staticmethod
    @first_order_kernels
    def backward(ctx, grad):
        scores, mapping_columns, bias, lse = ctx.saved_tensors[:4]
        if ctx.precomputed:
            expected_grad, grad_scores, grad_bias = ctx.saved_tensors[4:]
            factor = proportionality(grad, expected_grad)
            if factor is not None:
                if factor != 1:  # a plain sum's backward sends exactly the expected gradient
                    grad_scores, grad_bias = factor * grad_scores, factor * grad_bias
                return grad_scores, None, grad_bias if bias.numel() else None, None
        grad_scores, grad_bias = extension().logsumexp_backward(grad.contiguous(), scores, mapping_columns, bias, lse)
        return grad_scores, None, grad_bias if bias.numel() else None, None


register(Backend("cpu", torch.float32, available=lambda: extension() is not None,
                 log_softmax_of_words=FusedLogSoftmaxOfWords.apply, logsumexp_of_words=FusedLogSumExpOfWords.apply))
