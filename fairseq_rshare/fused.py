"""Fused CPU kernels for the random-shared output layer (float32).

A word's logit is the sum of K pool scores, ``logit[n, w] = sum_k scores[n, bags[w, k]]
(+ bias[w])``.  Two fused functions of it, each with its backward:

- :func:`log_softmax_of_bags` writes the (N, V) log-probabilities (what fairseq's generator,
  eval-lm and stock criteria consume);
- :func:`logsumexp_of_bags` returns only the (N,) log-normalisers, which with the target's
  logit is the cross-entropy: nothing of size N x V is ever written (``RandomSharedOutput.loss``).

The kernels take 8 tokens at a time with their scores interleaved (R x 8), so that one loaded
slot index and one 32-byte load serve all 8 tokens, and walk the vocabulary in chunks that
stay in cache; the backward recomputes the logits instead of storing them.  They are compiled
with ``torch.utils.cpp_extension`` on first use (about a minute, said on stderr) into a folder
named by :func:`build_key`, then loaded from it; where that fails, or for other dtypes and
devices, stock PyTorch ops compute the same values.
"""
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time

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

constexpr int64_t TILE = 8;     // tokens per pass: one index and one 32-byte load serve them all
constexpr int64_t CHUNK = 512;  // words per pass: their TILE x CHUNK logits stay in L1

struct Bags {
  const int32_t* slots;  // (V, K) score columns of each word
  const float* bias;     // (V) or nullptr
  int64_t V, K, R;
};

// tile[r * TILE + t] = scores[n0 + t, r]; zero for tokens past N.
static void load_tile(const float* scores, int64_t N, int64_t R, int64_t n0, float* tile) {
  std::fill(tile, tile + R * TILE, 0.f);
  for (int64_t t = 0; t < TILE && n0 + t < N; ++t)
    for (int64_t r = 0; r < R; ++r) tile[r * TILE + t] = scores[(n0 + t) * R + r];
}

// y[j * TILE + t] = logit of word v0 + j for token t.  Each slot index is loaded once for the
// TILE tokens, whose scores sit side by side: the loop over t is one 8-wide vector add.
static void chunk_logits(const Bags& b, const float* tile, int64_t v0, int64_t C, float* y) {
  for (int64_t j = 0; j < C; ++j) {
    float acc[TILE];
    const float start = b.bias ? b.bias[v0 + j] : 0.f;
    for (int64_t t = 0; t < TILE; ++t) acc[t] = start;
    const int32_t* slots = b.slots + (v0 + j) * b.K;
    for (int64_t k = 0; k < b.K; ++k) {
      const float* s = tile + int64_t(slots[k]) * TILE;
      for (int64_t t = 0; t < TILE; ++t) acc[t] += s[t];
    }
    std::copy(acc, acc + TILE, y + j * TILE);
  }
}

// dtile[slot * TILE + t] += dy[j * TILE + t] for every slot of word v0 + j; dbias[v] += sum_t.
// Position by position: slot k of every word lies in block k of the R columns, so each pass
// writes into one block of R/K x TILE floats, which stays in L1 up to ~1000 entries per
// position where the whole dtile would not (beyond that the scatter dominates the backward).
static void chunk_scatter(const Bags& b, const float* dy, int64_t v0, int64_t C, float* dtile, float* dbias) {
  for (int64_t k = 0; k < b.K; ++k) {
    const int32_t* slots = b.slots + v0 * b.K + k;
    for (int64_t j = 0; j < C; ++j) {
      const float* d = dy + j * TILE;
      float* s = dtile + int64_t(slots[j * b.K]) * TILE;
      for (int64_t t = 0; t < TILE; ++t) s[t] += d[t];
    }
  }
  if (dbias)
    for (int64_t j = 0; j < C; ++j) {
      float sum = 0.f;
      for (int64_t t = 0; t < TILE; ++t) sum += dy[j * TILE + t];
      dbias[v0 + j] += sum;
    }
}

// Running log-sum-exp over chunks, per token.
struct LogSumExp {
  float top[TILE], total[TILE];
  LogSumExp() {
    std::fill(top, top + TILE, -std::numeric_limits<float>::infinity());
    std::fill(total, total + TILE, 0.f);
  }
  void add(const float* y, int64_t C) {
    float m[TILE], sum[TILE] = {0.f};
    std::copy(top, top + TILE, m);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t t = 0; t < TILE; ++t) m[t] = std::max(m[t], y[j * TILE + t]);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t t = 0; t < TILE; ++t) sum[t] += std::exp(y[j * TILE + t] - m[t]);
    for (int64_t t = 0; t < TILE; ++t) {
      total[t] = total[t] * std::exp(top[t] - m[t]) + sum[t];
      top[t] = m[t];
    }
  }
  float value(int64_t t) const { return top[t] + std::log(total[t]); }
};

static Bags bags_of(const torch::Tensor& scores, const torch::Tensor& slots, const torch::Tensor& bias) {
  return {slots.data_ptr<int32_t>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
          slots.size(0), slots.size(1), scores.size(1)};
}

// Runs body(n0, tile, y, dtile, dbias) for every tile of TILE tokens, in parallel; returns the
// bias gradient summed over the threads' private copies (empty without a bias).
template <typename Body>
static torch::Tensor for_each_tile(const Bags& b, int64_t N, bool with_dtile, bool with_dbias,
                                   const torch::TensorOptions& options, Body body) {
  auto dbias = torch::zeros({with_dbias ? at::get_num_threads() : 0, b.V}, options);
  at::parallel_for(0, (N + TILE - 1) / TILE, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(b.R * TILE), y(CHUNK * TILE), dtile(with_dtile ? b.R * TILE : 0);
    float* db = with_dbias ? dbias.data_ptr<float>() + at::get_thread_num() * b.V : nullptr;
    for (int64_t i = begin; i < end; ++i) body(i * TILE, tile.data(), y.data(), dtile.data(), db);
  });
  return with_dbias ? dbias.sum(0) : dbias;
}

// grad_scores[n0 + t, r] = dtile[r * TILE + t]
static void store_tile(const float* dtile, int64_t N, int64_t R, int64_t n0, float* grad_scores) {
  for (int64_t t = 0; t < TILE && n0 + t < N; ++t)
    for (int64_t r = 0; r < R; ++r) grad_scores[(n0 + t) * R + r] = dtile[r * TILE + t];
}

torch::Tensor logsumexp_forward(torch::Tensor scores, torch::Tensor slots, torch::Tensor bias) {
  const Bags b = bags_of(scores, slots, bias);
  const int64_t N = scores.size(0);
  auto lse = torch::empty({N}, scores.options());
  const float* s = scores.data_ptr<float>();
  float* out = lse.data_ptr<float>();
  for_each_tile(b, N, false, false, scores.options(), [&](int64_t n0, float* tile, float* y, float*, float*) {
    load_tile(s, N, b.R, n0, tile);
    LogSumExp running;
    for (int64_t v0 = 0; v0 < b.V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, b.V - v0);
      chunk_logits(b, tile, v0, C, y);
      running.add(y, C);
    }
    for (int64_t t = 0; t < TILE && n0 + t < N; ++t) out[n0 + t] = running.value(t);
  });
  return lse;
}

// d lse[n] / d logit[n, w] = softmax[n, w]: recompute the logits, scatter grad[n] * softmax.
std::vector<torch::Tensor> logsumexp_backward(torch::Tensor grad, torch::Tensor scores, torch::Tensor slots,
                                              torch::Tensor bias, torch::Tensor lse) {
  const Bags b = bags_of(scores, slots, bias);
  const int64_t N = scores.size(0);
  auto grad_scores = torch::empty_like(scores);
  const float* s = scores.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  float* ds = grad_scores.data_ptr<float>();
  auto grad_bias = for_each_tile(b, N, true, b.bias != nullptr, scores.options(),
      [&](int64_t n0, float* tile, float* y, float* dtile, float* dbias) {
    load_tile(s, N, b.R, n0, tile);
    std::fill(dtile, dtile + b.R * TILE, 0.f);
    float gt[TILE] = {0.f}, lt[TILE] = {0.f};
    for (int64_t t = 0; t < TILE && n0 + t < N; ++t) { gt[t] = g[n0 + t]; lt[t] = l[n0 + t]; }
    for (int64_t v0 = 0; v0 < b.V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, b.V - v0);
      chunk_logits(b, tile, v0, C, y);
      for (int64_t j = 0; j < C; ++j)
        for (int64_t t = 0; t < TILE; ++t) y[j * TILE + t] = gt[t] * std::exp(y[j * TILE + t] - lt[t]);
      chunk_scatter(b, y, v0, C, dtile, dbias);
    }
    store_tile(dtile, N, b.R, n0, ds);
  });
  return {grad_scores, grad_bias};
}

torch::Tensor log_softmax_forward(torch::Tensor scores, torch::Tensor slots, torch::Tensor bias) {
  const Bags b = bags_of(scores, slots, bias);
  const int64_t N = scores.size(0), V = b.V;
  auto lprobs = torch::empty({N, V}, scores.options());
  const float* s = scores.data_ptr<float>();
  float* out = lprobs.data_ptr<float>();
  for_each_tile(b, N, false, false, scores.options(), [&](int64_t n0, float* tile, float* y, float*, float*) {
    load_tile(s, N, b.R, n0, tile);
    const int64_t T = std::min(TILE, N - n0);
    LogSumExp running;
    for (int64_t v0 = 0; v0 < V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, V - v0);
      chunk_logits(b, tile, v0, C, y);
      running.add(y, C);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < C; ++j) out[(n0 + t) * V + v0 + j] = y[j * TILE + t];
    }
    for (int64_t t = 0; t < T; ++t) {
      const float lse = running.value(t);
      float* row = out + (n0 + t) * V;
      for (int64_t v = 0; v < V; ++v) row[v] -= lse;
    }
  });
  return lprobs;
}

// d lprobs[n, u] / d logit[n, w] = [u == w] - softmax[n, w].
std::vector<torch::Tensor> log_softmax_backward(torch::Tensor grad, torch::Tensor lprobs, torch::Tensor scores,
                                                torch::Tensor slots, torch::Tensor bias) {
  const Bags b = bags_of(scores, slots, bias);
  const int64_t N = scores.size(0), V = b.V;
  auto grad_scores = torch::empty_like(scores);
  const float* g = grad.data_ptr<float>();
  const float* lp = lprobs.data_ptr<float>();
  float* ds = grad_scores.data_ptr<float>();
  auto grad_bias = for_each_tile(b, N, true, b.bias != nullptr, scores.options(),
      [&](int64_t n0, float*, float* y, float* dtile, float* dbias) {
    std::fill(dtile, dtile + b.R * TILE, 0.f);
    const int64_t T = std::min(TILE, N - n0);
    float gsum[TILE] = {0.f};
    for (int64_t t = 0; t < T; ++t)
      for (int64_t v = 0; v < V; ++v) gsum[t] += g[(n0 + t) * V + v];
    for (int64_t v0 = 0; v0 < V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, V - v0);
      std::fill(y, y + C * TILE, 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (n0 + t) * V + v0;
        for (int64_t j = 0; j < C; ++j) y[j * TILE + t] = g[row + j] - std::exp(lp[row + j]) * gsum[t];
      }
      chunk_scatter(b, y, v0, C, dtile, dbias);
    }
    store_tile(dtile, N, b.R, n0, ds);
  });
  return {grad_scores, grad_bias};
}
"""

FUNCTIONS = ["logsumexp_forward", "logsumexp_backward", "log_softmax_forward", "log_softmax_backward"]
# Portable flags: the binary runs on any CPU of its architecture, so a cache copied to another
# machine still works.  -march=native (or x86-64-v3, AVX2) alone measured no faster: the exps
# stay scalar.  With -ffast-math they vectorise (glibc's SIMD expf): the kernels ran 1.2-1.4x
# faster, a demo-sized rshare training step 5-10%; but it lets the compiler assume there are
# no infinities, and LogSumExp starts from -inf.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_extension = None
_extension_failed = False


def compiler_version():
    """First line of ``$CXX --version``: torch builds with $CXX, else ``c++``."""
    command = shlex.split(os.environ.get("CXX", "c++")) + ["--version"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[0]


def build_inputs():
    """Everything that changes the compiled binary, here and now."""
    return {
        "source": [CPP_SOURCE, FUNCTIONS],
        "flags": [CFLAGS, LDFLAGS],
        "torch": torch.__version__,
        "python": sys.implementation.cache_tag + getattr(sys, "abiflags", ""),
        "compiler": compiler_version(),
        "machine": platform.machine(),
    }


def build_key(inputs):
    """12 hex digits naming a build of the kernels: one folder per binary, so two toolchains
    (or torch versions, or source versions) sharing a cache never overwrite each other."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def _load_or_build():
    """Import the kernels from the folder of this build key, building them there first if its
    library is missing.  A finished build is imported directly, without running ninja: ninja
    would rebuild whenever another ninja version had written the folder's log."""
    from torch.utils.cpp_extension import LIB_EXT, get_default_build_root, load_inline

    name = "fairseq_rshare_fused_" + build_key(build_inputs())
    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name)
    library = os.path.join(folder, name + LIB_EXT)
    if os.path.exists(library) and not os.path.exists(os.path.join(folder, "lock")):  # lock: a build in progress
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    print(f"fairseq_rshare: building the fused CPU kernels in {folder} (once per installation, about a minute) ...",
          file=sys.stderr, flush=True)
    started = time.time()
    os.makedirs(folder, exist_ok=True)
    module = load_inline(name=name, cpp_sources=[CPP_SOURCE], functions=FUNCTIONS, extra_cflags=CFLAGS,
                         extra_ldflags=LDFLAGS, build_directory=folder)
    print(f"fairseq_rshare: fused CPU kernels built in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def extension():
    """The compiled kernels, or None where they cannot be built (then stock ops are used)."""
    global _extension, _extension_failed
    if _extension is None and not _extension_failed:
        try:
            _extension = _load_or_build()
        except Exception as error:  # a missing compiler or ninja: fall back, say so once
            _extension_failed = True
            logger.warning("fairseq_rshare: fused output kernels unavailable (%s); using stock ops", error)
    return _extension


def _bias_or_empty(scores, bias):
    return bias.float().contiguous() if bias is not None else scores.new_empty(0)


class FusedLogSoftmaxOfBags(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, bags, bias):
        bias = _bias_or_empty(scores, bias)
        lprobs = extension().log_softmax_forward(scores, bags, bias)
        ctx.save_for_backward(lprobs, scores, bags, bias)
        return lprobs

    @staticmethod
    def backward(ctx, grad):
        lprobs, scores, bags, bias = ctx.saved_tensors
        grad_scores, grad_bias = extension().log_softmax_backward(grad.contiguous(), lprobs, scores, bags, bias)
        return grad_scores, None, grad_bias if bias.numel() else None


class FusedLogSumExpOfBags(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, bags, bias):
        bias = _bias_or_empty(scores, bias)
        lse = extension().logsumexp_forward(scores, bags, bias)
        ctx.save_for_backward(scores, bags, bias, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        scores, bags, bias, lse = ctx.saved_tensors
        grad_scores, grad_bias = extension().logsumexp_backward(grad.contiguous(), scores, bags, bias, lse)
        return grad_scores, None, grad_bias if bias.numel() else None


def _fused(scores):
    return scores.dtype == torch.float32 and scores.device.type == "cpu" and extension() is not None


def log_softmax_of_bags(scores, bags, bias=None):
    """log_softmax over words of sum_k scores[:, bags[w, k]] (+ bias); scores is (N, R),
    ``bags`` the (V, K) int32 table of score columns.  Returns (N, V)."""
    if _fused(scores):
        return FusedLogSoftmaxOfBags.apply(scores.contiguous(), bags, bias)
    return F.log_softmax(stock_logits_of_bags(scores, bags, bias), dim=-1)


def logsumexp_of_bags(scores, bags, bias=None):
    """logsumexp over words of the same logits; returns (N,), never building (N, V)."""
    if _fused(scores):
        return FusedLogSumExpOfBags.apply(scores.contiguous(), bags, bias)
    return torch.logsumexp(stock_logits_of_bags(scores, bags, bias), dim=-1)


def stock_logits_of_bags(scores, bags, bias=None):
    """The (N, V) logits with stock ops: ``embedding_bag`` over the transposed score table."""
    logits = F.embedding_bag(bags, scores.t(), mode="sum").t()
    return logits + bias if bias is not None else logits
