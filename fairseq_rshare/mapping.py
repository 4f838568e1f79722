"""Where the slots of a random-shared table read in its pool: the pool layouts and the mapping.

Word w's vector is the concatenation of K sub-vectors; slot (w, k) reads pool entry
``mapping[w, k]``.  A pool layout (a pool kind) says which entries each position k may read,
how the fixed random mapping spreads the slots over them, how the output layer scores them, and
how k-means learns a mapping.  The random mapping is never stored: it is regenerated from (V, K,
M, pool kind, seed) with integer arithmetic only (a SplitMix64 hash of the slot number, then a
stable sort), so it is the same on every machine and every numpy/torch version.  A checkpoint
keeps only :func:`fingerprint` of the table, to detect a table that regenerated differently.
A learned mapping (fairseq-rshare-compress's k-means) cannot be regenerated: the checkpoint
stores it, and it costs :func:`learned_mapping_size`.

Adding a pool kind is one :class:`PoolLayout` subclass here, registered with
:func:`pool_layout` (the flags offer every registered kind).
"""
import hashlib
import math

import numpy as np
import torch

from .errors import RShareConfigError

# random: regenerated from the seed (the paper's); the learned kinds (kind -> balanced k-means),
# by fairseq-rshare-compress from a trained dense table, are stored in the checkpoint.
LEARNED_MAPPINGS = {"kmeans": False, "kmeans-balanced": True}
MAPPING_KINDS = ("random", *LEARNED_MAPPINGS)

# The version of the random mapping's algorithm, recorded in checkpoints (as thinc names
# HashEmbed.v1): a change that moves any slot is a new version, and the old one stays to load
# old checkpoints.
MAPPING_VERSION = 1

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x):
    """SplitMix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def _sort_keys(seed, count):
    """``count`` pseudo-random uint64 keys, a pure function of (seed, slot number)."""
    stream = _splitmix64(np.array([seed], dtype=np.uint64))
    return _splitmix64(np.arange(count, dtype=np.uint64) ^ stream)


POOL_LAYOUTS = {}


def pool_layout(cls):
    """Register a PoolLayout subclass under its name, a pool kind."""
    POOL_LAYOUTS[cls.name] = cls
    return cls


class PoolLayout:
    """Which of the M pool entries each of a table's V x K slots may read.

    A kind gives its ``name``, its ``blocks`` (groups of positions and the entries they share),
    its random mapping, and its pool scores for the output layer: each token's K slices scored
    against the entries they can meet, ``score_columns`` of them, and where slot (w, k)'s score
    lies among them.  ``check`` refuses a shape the kind cannot lay out, naming the arguments.
    """

    name = None

    def __init__(self, num_words, num_subvectors, pool_size):
        self.num_words, self.num_subvectors, self.pool_size = num_words, num_subvectors, pool_size

    def check(self):
        """Raise RShareConfigError for a pool this kind cannot lay out (V, K, M checked already)."""

    def blocks(self):
        """[(positions, first entry, entries)]: the positions that read the same entries."""
        raise NotImplementedError

    def random_mapping(self, seed, private_words):
        """The (V, K) int64 mapping, every entry used equally often to within one use; the i-th
        private word gets private entries (see make_mapping)."""
        raise NotImplementedError

    def score_columns(self):
        """How many pool scores a token has."""
        raise NotImplementedError

    def mapping_columns(self, mapping):
        """Each slot's column among the pool scores."""
        raise NotImplementedError

    def pool_scores(self, slices, pool):
        """(K, tokens, score_columns / K) scores of the (K, tokens, H/K) slices against the pool."""
        raise NotImplementedError

    def entry_bounds(self):
        """(low, high), K each: position k reads entries low[k] <= entry < high[k]."""
        low, high = torch.empty(self.num_subvectors, dtype=torch.long), torch.empty(self.num_subvectors, dtype=torch.long)
        for positions, first, entries in self.blocks():
            low[positions], high[positions] = first, first + entries
        return low, high

    def choices_per_slot(self):
        """How many entries one slot may read (what a stored slot must tell apart)."""
        return max(entries for _, _, entries in self.blocks())


@pool_layout
class PositionPool(PoolLayout):
    """Position k reads only its own M/K entries, k*M/K ... (k+1)*M/K - 1 (a fast output layer)."""

    name = "position"

    def check(self):
        M, K = self.pool_size, self.num_subvectors
        if M % K:
            raise RShareConfigError(
                f"pool_size {M} is not divisible by num_subvectors {K} (per-position pools): "
                f"use {M - M % K} or {M - M % K + K}, or pool_kind global"
            )
        if M // K < 2:
            raise RShareConfigError(
                f"pool_size {M} leaves one entry per position, so every word would get "
                f"the same vector: use at least {2 * K} (or a larger pool)"
            )

    def blocks(self):
        per_position = self.pool_size // self.num_subvectors
        return [([k], k * per_position, per_position) for k in range(self.num_subvectors)]

    def random_mapping(self, seed, private_words):
        V, K, F = self.num_words, self.num_subvectors, len(private_words)
        per_position = self.pool_size // K
        shared_words = np.setdiff1d(np.arange(V, dtype=np.int64), private_words)
        keys = _sort_keys(seed, (V - F) * K).reshape(V - F, K)
        table = np.empty((V, K), dtype=np.int64)
        offsets = np.arange(K, dtype=np.int64) * per_position
        table[private_words] = np.arange(F, dtype=np.int64)[:, None] + offsets
        balanced = F + np.arange(V - F, dtype=np.int64) % (per_position - F)
        order = np.argsort(keys, axis=0, kind="stable")
        table[shared_words] = balanced[order] + offsets
        return table

    def score_columns(self):
        return self.pool_size

    def mapping_columns(self, mapping):
        return mapping

    def pool_scores(self, slices, pool):
        pools = pool.view(self.num_subvectors, self.pool_size // self.num_subvectors, -1)
        return torch.bmm(slices, pools.transpose(1, 2))


@pool_layout
class GlobalPool(PoolLayout):
    """Any position reads any of the M entries (the paper's single pool)."""

    name = "global"

    def blocks(self):
        return [(list(range(self.num_subvectors)), 0, self.pool_size)]

    def random_mapping(self, seed, private_words):
        V, K, M, F = self.num_words, self.num_subvectors, self.pool_size, len(private_words)
        shared_words = np.setdiff1d(np.arange(V, dtype=np.int64), private_words)
        keys = _sort_keys(seed, (V - F) * K).reshape(V - F, K)
        table = np.empty((V, K), dtype=np.int64)
        table[private_words] = np.arange(F * K, dtype=np.int64).reshape(F, K)
        balanced = F * K + np.arange((V - F) * K, dtype=np.int64) % (M - F * K)
        table[shared_words] = balanced[np.argsort(keys.reshape(-1), kind="stable")].reshape(V - F, K)
        return table

    def score_columns(self):
        return self.num_subvectors * self.pool_size

    def mapping_columns(self, mapping):
        """Position k's scores follow those of the positions before it: offset k*M."""
        return mapping + torch.arange(self.num_subvectors, device=mapping.device) * self.pool_size

    def pool_scores(self, slices, pool):
        return torch.matmul(slices, pool.t())


POOL_KINDS = tuple(POOL_LAYOUTS)


def layout_of(pool_kind, num_words, num_subvectors, pool_size):
    """The PoolLayout of a pool kind, for a table of V words, K sub-vectors and M entries."""
    if pool_kind not in POOL_LAYOUTS:
        raise RShareConfigError(f"pool_kind must be one of {POOL_KINDS}, got {pool_kind!r}")
    return POOL_LAYOUTS[pool_kind](num_words, num_subvectors, pool_size)


def make_mapping(num_words, num_subvectors, pool_size, pool_kind="position", seed=1, private_words=()):
    """Return the (V, K) int64 table of pool entries, balanced to within one use.

    position: column k holds entries k*M/K ... (k+1)*M/K - 1 only, each used
        floor or ceil of V*K/M times.
    global: any entry at any position, each used floor or ceil of V*K/M times.
    As in the paper, a list holding every entry equally often is shuffled.

    private_words, F distinct word ids, is the frequency-aware variant (not the paper's): the
    i-th listed word gets private entries i at every position (i*K ... i*K + K-1 in the global
    pool), and the other words, in id order, share the remaining entries, balanced as above.
    No private words is the paper's method.
    """
    layout = layout_of(pool_kind, num_words, num_subvectors, pool_size)
    private_words = np.asarray(private_words, dtype=np.int64).reshape(-1)
    F = len(private_words)
    if len(np.unique(private_words)) != F or (F and not 0 <= private_words.min() <= private_words.max() < num_words):
        raise ValueError(f"private words must be distinct ids below {num_words}")
    return layout.random_mapping(seed, private_words)


def fingerprint(mapping):
    """Short hex digest of a mapping table (its int64 little-endian bytes and shape)."""
    table = np.ascontiguousarray(mapping, dtype="<i8")
    digest = hashlib.sha256(repr(table.shape).encode() + table.tobytes())
    return digest.hexdigest()[:15]


def learned_mapping_size(num_words, num_subvectors, pool_size, pool_kind="position"):
    """(bits, bytes) of a stored mapping packed tight: V*K entries, each of ceil(log2(the
    entries a slot can read)) bits (M/K per-position, M global)."""
    choices = layout_of(pool_kind, num_words, num_subvectors, pool_size).choices_per_slot()
    bits = num_words * num_subvectors * max(1, math.ceil(math.log2(choices)))
    return bits, math.ceil(bits / 8)


def pool_size_of_ratio(num_words, num_subvectors, ratio):
    """M for a table `ratio` the size of the dense one: ratio*V entries per position, at least 2."""
    return max(2 * num_subvectors, round(ratio * num_words) * num_subvectors)
