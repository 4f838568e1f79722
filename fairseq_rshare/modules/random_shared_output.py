"""The random-shared output layer: log-probabilities computed from the pool scores."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RShareConfigError
from ..kernels import cross_entropy_of_logits, log_softmax_of_words, logsumexp_of_words
from .output_path import OUTPUT_PATHS, PathChooser
from .random_shared_embedding import RandomSharedEmbedding


def index_mapping_after_loading(module, incompatible_keys):
    module.index_mapping()


class RandomSharedOutput(nn.Module):
    """Output layer over a RandomSharedEmbedding: logit(w) = sum_k h_k . pool[mapping[w, k]].

    Two ways to compute the same log-probabilities:
    - pool-scores: the V x H matrix is never built.  Each token's K slices h_k are scored
      against the pool entries they can meet (R scores: M for per-position pools, K*M for a
      global pool), then each word sums its K scores: O(R*H/K + V*K) per token instead of
      O(V*H).  The sums and the log-softmax are fused (see kernels/), and :meth:`loss`
      (the ``rshare_cross_entropy`` criterion) never builds tokens x V at all.
    - materialize: build the V x H matrix from the pool once a batch and multiply, as dense.
      Faster when H/K is small or the pool is large (a dense matmul multiply-add is about
      SCORE_COST times cheaper than a pool score or a gathered score).
    A :class:`~.output_path.PathChooser` picks between them: with ``path="auto"`` by the cost
    model, and where fused kernels run or on a GPU by timing both on the first call of each regime:
    training (:meth:`measure_path_once`, on random features of the batch's size) and
    evaluation (the first real batch through one path, the second through the other, forward
    only, the materialised matrix kept between calls) are timed and chosen apart.
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
                raise RShareConfigError("word_scale runs on the materialize output path only: use path materialize or auto")
            path = "materialize"
        V, H, K, M = table.num_embeddings, table.embedding_dim, table.num_subvectors, table.pool_size
        self.chooser = PathChooser(path, (V, H, K, table.layout.score_columns()),
                                   f"rshare output layer (V={V}, H={H}, K={K}, M={M})")

    def index_mapping(self):
        """The table's mapping as columns of the pool-score table (as its layout places them), and
        how many words use each column."""
        layout = self.table.layout
        mapping_columns = layout.mapping_columns(self.table.mapping)
        self.register_buffer("mapping_columns", mapping_columns.to(torch.int32).contiguous(), persistent=False)
        column_uses = torch.bincount(self.mapping_columns.flatten().long(), minlength=layout.score_columns())
        self.register_buffer("column_uses", column_uses, persistent=False)

    def scores_dtype(self):
        """The pool scores' dtype: float64 for a float64 pool (exact checks), else float32."""
        return torch.float64 if self.table.pool.dtype == torch.float64 else torch.float32

    def path_on(self, device):
        """The path this layer takes on a device (a torch.device or its name) before any timing."""
        return self.chooser.untimed_path(device, self.scores_dtype())

    def regime(self):
        """"training" when a backward will follow (training mode with gradients on), else
        "evaluation": the two cost differently, so auto times and chooses them apart."""
        return "training" if self.training and torch.is_grad_enabled() else "evaluation"

    @property
    def path(self):
        """The path taken where the parameters are now: the chosen one once there is one."""
        return self.chooser.path(self.table.pool.device, self.scores_dtype(), self.regime())

    def path_settled(self):
        """No timing is left to do in this regime: forward takes :attr:`path`."""
        return not self.chooser.needs_timing(self.table.pool.device, self.scores_dtype(), self.regime())

    def measure_path_once(self, num_tokens):
        """With path "auto", choose the training path once: time both on this many tokens,
        forward and backward of the loss, and keep the faster, or, where the cost model is clear
        or no fused kernels run, take its choice untimed.  Evaluation chooses in :meth:`forward`,
        on its first real batches."""
        device = self.table.pool.device
        if self.regime() == "training" and self.chooser.needs_timing(device, self.scores_dtype(), "training"):
            self.chooser.time_training(device, self.training_step(max(1, num_tokens)), num_tokens)

    def training_step(self, num_tokens):
        """step(path): forward and backward of the loss through `path` on random features of
        this many tokens; the gradients are dropped, no .grad is touched."""
        generator, device = torch.Generator().manual_seed(0), self.table.pool.device
        features = torch.randn(num_tokens, self.table.embedding_dim, generator=generator, dtype=self.table.pool.dtype)
        target = torch.randint(self.table.num_embeddings, (num_tokens,), generator=generator)
        features, target = features.to(device), target.to(device)
        inputs = [features.requires_grad_()] + [p for p in self.parameters() if p.requires_grad]

        def step(path):
            torch.autograd.grad(self.loss(features, target, path=path)[0], inputs)

        return step

    def forward(self, features):
        num_tokens = features.numel() // features.shape[-1]
        device = self.table.pool.device
        if self.regime() == "training":
            self.measure_path_once(num_tokens)
        elif self.chooser.needs_timing(device, self.scores_dtype(), "evaluation"):
            output = self.chooser.time_evaluation(device, self.logits_through, features, num_tokens)
            if self.path != "materialize":
                self._weight = self._weight_version = None  # a matrix built for the timing is not kept
            return output
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
        self.table.check_mapping_loaded()
        K = self.table.num_subvectors
        slices = features.reshape(-1, K, features.shape[-1] // K).transpose(0, 1)
        scores = self.table.layout.pool_scores(slices, self.table.pool)
        return scores.transpose(0, 1).reshape(slices.shape[1], -1).to(self.scores_dtype())

    def loss(self, features, target, label_smoothing=0.0, ignore_index=None, path=None):
        """Summed (label-smoothed) cross-entropy and summed NLL, as fairseq's
        ``label_smoothed_nll_loss`` computes them from log-probabilities, on `path` (the
        layer's own by default).  On pool-scores: -log p(target) = logsumexp - logit(target),
        and the smoothing term needs only the sum of all logits, sum_w logit(w) = sum_r (uses
        of score r) * score r, so nothing of size tokens x V is built, in the forward or the
        backward.  On materialize: from the logits (:func:`.cross_entropy_of_logits`), without
        the tokens x V log-probabilities.
        """
        target = target.reshape(-1)
        if (path or self.path) == "materialize":
            # Flat rows, copied if need be: an LSTM's features come as a transposed (B x T x H)
            # view, over which F.linear without autograd runs up to 13x slower (bfloat16, CPU).
            logits = self.materialized_logits(features.reshape(-1, features.shape[-1]))
            return cross_entropy_of_logits(logits, target, label_smoothing, ignore_index)
        scores = self.pool_scores(features)
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
        """Training keeps no V x H copy around.  Entering eval mode keeps the matrix: fairseq's
        valid_step calls model.eval() before every batch, and the version check already
        rebuilds it once the pool has changed."""
        if mode:
            self._weight = self._weight_version = None
        return super().train(mode)

    def extra_repr(self):
        return f"path={self.chooser.setting}, bias={self.bias is not None}"
