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


# In evaluation `auto` times the two paths on real batches (not a slice: the pool-scores path's
# cost per token grows with the batch, whose score table and log-probabilities outgrow the
# caches), each on one call for at least this long or MEASURED_STEPS repeats of it.
EVALUATION_TIMED_SECONDS = 0.02

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


def index_mapping_after_loading(module, incompatible_keys):
    module.index_mapping()


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
    ``path="auto"`` on CPU times both on the first call of each regime, every rank taking rank
    0's choice: training (:meth:`measure_path_once`: forward and backward of the loss, on
    random features of the batch's size) and evaluation (:meth:`evaluate_while_timing`: the
    first real batch through one path, the second through the other, forward only, the
    materialised matrix kept between calls) are timed and chosen apart.  Before that, on other
    devices, and where the cost model (:func:`path_costs`) is clear by more than TIMED_WITHIN,
    it picks by the model.
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
        self.index_mapping()
        # A table's stored (learned) mapping replaces its placeholder when the table loads.
        self.register_load_state_dict_post_hook(index_mapping_after_loading)
        self._weight, self._weight_version = None, None
        self.bias = nn.Parameter(torch.zeros(table.num_embeddings)) if bias else None
        if table.word_scale is not None:
            if path == "pool-scores":
                raise RShareConfigError("a table with word_scale runs on path materialize (or auto) only")
            path = "materialize"
        self.path_setting = path
        self.chosen_paths = {}  # regime ("training" or "evaluation") -> the path chosen
        self.evaluation_seconds = {}  # path -> seconds per token, timed on real evaluation calls
        if self.path_on("cpu") == "pool-scores" and not torch.cuda.is_available():
            extension()  # compile or load the fused kernel now, not inside the first timed step

    def index_mapping(self):
        """The table's mapping as columns of the pool-score table: per-position pools score each
        slice against its own block, a global pool against all K*M (so position k is offset by
        k*M); and how many words use each column."""
        table = self.table
        K, M = table.num_subvectors, table.pool_size
        if table.pool_kind == "position":
            mapping_columns = table.mapping
        else:
            mapping_columns = table.mapping + torch.arange(K, device=table.mapping.device) * M
        self.register_buffer("mapping_columns", mapping_columns.to(torch.int32).contiguous(), persistent=False)
        column_uses = torch.bincount(self.mapping_columns.flatten().long(), minlength=K * M if table.pool_kind == "global" else M)
        self.register_buffer("column_uses", column_uses, persistent=False)

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
        """With path "auto" on CPU, choose the training path once: time both on this many tokens,
        forward and backward of the loss, and keep the faster, or, where the cost model is clear,
        take its choice untimed.  Evaluation chooses in :meth:`forward`, on its first real batch."""
        if self.regime() != "training" or not self.needs_choice() or self.cost_model_is_clear():
            return
        seconds = {path: self.time_path(path, max(1, num_tokens)) for path in ("pool-scores", "materialize")}
        self.take_faster(seconds, num_tokens, "training")

    def needs_choice(self):
        """auto on CPU, and no path chosen yet for the current regime."""
        return (self.path_setting == "auto" and self.table.pool.device.type == "cpu"
                and self.regime() not in self.chosen_paths)

    def cost_model_is_clear(self):
        """The cost model's estimates lie more than TIMED_WITHIN apart: its choice stands untimed."""
        costs = path_costs(*self.cost_shape())
        return max(costs) > TIMED_WITHIN * min(costs)

    def take_faster(self, seconds, num_tokens, regime):
        """Keep the faster path for `regime` (in distributed runs every rank takes rank 0's
        choice, so all run the same code), log both times and the choice, return it."""
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
        return choice

    def time_path(self, path, num_tokens):
        """Seconds per training step through `path` (forward and backward of the loss) on random
        features."""
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

        training_step()
        start = time.perf_counter()
        for _ in range(MEASURED_STEPS):
            training_step()
        return (time.perf_counter() - start) / MEASURED_STEPS

    def time_on_batch(self, path, features):
        """(seconds per call, output) of `path` on this evaluation batch: what forward returns
        (fairseq's log-softmax after it costs both paths the same).  Building the materialised
        matrix, kept across evaluation calls, is not timed."""
        self.logits_through(path, features.reshape(-1, features.shape[-1])[:1])
        calls, start = 0, time.perf_counter()
        while True:
            output = self.logits_through(path, features)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= EVALUATION_TIMED_SECONDS or calls == MEASURED_STEPS:
                return elapsed / calls, output

    def forward(self, features):
        num_tokens = features.numel() // features.shape[-1]
        if self.regime() == "training":
            self.measure_path_once(num_tokens)
        elif self.needs_choice() and not self.cost_model_is_clear():
            return self.evaluate_while_timing(features, num_tokens)
        return self.logits_through(self.path, features)

    def evaluate_while_timing(self, features, num_tokens):
        """auto's evaluation choice, made on real work: the first evaluation call runs through
        pool-scores, the second through materialize, each timed per token; after the second
        the faster is kept.  Only the difference between the paths on one batch is lost."""
        path = next(path for path in ("pool-scores", "materialize") if path not in self.evaluation_seconds)
        seconds, output = self.time_on_batch(path, features)
        self.evaluation_seconds[path] = seconds / num_tokens
        if len(self.evaluation_seconds) == 2:
            per_thousand = {path: 1000 * seconds for path, seconds in self.evaluation_seconds.items()}
            choice = self.take_faster(per_thousand, 1000, "evaluation")
            if choice != "materialize":
                self._weight = self._weight_version = None  # the matrix built for the timing is not kept
        return output

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
        self.table.check_mapping_loaded()
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
