"""The random-shared token embedding (Li et al., AAAI 2018, arXiv 1711.09873)."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RShareConfigError
from ..mapping import LEARNED_MAPPINGS, MAPPING_KINDS, MAPPING_VERSION, fingerprint, layout_of, make_mapping

# A checkpoint keeps the 60-bit fingerprint as four 15-bit numbers: fairseq's
# scripts/average_checkpoints.py sums integer buffers over the checkpoints, then floor-divides,
# which keeps small numbers exact where one 60-bit number overflows int64.
FINGERPRINT_BITS = 15
FINGERPRINT_PARTS = 4


def fingerprint_parts(digest):
    """The hex fingerprint as FINGERPRINT_PARTS integers of FINGERPRINT_BITS bits, high first."""
    value = int(digest, 16)
    mask = (1 << FINGERPRINT_BITS) - 1
    return [(value >> (FINGERPRINT_BITS * i)) & mask for i in reversed(range(FINGERPRINT_PARTS))]


def fingerprint_of_parts(parts):
    value = 0
    for part in parts:
        value = (value << FINGERPRINT_BITS) | int(part)
    return f"{value:015x}"


# Slot indices stay below 2**31 so that every index kernel (and int32 users) can address them.
MAX_SLOTS = 2**31 - 1


# A stored mapping is int32, not int16 where the pool would allow it: average_checkpoints.py
# sums integer buffers over the checkpoints before dividing, and int16 sums overflow.
STORED_MAPPING_DTYPE = torch.int32


@dataclass(frozen=True)
class TableSpec:
    """What a RandomSharedEmbedding is built from: V words of H dims, K sub-vectors each, read
    from a pool of M entries laid out as `pool_kind`, by the `mapping_kind` mapping (the random
    one from `seed`, `private_words` getting entries of their own)."""

    num_words: int
    embed_dim: int
    num_subvectors: int
    pool_size: int
    pool_kind: str = "position"
    mapping_kind: str = "random"
    seed: int = 1
    private_words: Tuple[int, ...] = ()
    word_scale: bool = False
    init_std: Optional[float] = None


def check_table_shape(num_words, embed_dim, num_subvectors, pool_size, pool_kind, private_words=0):
    """The table's PoolLayout, or RShareConfigError naming the argument to change when the table
    cannot be built (private_words: how many words get private entries)."""
    V, H, K, M, F = num_words, embed_dim, num_subvectors, pool_size, private_words
    if K <= 0:
        raise RShareConfigError(f"num_subvectors must be positive, got {K}")
    if M <= 0:
        raise RShareConfigError(f"pool_size must be positive, got {M}")
    if K > H:
        raise RShareConfigError(f"num_subvectors {K} is larger than the embedding dim {H}: use at most {H}")
    if H % K:
        raise RShareConfigError(f"embedding dim {H} is not divisible by num_subvectors {K}: pick a divisor of {H}")
    layout = layout_of(pool_kind, V, K, M)
    if M < K:
        raise RShareConfigError(f"pool_size {M} is smaller than num_subvectors {K}: use at least {K}")
    layout.check()
    if V * K > MAX_SLOTS:
        raise RShareConfigError(
            f"a vocabulary of {V} words with num_subvectors {K} has {V * K} slots, more "
            f"than the {MAX_SLOTS} supported: use fewer sub-vectors or a smaller vocabulary"
        )
    if M >= V * K:
        raise RShareConfigError(
            f"pool_size {M} gives no compression for a vocabulary of {V} words "
            f"with {K} sub-vectors: use fewer than {V * K} entries (or a dense table)"
        )
    if F and M - F * K < 2 * K:
        raise RShareConfigError(
            f"private_words {F} leaves fewer than 2 shared entries per position in a "
            f"pool of {M}: use at most {M // K - 2} (or a larger pool)"
        )
    return layout


class GatherPoolRows(torch.autograd.Function):
    """pool[mapping], whose backward gathers: each pool row sums the gradients of the slots that
    use it, an embedding_bag over the inverse of the fixed mapping.  Autograd's own backward of
    the gather scatters with accumulation instead, 4 to 17 times slower on 2 CPU cores at
    V=10k-33k, K=8 (the materialised matrix's backward, once a training step)."""

    @staticmethod
    def forward(ctx, pool, mapping, slots_by_row, row_offsets):
        ctx.save_for_backward(slots_by_row, row_offsets)
        return F.embedding(mapping, pool)

    @staticmethod
    def backward(ctx, grad):
        slots_by_row, row_offsets = ctx.saved_tensors
        grad_slots = grad.reshape(-1, grad.shape[-1])
        return F.embedding_bag(slots_by_row, grad_slots, row_offsets, mode="sum"), None, None, None


class RandomSharedEmbedding(nn.Module):
    """Token embedding whose V x H matrix is K sub-vectors per word, drawn from a pool of M.

    Only ``pool`` (M x H/K) is trained.  ``mapping`` (V x K, pool row of each slot) is
    regenerated from the settings and is not saved; ``mapping_fingerprint`` is saved, and
    loading weights made with a different table is an error.  A learned ``mapping_kind``
    (kmeans, kmeans-balanced: made by fairseq-rshare-compress) is saved as ``stored_mapping``
    and replaces the regenerated one on loading, checked against the saved fingerprint; the
    table cannot be used before one is loaded.  ``private_words`` (the
    frequency-aware variant) get entries no other word uses; ``word_scale`` adds a trained
    scale per word and sub-vector.  The pool starts normal with std ``init_std``, by default
    H**-0.5 as fairseq's embeddings.
    """

    @classmethod
    def from_spec(cls, spec: TableSpec, padding_idx):
        return cls(spec.num_words, spec.embed_dim, padding_idx, spec.num_subvectors, spec.pool_size,
                   spec.pool_kind, spec.seed, spec.private_words, spec.word_scale, spec.init_std,
                   spec.mapping_kind)

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
        init_std=None,
        mapping_kind="random",
    ):
        super().__init__()
        private_words = [int(word) for word in private_words]
        self.layout = check_table_shape(
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
        if mapping_kind not in MAPPING_KINDS:
            raise RShareConfigError(f"mapping_kind must be one of {MAPPING_KINDS}, got {mapping_kind!r}")
        self.mapping_kind = mapping_kind
        self.stores_mapping = mapping_kind in LEARNED_MAPPINGS
        mapping = make_mapping(num_embeddings, num_subvectors, pool_size, pool_kind, seed, private_words)
        # What a refused checkpoint's or an unloaded mapping's message names (a builder from
        # flags names the flags).
        self.settings = (
            f"V={num_embeddings}, K={num_subvectors}, M={pool_size}, pool kind={pool_kind}, "
            f"seed={seed}, private words={len(private_words)}"
        )
        self.mapping_setting = f"mapping_kind {mapping_kind}"
        self.use_mapping(torch.from_numpy(mapping))
        if self.stores_mapping:
            # The regenerated mapping stands in (unusable) until the stored one loads; -1 saves as none.
            self.register_buffer("stored_mapping", torch.full_like(self.mapping, -1, dtype=STORED_MAPPING_DTYPE))
        self.mapping_loaded = not self.stores_mapping
        self.register_buffer("mapping_fingerprint", torch.tensor(fingerprint_parts(self.fingerprint)))
        self.register_buffer("mapping_version", torch.tensor(MAPPING_VERSION))
        self.pool = nn.Parameter(torch.empty(pool_size, embedding_dim // num_subvectors))
        nn.init.normal_(self.pool, mean=0.0, std=embedding_dim**-0.5 if init_std is None else init_std)
        # Optional per-word scales of the K sub-vectors (V*K numbers, started at 1): words that
        # share an entry can still weigh it differently.
        self.word_scale = nn.Parameter(torch.ones(num_embeddings, num_subvectors)) if word_scale else None

    def use_mapping(self, mapping):
        """Take `mapping` (V x K int64) as the table, with its fingerprint and inverse index."""
        self.fingerprint = fingerprint(mapping.cpu().numpy())
        self.register_buffer("mapping", mapping, persistent=False)
        # The inverse of the mapping for GatherPoolRows: the slots (word * K + k) grouped by pool
        # row, and where each row's group starts.
        slots = mapping.flatten()
        uses = torch.bincount(slots, minlength=self.pool_size)
        self.register_buffer("slots_by_row", torch.argsort(slots, stable=True).int(), persistent=False)
        self.register_buffer("row_offsets", (torch.cumsum(uses, 0) - uses).int(), persistent=False)

    def check_mapping_loaded(self):
        if not self.mapping_loaded:
            raise RShareConfigError(
                f"{self.mapping_setting} is learned from a trained dense model by "
                "fairseq-rshare-compress and stored in its checkpoint, but none was loaded: start "
                "from that checkpoint (fairseq-train --finetune-from-model), or train from "
                "scratch with the random mapping"
            )

    def forward(self, tokens):
        self.check_mapping_loaded()
        vectors = F.embedding(self.mapping[tokens], self.pool)
        if self.word_scale is not None:
            vectors = vectors * self.word_scale[tokens].unsqueeze(-1)
        vectors = vectors.flatten(-2)
        if self.padding_idx is not None:
            vectors = vectors.masked_fill(tokens.eq(self.padding_idx).unsqueeze(-1), 0.0)
        return vectors

    def materialized_weight(self):
        """The V x H matrix this module stands for (pad row included, not zeroed)."""
        self.check_mapping_loaded()
        vectors = GatherPoolRows.apply(self.pool, self.mapping, self.slots_by_row, self.row_offsets)
        if self.word_scale is not None:
            vectors = vectors * self.word_scale.unsqueeze(-1)
        return vectors.flatten(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse weights of another table; adopt a stored mapping; read checkpoints saved before
        the fingerprint was split in parts (one 60-bit number) and before the mapping version was
        recorded (1)."""
        key, version_key = prefix + "mapping_fingerprint", prefix + "mapping_version"
        stored = state_dict.get(key)
        if stored is not None:
            if stored.dim() == 0:
                stored = state_dict[key] = torch.tensor(fingerprint_parts(f"{int(stored):015x}"))
            stored_digest = fingerprint_of_parts(stored.tolist())
            stored_table = state_dict.get(prefix + "stored_mapping")
            if self.stores_mapping:
                self.adopt_stored_mapping(stored_table, stored_digest, prefix.rstrip("."))
            elif stored_table is not None:
                raise RShareConfigError(
                    f"checkpoint table '{prefix.rstrip('.')}' holds a mapping learned by "
                    f"fairseq-rshare-compress, but these settings ({self.settings}) regenerate "
                    f"the random one: load it with the learned mapping it was compressed with "
                    f"({' or '.join(LEARNED_MAPPINGS)})"
                )
            if stored_digest != self.fingerprint:
                raise RShareConfigError(
                    f"checkpoint table '{prefix.rstrip('.')}' was trained with mapping fingerprint "
                    f"{stored_digest}, but these settings ({self.settings}) regenerate "
                    f"{self.fingerprint}: load it with the settings it was trained with"
                )
            version = int(state_dict.setdefault(version_key, torch.tensor(1)))
            if version != MAPPING_VERSION:
                raise RShareConfigError(
                    f"checkpoint table '{prefix.rstrip('.')}' was built by mapping algorithm "
                    f"v{version}; this fairseq_rshare has v{MAPPING_VERSION}: install the "
                    "fairseq_rshare that trained it"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adopt_stored_mapping(self, table, stored_digest, name):
        """Take a checkpoint's stored mapping as the table, once it matches its fingerprint."""
        V, K = self.num_embeddings, self.num_subvectors
        if table is None:
            raise RShareConfigError(
                f"checkpoint table '{name}' has no stored mapping (it was trained with the random "
                f"mapping), but these settings ({self.settings}) learn one: load it with the "
                "random mapping"
            )
        if tuple(table.shape) != (V, K):
            raise RShareConfigError(
                f"checkpoint table '{name}' stores a mapping of {tuple(table.shape)}, but this "
                f"table is V x K = ({V}, {K}): load it with the dictionary it was compressed with"
            )
        if bool((table == -1).all()):
            raise RShareConfigError(
                f"checkpoint table '{name}' was saved before its learned mapping was loaded (it "
                "never had one): start from a checkpoint written by fairseq-rshare-compress"
            )
        table = table.long().cpu()
        low, high = self.layout.entry_bounds()
        in_range = bool(((table >= low) & (table < high)).all())
        if not in_range or fingerprint(table.numpy()) != stored_digest:
            raise RShareConfigError(
                f"checkpoint table '{name}': the stored mapping does not match its fingerprint "
                f"{stored_digest} (or reads entries outside its pool): the file was altered or "
                "damaged; compress the dense model again"
            )
        self.use_mapping(table.to(self.mapping.device))
        self.mapping_loaded = True

    def extra_repr(self):
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, K={self.num_subvectors}, "
            f"pool={self.pool_size} ({self.pool_kind}), seed={self.seed}, "
            f"private_words={len(self.private_words)}, word_scale={self.word_scale is not None}, "
            f"mapping={self.mapping_kind}, fingerprint={self.fingerprint}"
        )
