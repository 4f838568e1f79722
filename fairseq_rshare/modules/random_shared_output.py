"""The random-shared output layer: log-probabilities computed from the pool scores."""
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RShareConfigError
from ..kernels import extension, log_softmax_of_words, logsumexp_of_words
from .random_shared_embedding import RandomSharedEmbedding

logger = logging.getLogger(__name__)

OUTPUT_PATHS = ("auto", "pool-scores", "materialize")

# Timed steps of each path (after one warm-up) when `auto` measures them.
MEASURED_STEPS = 3

# What one pool score and one gathered word score cost, in multiply-adds of a dense matmul
# (forward + backward, loss included), fitted on 2 CPU cores to the fused kernels: at V=10k,
# H=200, K=8 pool-scores runs 2.7x faster than materialize with 200 entries per position and
# 1.6x slower with 2000 (the pool-scores matmul has an inner dimension of only H/K, and a
# large score table falls out of cache), as this predicts.
SCORE_COST = 7


# Evaluation is timed on at most this many tokens of its first batch: there both paths cost in
# proportion to the tokens (the materialised matrix is kept between calls), so a slice tells
# which is faster without paying for a large batch eight times over.
EVALUATION_TIMED_TOKENS = 256

# `auto` times the two paths only where the cost model's estimates lie within this factor of
# each other; beyond it the model's choice stands untimed (timing materialize at V=800k,
# H=1024 would build a 3.3 GB matrix, its gradient and tokens x V log-probabilities).
TIMED_WITHIN = 4


def path_costs(num_words, embed_dim, num_subvectors, scores_per_token):
    """Cost model: (pool-scores, materialize) per token, in dense multiply-adds.  Pool scores
    cost (scores per token) * H/K multiply-adds plus V*K gathered scores, each about
    SCORE_COST dense multiply-adds; the materialised matrix costs V*H multiply-adds (building
    it is once a batch)."""
    V, H, K = num_words, embed_dim, num_subvectors
    return SCORE_COST * (scores_per_token * H / K + V * K), V * H


def pool_scores_is_cheaper(num_words, embed_dim, num_subvectors, scores_per_token, device_type="cpu"):
    """Cost model: the pool-scores path beats multiplying by the materialised V x H matrix.
    Only on CPU, where the fused kernels run: elsewhere pool scores fall back to stock ops that
    build tokens x V x K gathered scores, so the materialised matrix wins."""
    if device_type != "cpu":
        return False
    pool_scores, materialize = path_costs(num_words, embed_dim, num_subvectors, scores_per_token)
    return pool_scores < materialize


class RandomSharedOutput(nn.Module):
    """Output layer over a RandomSharedEmbedding: logit(w) = sum_k h_k . pool[mapping[w, k]].

    Two ways to compute the same log-probabilities:
    - pool-scores: the V x H matrix is never built.  Each token's K slices h_k are scored
      against the pool entries they can meet (R scores: M for per-position pools, K*M for a
      global pool), then each word sums its K scores: O(R*H/K + V*K) per token instead of
      O(V*H).  The sums and the log-softmax are fused (see kernels/output_cpu.cpp), and :meth:`loss`
      (the ``rshare_cross_entropy`` criterion) never builds tokens x V at all.
    - materialize: build the V x H matrix from the pool once a batch and multiply, as dense.
      Faster when H/K is small or the pool is large (a dense matmul multiply-add is about
      SCORE_COST times cheaper than a pool score or a gathered score).
    ``path="auto"`` on CPU times both on the first call of each regime (:meth:`measure_path_once`,
    every rank taking rank 0's choice): training (forward and backward of the loss) and
    evaluation (forward only, where the materialised matrix is kept between calls) are timed
    and chosen apart.  Before that, on other devices, and where the cost model
    (:func:`path_costs`) is clear by more than TIMED_WITHIN, it picks by the model.
    Forward returns logits for fairseq's ``get_normalized_probs`` to normalise: in training
    they are log-probabilities already (the rshare decoders then skip fairseq's log-softmax,
    a pass over V forward and backward); in eval mode the materialize path returns the raw
    logits, as a dense layer does, so generation and eval-lm normalise once, not twice.
    """

    def __init__(self, table: RandomSharedEmbedding, bias=False, path="auto"):
        super().__init__()
        if path not in OUTPUT_PATHS:
            raise RShareConfigError(f"path must be one of {OUTPUT_PATHS}, got {path!r}")
        self.table = table
        K, M = table.num_subvectors, table.pool_size
        # The mapping as columns of the pool-score table: per-position pools score each slice
        # against its own block, a global pool against all K*M (so position k is offset by k*M).
        if table.pool_kind == "position":
            mapping_columns = table.mapping
        else:
            mapping_columns = table.mapping + torch.arange(K) * M
        self.register_buffer("mapping_columns", mapping_columns.to(torch.int32).contiguous(), persistent=False)
        column_uses = torch.bincount(self.mapping_columns.flatten().long(), minlength=K * M if table.pool_kind == "global" else M)
        self.register_buffer("column_uses", column_uses, persistent=False)
        self._weight, self._weight_version = None, None
        self.bias = nn.Parameter(torch.zeros(table.num_embeddings)) if bias else None
        if table.word_scale is not None:
            if path == "pool-scores":
                raise RShareConfigError("a table with word_scale runs on path materialize (or auto) only")
            path = "materialize"
        self.path_setting = path
        self.chosen_paths = {}  # regime ("training" or "evaluation") -> the path chosen
        if self.path_on("cpu") == "pool-scores" and not torch.cuda.is_available():
            extension()  # compile or load the fused kernel now, not inside the first timed step

    def cost_shape(self):
        """(V, H, K, pool scores per token): the cost model's arguments for this layer."""
        table = self.table
        K, M = table.num_subvectors, table.pool_size
        return table.num_embeddings, table.embedding_dim, K, M if table.pool_kind == "position" else K * M

    def path_on(self, device_type):
        """The path this layer takes on a device type ("cpu", "cuda", ...)."""
        if self.path_setting != "auto":
            return self.path_setting
        return "pool-scores" if pool_scores_is_cheaper(*self.cost_shape(), device_type) else "materialize"

    def regime(self):
        """"training" when a backward will follow (training mode with gradients on), else
        "evaluation": the two cost differently, so auto times and chooses them apart."""
        return "training" if self.training and torch.is_grad_enabled() else "evaluation"

    @property
    def path(self):
        """The path taken where the parameters are now: the chosen one once there is one."""
        device_type = self.table.pool.device.type
        chosen = self.chosen_paths.get(self.regime())
        if chosen is not None and device_type == "cpu":
            return chosen
        return self.path_on(device_type)

    def measure_path_once(self, num_tokens):
        """With path "auto" on CPU, choose a path once per regime: time both on this many
        tokens, as that regime runs them, and keep the faster (in distributed runs every rank
        takes rank 0's choice, so all run the same code), or, where the cost model is clear,
        take its choice untimed."""
        regime = self.regime()
        if regime in self.chosen_paths or self.path_setting != "auto" or self.table.pool.device.type != "cpu":
            return
        costs = path_costs(*self.cost_shape())
        if max(costs) > TIMED_WITHIN * min(costs):
            self.chosen_paths[regime] = self.path_on("cpu")  # a clear case: not worth timing
            return
        if regime == "evaluation":
            num_tokens = min(num_tokens, EVALUATION_TIMED_TOKENS)
        seconds = {path: self.time_path(path, max(1, num_tokens), regime) for path in ("pool-scores", "materialize")}
        self._weight = self._weight_version = None  # a matrix timed in evaluation is not kept
        choice = min(seconds, key=seconds.get)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = [choice]
            torch.distributed.broadcast_object_list(shared, src=0)
            choice = shared[0]
        self.chosen_paths[regime] = choice
        logger.info(
            "rshare output layer (V=%d, H=%d, K=%d, M=%d), %d tokens, %s: "
            "pool-scores %.1f ms, materialize %.1f ms: taking %s",
            self.table.num_embeddings, self.table.embedding_dim, self.table.num_subvectors, self.table.pool_size,
            num_tokens, regime, 1000 * seconds["pool-scores"], 1000 * seconds["materialize"], choice,
        )

    def time_path(self, path, num_tokens, regime):
        """Seconds per call through `path` on random features: in training the forward and
        backward of the loss, in evaluation what forward returns (fairseq's log-softmax after it
        costs both paths the same)."""
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(num_tokens, self.table.embedding_dim, generator=generator, dtype=self.table.pool.dtype)
        target = torch.randint(self.table.num_embeddings, (num_tokens,), generator=generator)
        inputs = [features.requires_grad_()] + [p for p in self.parameters() if p.requires_grad]

        def training_step():
            if path == "pool-scores":
                loss = self.loss(features, target)[0]
            else:
                loss = F.nll_loss(self.materialized_forward(features), target, reduction="sum")
            torch.autograd.grad(loss, inputs)  # the gradients are dropped: no .grad is touched

        def evaluation_step():
            with torch.no_grad():
                self.logits_through(path, features)

        step = training_step if regime == "training" else evaluation_step
        step()
        start = time.perf_counter()
        for _ in range(MEASURED_STEPS):
            step()
        return (time.perf_counter() - start) / MEASURED_STEPS

    def forward(self, features):
        self.measure_path_once(features.numel() // features.shape[-1])
        return self.logits_through(self.path, features)

    def logits_through(self, path, features):
        """What forward returns on `path`: log-probabilities, except the materialize path's raw
        logits in eval mode (see the class docstring)."""
        if path == "materialize":
            if self.training:
                return self.materialized_forward(features)
            return self.materialized_logits(features)
        lprobs = log_softmax_of_words(self.pool_scores(features), self.mapping_columns, self.bias)
        return lprobs.reshape(*features.shape[:-1], -1)

    def pool_scores(self, features):
        """(tokens, R) scores of each token's K slices against the pool entries they can meet."""
        K, M = self.table.num_subvectors, self.table.pool_size
        slices = features.reshape(-1, K, features.shape[-1] // K).transpose(0, 1)
        if self.table.pool_kind == "position":
            pools = self.table.pool.view(K, M // K, -1)
            scores = torch.bmm(slices, pools.transpose(1, 2))
        else:
            scores = torch.matmul(slices, self.table.pool.t())
        scores = scores.transpose(0, 1).reshape(slices.shape[1], -1)
        return scores if scores.dtype == torch.float64 else scores.float()

    def loss(self, features, target, label_smoothing=0.0, ignore_index=None):
        """Summed (label-smoothed) cross-entropy and summed NLL, as fairseq's
        ``label_smoothed_nll_loss`` computes them from log-probabilities, but from the pool
        scores: -log p(target) = logsumexp - logit(target), and the smoothing term needs only
        the sum of all logits, sum_w logit(w) = sum_r (uses of score r) * score r.  Nothing of
        size tokens x V is built, in the forward or the backward.
        """
        scores = self.pool_scores(features)
        target = target.reshape(-1)
        keep = target.ne(ignore_index) if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        # Both losses below weigh each kept token's log-normaliser alike: the gradient to expect.
        logsumexp = logsumexp_of_words(scores, self.mapping_columns, self.bias, expected_grad=keep.to(scores.dtype))
        target_logit = scores.gather(1, self.mapping_columns[target].long()).sum(1)
        if self.bias is not None:
            target_logit = target_logit + self.bias[target]
        nll = logsumexp - target_logit
        nll_loss = nll.masked_fill(~keep, 0.0).sum()
        if not label_smoothing:
            return nll_loss, nll_loss
        V = self.table.num_embeddings
        logit_sum = scores @ self.column_uses.to(scores.dtype)
        if self.bias is not None:
            logit_sum = logit_sum + self.bias.sum()
        smooth_loss = (V * logsumexp - logit_sum).masked_fill(~keep, 0.0).sum()
        eps_i = label_smoothing / (V - 1)
        return (1.0 - label_smoothing - eps_i) * nll_loss + eps_i * smooth_loss, nll_loss

    def materialized_logits(self, features):
        """Raw logits through the V x H matrix built from the pool, as a dense layer's."""
        return F.linear(features, self.materialized_weight(), self.bias)

    def materialized_forward(self, features):
        """Log-probabilities through the V x H matrix built from the pool."""
        logits = self.materialized_logits(features)
        return F.log_softmax(logits, dim=-1, dtype=torch.float32 if logits.dtype != torch.float64 else None)

    def materialized_weight(self):
        """The V x H matrix, rebuilt for every training call; in eval mode under no_grad
        (generation, eval-lm) it is kept until the pool changes, not rebuilt every step."""
        if self.training or torch.is_grad_enabled():
            return self.table.materialized_weight()
        version = tuple((p.data_ptr(), p._version, p.dtype) for p in self.table.parameters())
        if self._weight_version != version:
            self._weight, self._weight_version = self.table.materialized_weight(), version
        return self._weight

    def train(self, mode=True):
        self._weight = self._weight_version = None  # training keeps no V x H copy around
        return super().train(mode)

    def extra_repr(self):
        return f"path={self.path}, bias={self.bias is not None}"
