// Fused CPU kernels of the random-shared output layer; bound and built by __init__.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#include <cstring>

// Four lanes at once with GCC/Clang vector extensions: one SSE register, the portable baseline
// (eight-lane vectors fall back to scalar code there).
typedef float f4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t i4 __attribute__((vector_size(4 * sizeof(int32_t))));

static inline f4 load4(const float* p) { f4 v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store4(float* p, f4 v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 (every use here: a logit minus its running maximum or its log-normaliser),
// four at once; std::exp is one scalar call per value, which was the kernels' largest cost.
// Cephes' expf: x = n ln2 + r with ln2 in two parts, a polynomial for e^r, 2^n from the
// exponent bits; relative error below 1e-7.  Below -87 it gives 0, so -inf (an empty lane or
// the running maximum's start) gives 0.
static inline f4 exp4(f4 x) {
  const f4 clamped = x < -87.f ? f4{} - 87.f : x;
  const i4 n = __builtin_convertvector(clamped * 1.44269504088896341f - 0.5f, i4);  // round(x / ln2), x <= 0
  const f4 nf = __builtin_convertvector(n, f4);
  const f4 r = clamped - nf * 0.693359375f + nf * 2.12194440e-4f;
  f4 p = f4{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i4 bits = (n + 127) << 23;
  f4 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? f4{} : p * scale;
}

constexpr int64_t TILE = 8;     // tokens per pass: one index and one 32-byte load serve them all
constexpr int64_t CHUNK = 512;  // words per pass: their TILE x CHUNK logits stay in L1

struct Mapping {
  const int32_t* columns;  // (V, K): the mapping as columns of the score table
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
static void chunk_logits(const Mapping& b, const float* tile, int64_t v0, int64_t C, float* y) {
  for (int64_t j = 0; j < C; ++j) {
    float acc[TILE];
    const float start = b.bias ? b.bias[v0 + j] : 0.f;
    for (int64_t t = 0; t < TILE; ++t) acc[t] = start;
    const int32_t* cols = b.columns + (v0 + j) * b.K;
    for (int64_t k = 0; k < b.K; ++k) {
      const float* s = tile + int64_t(cols[k]) * TILE;
      for (int64_t t = 0; t < TILE; ++t) acc[t] += s[t];
    }
    std::copy(acc, acc + TILE, y + j * TILE);
  }
}

// dtile[slot * TILE + t] += dy[j * TILE + t] for every slot of word v0 + j; dbias[v] += sum_t.
// Position by position: slot k of every word lies in block k of the R columns, so each pass
// writes into one block of R/K x TILE floats, which stays in L1 up to ~1000 entries per
// position where the whole dtile would not (beyond that the scatter dominates the backward).
static void chunk_scatter(const Mapping& b, const float* dy, int64_t v0, int64_t C, float* dtile, float* dbias) {
  for (int64_t k = 0; k < b.K; ++k) {
    const int32_t* cols = b.columns + v0 * b.K + k;
    for (int64_t j = 0; j < C; ++j) {
      const float* d = dy + j * TILE;
      float* s = dtile + int64_t(cols[j * b.K]) * TILE;
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
    for (int64_t h = 0; h < TILE; h += 4) {
      f4 m = load4(top + h), sum = {};
      for (int64_t j = 0; j < C; ++j) { const f4 v = load4(y + j * TILE + h); m = v > m ? v : m; }
      for (int64_t j = 0; j < C; ++j) sum += exp4(load4(y + j * TILE + h) - m);
      store4(total + h, load4(total + h) * exp4(load4(top + h) - m) + sum);
      store4(top + h, m);
    }
  }
  float value(int64_t t) const { return top[t] + std::log(total[t]); }
};

// The checks at the boundary: a wrong tensor stops with a message instead of reading out of bounds.
static Mapping mapping_of(const torch::Tensor& scores, const torch::Tensor& mapping, const torch::Tensor& bias) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat && scores.is_contiguous(),
              "scores must be a contiguous (N, R) float32 tensor");
  TORCH_CHECK(mapping.dim() == 2 && mapping.scalar_type() == torch::kInt && mapping.is_contiguous(),
              "mapping must be a contiguous (V, K) int32 tensor");
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == mapping.size(0) &&
              bias.scalar_type() == torch::kFloat && bias.is_contiguous()),
              "bias must be empty or a contiguous float32 vector with one value per word");
  TORCH_CHECK(mapping.numel() == 0 || (mapping.min().item<int32_t>() >= 0 && mapping.max().item<int32_t>() < scores.size(1)),
              "mapping entries must index columns of scores");
  return {mapping.data_ptr<int32_t>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
          mapping.size(0), mapping.size(1), scores.size(1)};
}

static void check_same(const torch::Tensor& tensor, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(tensor.sizes() == shape && tensor.scalar_type() == torch::kFloat && tensor.is_contiguous(),
              name, " must be a contiguous float32 tensor of shape ", shape);
}

// The bias gradient is summed in this many fixed parts of the tokens, then the parts in order:
// the same sums in the same order whatever the number of threads.
constexpr int64_t BIAS_PARTS = 32;

// Runs body(n0, tile, y, dtile, dbias) for every tile of TILE tokens, in parallel; returns the
// bias gradient (empty without a bias).
// y holds the logits of CHUNK words, or of the whole vocabulary with all_words.
template <typename Body>
static torch::Tensor for_each_tile(const Mapping& b, int64_t N, bool with_dtile, bool with_dbias,
                                   const torch::TensorOptions& options, Body body, bool all_words = false) {
  const int64_t tiles = (N + TILE - 1) / TILE;
  const int64_t parts = with_dbias ? std::min(tiles, BIAS_PARTS) : tiles;
  auto dbias = torch::zeros({with_dbias ? parts : 0, b.V}, options);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(b.R * TILE), y((all_words ? b.V : CHUNK) * TILE), dtile(with_dtile ? b.R * TILE : 0);
    for (int64_t p = begin; p < end; ++p) {
      float* db = with_dbias ? dbias.data_ptr<float>() + p * b.V : nullptr;
      for (int64_t i = p * tiles / parts; i < (p + 1) * tiles / parts; ++i)
        body(i * TILE, tile.data(), y.data(), dtile.data(), db);
    }
  });
  if (!with_dbias) return dbias;
  auto total = torch::zeros({b.V}, options);
  const float* part = dbias.data_ptr<float>();
  float* out = total.data_ptr<float>();
  at::parallel_for(0, b.V, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = 0; p < parts; ++p)
      for (int64_t v = begin; v < end; ++v) out[v] += part[p * b.V + v];
  });
  return total;
}

// grad_scores[n0 + t, r] = dtile[r * TILE + t]
static void store_tile(const float* dtile, int64_t N, int64_t R, int64_t n0, float* grad_scores) {
  for (int64_t t = 0; t < TILE && n0 + t < N; ++t)
    for (int64_t r = 0; r < R; ++r) grad_scores[(n0 + t) * R + r] = dtile[r * TILE + t];
}

torch::Tensor logsumexp_forward(torch::Tensor scores, torch::Tensor mapping, torch::Tensor bias) {
  const Mapping b = mapping_of(scores, mapping, bias);
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

// Lane weights and log-normalisers of the tile at n0: lanes past N weigh nothing, and
// exp(logit - inf) = 0 there, never 0 * exp(a large bias) = NaN.
static void tile_lanes(const float* g, const float* l, int64_t N, int64_t n0, float* gt, float* lt) {
  std::fill(gt, gt + TILE, 0.f);
  std::fill(lt, lt + TILE, std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < TILE && n0 + t < N; ++t) { gt[t] = g[n0 + t]; lt[t] = l[n0 + t]; }
}

// y[j * TILE + t] = gt[t] * softmax of the logit there (exp(y - lt)), for C words.
static void weighted_softmax(const float* gt, const float* lt, int64_t C, float* y) {
  for (int64_t h = 0; h < TILE; h += 4) {
    const f4 gv = load4(gt + h), lv = load4(lt + h);
    for (int64_t j = 0; j < C; ++j) store4(y + j * TILE + h, gv * exp4(load4(y + j * TILE + h) - lv));
  }
}

// The log-normalisers and, in the same pass over the vocabulary, their gradient for an
// incoming gradient equal to `weights`: each tile's logits are gathered once and kept (V x 8
// floats a thread), where the forward and a separate backward would gather them twice.
std::vector<torch::Tensor> logsumexp_forward_backward(torch::Tensor scores, torch::Tensor mapping, torch::Tensor bias,
                                                      torch::Tensor weights) {
  const Mapping b = mapping_of(scores, mapping, bias);
  const int64_t N = scores.size(0);
  check_same(weights, {N}, "weights");
  auto lse = torch::empty({N}, scores.options());
  auto grad_scores = torch::empty_like(scores);
  const float* s = scores.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  float* out = lse.data_ptr<float>();
  float* ds = grad_scores.data_ptr<float>();
  auto grad_bias = for_each_tile(b, N, true, b.bias != nullptr, scores.options(),
      [&](int64_t n0, float* tile, float* y, float* dtile, float* dbias) {
    load_tile(s, N, b.R, n0, tile);
    LogSumExp running;
    for (int64_t v0 = 0; v0 < b.V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, b.V - v0);
      chunk_logits(b, tile, v0, C, y + v0 * TILE);
      running.add(y + v0 * TILE, C);
    }
    for (int64_t t = 0; t < TILE && n0 + t < N; ++t) out[n0 + t] = running.value(t);
    float gt[TILE], lt[TILE];
    tile_lanes(w, out, N, n0, gt, lt);
    std::fill(dtile, dtile + b.R * TILE, 0.f);
    for (int64_t v0 = 0; v0 < b.V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, b.V - v0);
      weighted_softmax(gt, lt, C, y + v0 * TILE);
      chunk_scatter(b, y + v0 * TILE, v0, C, dtile, dbias);
    }
    store_tile(dtile, N, b.R, n0, ds);
  }, true);
  return {lse, grad_scores, grad_bias};
}

// d lse[n] / d logit[n, w] = softmax[n, w]: recompute the logits, scatter grad[n] * softmax.
std::vector<torch::Tensor> logsumexp_backward(torch::Tensor grad, torch::Tensor scores, torch::Tensor mapping,
                                              torch::Tensor bias, torch::Tensor lse) {
  const Mapping b = mapping_of(scores, mapping, bias);
  const int64_t N = scores.size(0);
  check_same(grad, {N}, "grad");
  check_same(lse, {N}, "lse");
  auto grad_scores = torch::empty_like(scores);
  const float* s = scores.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  float* ds = grad_scores.data_ptr<float>();
  auto grad_bias = for_each_tile(b, N, true, b.bias != nullptr, scores.options(),
      [&](int64_t n0, float* tile, float* y, float* dtile, float* dbias) {
    load_tile(s, N, b.R, n0, tile);
    std::fill(dtile, dtile + b.R * TILE, 0.f);
    float gt[TILE], lt[TILE];
    tile_lanes(g, l, N, n0, gt, lt);
    for (int64_t v0 = 0; v0 < b.V; v0 += CHUNK) {
      const int64_t C = std::min(CHUNK, b.V - v0);
      chunk_logits(b, tile, v0, C, y);
      weighted_softmax(gt, lt, C, y);
      chunk_scatter(b, y, v0, C, dtile, dbias);
    }
    store_tile(dtile, N, b.R, n0, ds);
  });
  return {grad_scores, grad_bias};
}

torch::Tensor log_softmax_forward(torch::Tensor scores, torch::Tensor mapping, torch::Tensor bias) {
  const Mapping b = mapping_of(scores, mapping, bias);
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
                                                torch::Tensor mapping, torch::Tensor bias) {
  const Mapping b = mapping_of(scores, mapping, bias);
  const int64_t N = scores.size(0), V = b.V;
  check_same(grad, {N, V}, "grad");
  check_same(lprobs, {N, V}, "lprobs");
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
        int64_t j = 0;
        for (; j + 4 <= C; j += 4) {
          float d[4];
          store4(d, load4(g + row + j) - exp4(load4(lp + row + j)) * gsum[t]);
          for (int64_t i = 0; i < 4; ++i) y[(j + i) * TILE + t] = d[i];
        }
        for (; j < C; ++j) y[j * TILE + t] = g[row + j] - std::exp(lp[row + j]) * gsum[t];
      }
      chunk_scatter(b, y, v0, C, dtile, dbias);
    }
    store_tile(dtile, N, b.R, n0, ds);
  });
  return {grad_scores, grad_bias};
}
