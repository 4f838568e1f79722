"""Fused gather-sum + log-softmax for the random-shared output layer (float32, CPU).

Per token n, with ``scores[n]`` its R pool scores (a row that stays in L1 cache), the kernel
writes ``lprobs[n, w] = sum_k scores[n, bags[w, k]] (+ bias[w]) - logsumexp`` straight into
the (N, V) output, and the backward scatters each word's gradient back into ``scores[n]``.
No V x H matrix, no (V, N) transpose, no second pass over the logits.  It is compiled with
``torch.utils.cpp_extension`` on first use (about a minute, then cached); where that fails,
:func:`log_softmax_of_bags` computes the same values with stock PyTorch ops.
"""
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// columns: (K, V) int32, the score column of slot k of word v.  Loops over words are
// innermost so that the compiler vectorises them (gathers, exp).
torch::Tensor forward(torch::Tensor scores, torch::Tensor columns, torch::Tensor bias) {
  const int64_t N = scores.size(0), R = scores.size(1), K = columns.size(0), V = columns.size(1);
  auto lprobs = torch::empty({N, V}, scores.options());
  const float* s = scores.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  const float* bi = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* out = lprobs.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = s + n * R;
      float* y = out + n * V;
      for (int64_t v = 0; v < V; ++v) y[v] = bi ? bi[v] : 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t* ck = c + k * V;
        for (int64_t v = 0; v < V; ++v) y[v] += row[ck[v]];
      }
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t v = 0; v < V; ++v) top = std::max(top, y[v]);
      float total = 0.f;
      for (int64_t v = 0; v < V; ++v) total += std::exp(y[v] - top);
      const float lse = top + std::log(total);
      for (int64_t v = 0; v < V; ++v) y[v] -= lse;
    }
  });
  return lprobs;
}

std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor lprobs, torch::Tensor columns,
                                    int64_t R, bool keep_word_grad) {
  const int64_t N = lprobs.size(0), K = columns.size(0), V = columns.size(1);
  auto grad_scores = torch::zeros({N, R}, lprobs.options());
  auto word_grad = torch::empty({keep_word_grad ? N : 0, V}, lprobs.options());
  const float* g = grad.data_ptr<float>();
  const float* lp = lprobs.data_ptr<float>();
  const int32_t* c = columns.data_ptr<int32_t>();
  float* ds = grad_scores.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(keep_word_grad ? 0 : V);
    for (int64_t n = begin; n < end; ++n) {
      const float* gn = g + n * V;
      const float* lpn = lp + n * V;
      float* dz = keep_word_grad ? word_grad.data_ptr<float>() + n * V : buffer.data();
      float* dsn = ds + n * R;
      float gsum = 0.f;
      for (int64_t v = 0; v < V; ++v) gsum += gn[v];
      for (int64_t v = 0; v < V; ++v) dz[v] = gn[v] - std::exp(lpn[v]) * gsum;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t* ck = c + k * V;
        for (int64_t v = 0; v < V; ++v) dsn[ck[v]] += dz[v];
      }
    }
  });
  return {grad_scores, word_grad};
}
"""

_extension = None
_extension_failed = False


def extension():
    """The compiled kernel, or None where it cannot be built (then stock ops are used)."""
    global _extension, _extension_failed
    if _extension is None and not _extension_failed:
        try:
            from torch.utils.cpp_extension import load_inline

            _extension = load_inline(
                name="fairseq_rshare_fused",
                cpp_sources=[CPP_SOURCE],
                functions=["forward", "backward"],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as error:  # a missing compiler or ninja: fall back, say so once
            _extension_failed = True
            logger.warning("fairseq_rshare: fused output kernel unavailable (%s); using stock ops", error)
    return _extension


class FusedLogSoftmaxOfBags(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, bags, bias):
        kernel = extension()
        columns = bags.t().contiguous()
        lprobs = kernel.forward(scores, columns, bias if bias is not None else scores.new_empty(0))
        ctx.save_for_backward(lprobs, columns)
        ctx.num_scores = scores.size(1)
        ctx.has_bias = bias is not None
        return lprobs

    @staticmethod
    def backward(ctx, grad):
        lprobs, columns = ctx.saved_tensors
        grad_scores, word_grad = extension().backward(
            grad.contiguous(), lprobs, columns, ctx.num_scores, ctx.has_bias
        )
        return grad_scores, None, word_grad.sum(0) if ctx.has_bias else None


def log_softmax_of_bags(scores, bags, bias=None):
    """log_softmax over words of sum_k scores[:, bags[w, k]] (+ bias); scores is (N, R).

    float32 on CPU takes the fused kernel; anything else (float64 in tests, other devices)
    takes ``embedding_bag`` over the transposed score table and a stock log-softmax.
    ``bags`` is the (V, K) int32 table of score columns.
    """
    if scores.dtype == torch.float32 and scores.device.type == "cpu" and extension() is not None:
        return FusedLogSoftmaxOfBags.apply(
            scores.contiguous(), bags, bias.float() if bias is not None else None
        )
    return stock_log_softmax_of_bags(scores, bags, bias)


def stock_log_softmax_of_bags(scores, bags, bias=None):
    logits = F.embedding_bag(bags, scores.t(), mode="sum").t()
    if bias is not None:
        logits = logits + bias
    return F.log_softmax(logits, dim=-1)
