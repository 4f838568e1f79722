"""The fixed random assignment of sub-vector slots to pool entries.

Word w's vector is the concatenation of K sub-vectors; slot (w, k) reads pool entry
``mapping[w, k]``.  The table is never stored: it is regenerated from (V, K, M, pool kind,
seed) with integer arithmetic only (a SplitMix64 hash of the slot number, then a stable
sort), so it is the same on every machine and every numpy/torch version.  A checkpoint
keeps only :func:`fingerprint` of the table, to detect a table that regenerated differently.
A learned mapping (fairseq-rshare-compress's k-means) cannot be regenerated: the checkpoint
stores it, and it costs :func:`learned_mapping_size`.
"""
import hashlib
import math

import numpy as np

POOL_KINDS = ("position", "global")

# random: regenerated from the seed (the paper's); kmeans, kmeans-balanced: learned from a
# trained dense table by fairseq-rshare-compress, and stored in the checkpoint.
MAPPING_KINDS = ("random", "kmeans", "kmeans-balanced")

# The version of the algorithm below, recorded in checkpoints (as thinc names HashEmbed.v1): a
# change that moves any slot is a new version, and the old one stays to load old checkpoints.
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
    if pool_kind not in POOL_KINDS:
        raise ValueError(f"pool kind must be one of {POOL_KINDS}, got {pool_kind!r}")
    private_words = np.asarray(private_words, dtype=np.int64).reshape(-1)
    V, K, M, F = num_words, num_subvectors, pool_size, len(private_words)
    if len(np.unique(private_words)) != F or (F and not 0 <= private_words.min() <= private_words.max() < V):
        raise ValueError(f"private words must be distinct ids below {V}")
    shared_words = np.setdiff1d(np.arange(V, dtype=np.int64), private_words)
    keys = _sort_keys(seed, (V - F) * K).reshape(V - F, K)
    table = np.empty((V, K), dtype=np.int64)
    if pool_kind == "global":
        table[private_words] = np.arange(F * K, dtype=np.int64).reshape(F, K)
        balanced = F * K + np.arange((V - F) * K, dtype=np.int64) % (M - F * K)
        table[shared_words] = balanced[np.argsort(keys.reshape(-1), kind="stable")].reshape(V - F, K)
        return table
    per_position = M // K
    offsets = np.arange(K, dtype=np.int64) * per_position
    table[private_words] = np.arange(F, dtype=np.int64)[:, None] + offsets
    balanced = F + np.arange(V - F, dtype=np.int64) % (per_position - F)
    order = np.argsort(keys, axis=0, kind="stable")
    table[shared_words] = balanced[order] + offsets
    return table


def fingerprint(mapping):
    """Short hex digest of a mapping table (its int64 little-endian bytes and shape)."""
    table = np.ascontiguousarray(mapping, dtype="<i8")
    digest = hashlib.sha256(repr(table.shape).encode() + table.tobytes())
    return digest.hexdigest()[:15]


def learned_mapping_size(num_words, num_subvectors, pool_size, pool_kind="position"):
    """(bits, bytes) of a stored mapping packed tight: V*K entries, each of ceil(log2(the
    entries a slot can read)) bits (M/K per-position, M global)."""
    choices = pool_size // num_subvectors if pool_kind == "position" else pool_size
    bits = num_words * num_subvectors * max(1, math.ceil(math.log2(choices)))
    return bits, math.ceil(bits / 8)
