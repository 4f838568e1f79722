"""Random-shared input embedding and output layer (Li et al., AAAI 2018, arXiv 1711.09873)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import extension, log_softmax_of_bags, logsumexp_of_bags
from .mapping import POOL_KINDS, fingerprint, make_mapping


# Slot indices stay below 2**31 so that every index kernel (and int32 users) can address them.
MAX_SLOTS = 2**31 - 1


class RShareConfigError(ValueError):
    """A bad rshare setting or checkpoint; fairseq_rshare prints its message without a traceback."""


def check_table_shape(num_words, embed_dim, num_subvectors, pool_size, pool_kind, private_words=0):
    """Raise RShareConfigError naming the flag to change when the table cannot be built
    (private_words: how many words get private entries)."""
    V, H, K, M, F = num_words, embed_dim, num_subvectors, pool_size, private_words
    if K <= 0:
        raise RShareConfigError(f"--rshare-subvectors must be positive, got {K}")
    if M <= 0:
        raise RShareConfigError(f"--rshare-pool-size must be positive, got {M}")
    if K > H:
        raise RShareConfigError(
            f"--rshare-subvectors {K} is larger than the embedding dim {H}: use at most {H}"
        )
    if H % K:
        raise RShareConfigError(
            f"embedding dim {H} is not divisible by --rshare-subvectors {K}: "
            f"pick a divisor of {H}"
        )
    if pool_kind not in POOL_KINDS:
        raise RShareConfigError(f"--rshare-pool-kind must be one of {POOL_KINDS}, got {pool_kind!r}")
    if M < K:
        raise RShareConfigError(
            f"--rshare-pool-size {M} is smaller than --rshare-subvectors {K}: use at least {K}"
        )
    if pool_kind == "position" and M % K:
        raise RShareConfigError(
            f"--rshare-pool-size {M} is not divisible by --rshare-subvectors {K} "
            f"(per-position pools): use {M - M % K} or {M - M % K + K}, or --rshare-pool-kind global"
        )
    if pool_kind == "position" and M // K < 2:
        raise RShareConfigError(
            f"--rshare-pool-size {M} leaves one entry per position, so every word would get "
            f"the same vector: use at least {2 * K} (or a larger --rshare-ratio)"
        )
    if V * K > MAX_SLOTS:
        raise RShareConfigError(
            f"a vocabulary of {V} words with --rshare-subvectors {K} has {V * K} slots, more "
            f"than the {MAX_SLOTS} supported: use fewer sub-vectors or a smaller vocabulary"
        )
    if M >= V * K:
        raise RShareConfigError(
            f"--rshare-pool-size {M} gives no compression for a vocabulary of {V} words "
            f"with {K} sub-vectors: use fewer than {V * K} entries (or a dense table)"
        )
    if F and M - F * K < 2 * K:
        raise RShareConfigError(
            f"--rshare-frequent-words {F} leaves fewer than 2 shared entries per position in a "
            f"pool of {M}: use at most {M // K - 2} (or a larger pool)"
        )


def check_same_on_all_ranks(fingerprint):
    """In distributed training every rank must regenerate the same table."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    fingerprints = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(fingerprints, fingerprint)
    if len(set(fingerprints)) > 1:
        raise RShareConfigError(
            f"the ranks built different rshare mappings ({', '.join(fingerprints)}): start "
            "every rank with the same --rshare-* flags and the same dictionary"
        )


class RandomSharedEmbedding(nn.Module):
    """Token embedding whose V x H matrix is K sub-vectors per word, drawn from a pool of M.

    Only ``pool`` (M x H/K) is trained.  ``mapping`` (V x K, pool row of each slot) is
    regenerated from the settings and is not saved; ``mapping_fingerprint`` is saved, and
    loading weights made with a different table is an error.  ``private_words`` (the
    frequency-aware variant) get entries no other word uses; ``word_scale`` adds a trained
    scale per word and sub-vector.
    """

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        padding_idx,
        num_subvectors,
        pool_size,
        pool_kind="position",
        seed=1,
        private_words=(),
        word_scale=False,
    ):
        super().__init__()
        private_words = [int(word) for word in private_words]
        check_table_shape(
            num_embeddings, embedding_dim, num_subvectors, pool_size, pool_kind, len(private_words)
        )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.num_subvectors = num_subvectors
        self.pool_size = pool_size
        self.pool_kind = pool_kind
        self.seed = seed
        self.private_words = private_words
        mapping = make_mapping(num_embeddings, num_subvectors, pool_size, pool_kind, seed, private_words)
        self.fingerprint = fingerprint(mapping)
        check_same_on_all_ranks(self.fingerprint)
        self.register_buffer("mapping", torch.from_numpy(mapping), persistent=False)
        self.register_buffer(
            "mapping_fingerprint", torch.tensor(int(self.fingerprint, 16)), persistent=True
        )
        self.pool = nn.Parameter(torch.empty(pool_size, embedding_dim // num_subvectors))
        nn.init.normal_(self.pool, mean=0.0, std=embedding_dim**-0.5)
        # Optional per-word scales of the K sub-vectors (V*K numbers, started at 1): words that
        # share an entry can still weigh it differently.
        self.word_scale = nn.Parameter(torch.ones(num_embeddings, num_subvectors)) if word_scale else None

    def forward(self, tokens):
        vectors = F.embedding(self.mapping[tokens], self.pool)
        if self.word_scale is not None:
            vectors = vectors * self.word_scale[tokens].unsqueeze(-1)
        vectors = vectors.flatten(-2)
        if self.padding_idx is not None:
            vectors = vectors.masked_fill(tokens.eq(self.padding_idx).unsqueeze(-1), 0.0)
        return vectors

    def materialized_weight(self):
        """The V x H matrix this module stands for (pad row included, not zeroed)."""
        vectors = self.pool[self.mapping]
        if self.word_scale is not None:
            vectors = vectors * self.word_scale.unsqueeze(-1)
        return vectors.flatten(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "mapping_fingerprint")
        if stored is not None and int(stored) != int(self.mapping_fingerprint):
            raise RShareConfigError(
                f"checkpoint table '{prefix.rstrip('.')}' was trained with mapping fingerprint "
                f"{int(stored):015x}, but these settings (V={self.num_embeddings}, "
                f"K={self.num_subvectors}, M={self.pool_size}, pool kind={self.pool_kind}, "
                f"seed={self.seed}, private words={len(self.private_words)}) regenerate {self.fingerprint}: load it with the settings it "
                "was trained with (do not override --rshare-* flags)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, K={self.num_subvectors}, "
            f"pool={self.pool_size} ({self.pool_kind}), seed={self.seed}, "
            f"private_words={len(self.private_words)}, word_scale={self.word_scale is not None}, "
            f"fingerprint={self.fingerprint}"
        )


OUTPUT_PATHS = ("auto", "pool-scores", "materialize")

# What one pool score and one gathered word score cost, in multiply-adds of a dense matmul
# (forward + backward, loss included), fitted on 2 CPU cores to the fused kernels: at V=10k,
# H=200, K=8 pool-scores runs 2.7x faster than materialize with 200 entries per position and
# 1.6x slower with 2000 (the pool-scores matmul has an inner dimension of only H/K, and a
# large score table falls out of cache), as this predicts.
SCORE_COST = 7


def pool_scores_is_cheaper(num_words, embed_dim, num_subvectors, scores_per_token):
    """Cost model: the pool-scores path beats multiplying by the materialised V x H matrix.

    Per token, pool scores cost (scores per token) * H/K multiply-adds plus V*K gathered
    scores, each about SCORE_COST dense multiply-adds; the materialised matrix costs V*H
    multiply-adds (building it is once a batch).
    """
    V, H, K = num_words, embed_dim, num_subvectors
    return SCORE_COST * (scores_per_token * H / K + V * K) < V * H


class RandomSharedOutput(nn.Module):
    """Output layer over a RandomSharedEmbedding: logit(w) = sum_k h_k . pool[mapping[w, k]].

    Two ways to compute the same log-probabilities:
    - pool-scores: the V x H matrix is never built.  Each token's K slices h_k are scored
      against the pool entries they can meet (R scores: M for per-position pools, K*M for a
      global pool), then each word sums its K scores: O(R*H/K + V*K) per token instead of
      O(V*H).  The sums and the log-softmax are fused (see fused.py), and :meth:`loss`
      (the ``rshare_cross_entropy`` criterion) never builds tokens x V at all.
    - materialize: build the V x H matrix from the pool once a batch and multiply, as dense.
      Faster when H/K is small or the pool is large (a dense matmul multiply-add is about
      SCORE_COST times cheaper than a pool score or a gathered score).
    ``path="auto"`` picks by :func:`pool_scores_is_cheaper`, a pure function of the shape, so
    every rank and every reload takes the same path.  Forward returns log-probabilities;
    they are normalised logits, and fairseq's own log-softmax over them changes nothing.
    """

    def __init__(self, table: RandomSharedEmbedding, bias=False, path="auto"):
        super().__init__()
        if path not in OUTPUT_PATHS:
            raise RShareConfigError(f"--rshare-output-path must be one of {OUTPUT_PATHS}, got {path!r}")
        self.table = table
        K, M = table.num_subvectors, table.pool_size
        if table.pool_kind == "position":
            bags = table.mapping
        else:
            bags = table.mapping + torch.arange(K) * M
        self.register_buffer("bags", bags.to(torch.int32).contiguous(), persistent=False)
        slot_uses = torch.bincount(self.bags.flatten().long(), minlength=K * M if table.pool_kind == "global" else M)
        self.register_buffer("slot_uses", slot_uses, persistent=False)
        self._weight, self._weight_version = None, None
        self.bias = nn.Parameter(torch.zeros(table.num_embeddings)) if bias else None
        if table.word_scale is not None:
            if path == "pool-scores":
                raise RShareConfigError(
                    "--rshare-word-scale runs on the materialize output path only: use "
                    "--rshare-output-path materialize or auto"
                )
            path = "materialize"
        if path == "auto":
            scores_per_token = M if table.pool_kind == "position" else K * M
            cheaper = pool_scores_is_cheaper(table.num_embeddings, table.embedding_dim, K, scores_per_token)
            path = "pool-scores" if cheaper else "materialize"
        self.path = path
        if path == "pool-scores":
            extension()  # compile or load the fused kernel now, not inside the first timed step

    def forward(self, features):
        if self.path == "materialize":
            return self.materialized_forward(features)
        lprobs = log_softmax_of_bags(self.pool_scores(features), self.bags, self.bias)
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
        logsumexp = logsumexp_of_bags(scores, self.bags, self.bias)
        target_logit = scores.gather(1, self.bags[target].long()).sum(1)
        if self.bias is not None:
            target_logit = target_logit + self.bias[target]
        nll = logsumexp - target_logit
        keep = target.ne(ignore_index) if ignore_index is not None else torch.ones_like(nll, dtype=torch.bool)
        nll_loss = nll.masked_fill(~keep, 0.0).sum()
        if not label_smoothing:
            return nll_loss, nll_loss
        V = self.table.num_embeddings
        logit_sum = scores @ self.slot_uses.to(scores.dtype)
        if self.bias is not None:
            logit_sum = logit_sum + self.bias.sum()
        smooth_loss = (V * logsumexp - logit_sum).masked_fill(~keep, 0.0).sum()
        eps_i = label_smoothing / (V - 1)
        return (1.0 - label_smoothing - eps_i) * nll_loss + eps_i * smooth_loss, nll_loss

    def materialized_forward(self, features):
        """Log-probabilities through the V x H matrix built from the pool."""
        logits = F.linear(features, self.materialized_weight(), self.bias)
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


class SkipRenormalizationMixin:
    """For fairseq decoders whose output layer may be a RandomSharedOutput.

    Its outputs are already log-probabilities, so in training fairseq's own log-softmax over
    them (a full extra pass over V, forward and backward) is skipped.  In evaluation fairseq
    renormalises as usual, since the sequence generator may rescale the outputs first.
    """

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        if self.training and log_probs and isinstance(self.output_projection, RandomSharedOutput):
            return net_output[0]
        return super().get_normalized_probs(net_output, log_probs, sample)
